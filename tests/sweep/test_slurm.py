"""SLURM sweeps through submitit: the sbatch script a spec's slurm block gives, job ids in the
store and run directories, --status with job states, resubmission of preempted points.

No SLURM here: real jobs run through submitit's local executor (`--executor submitit-local`).
"""

from __future__ import annotations

import json
import os

from unlearn import cli
from unlearn.runs.rundir import RunDir
from unlearn.runs.store import Store
from unlearn.sweep.slurm import SubmititExecutor, read_jobs, run_point_job, status_with_job
from unlearn.sweep.spec import SlurmSettings, load_sweep
from unlearn.sweep.state import PointState

from .helpers import base_spec, write_spec


def test_unknown_executor_is_a_usage_error(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world))
    assert cli.main(["sweep", str(spec), "--executor", "pbs"]) == 2
    assert "invalid choice: 'pbs'" in capsys.readouterr().err


def test_slurm_block_becomes_the_sbatch_script(tiny_world, tmp_path, monkeypatch):
    """Submit for real through submitit's SLURM executor, with stand-ins for srun and sbatch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4711"')):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    slurm = {
        "partition": "gpu",
        "nodes": 2,
        "gpus_per_node": 4,
        "tasks_per_node": 4,
        "cpus_per_task": 8,
        "mem_gb": 200,
        "time": 240,
        "sbatch": {"account": "proj", "qos": "high"},
        "setup": ["module load cuda/12.4"],
    }
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world, slurm=slurm)))
    point = sweep.points[0]
    executor = SubmititExecutor(sweep, "slurm", sweep.slurm)
    job = executor._executor().submit(run_point_job, point)
    assert job.job_id == "4711"
    script = job.paths.submission_file.read_text()
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=200GB",
        "#SBATCH --time=240",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --job-name=unlearn-s",
        "module load cuda/12.4",
    ]:
        assert line in script, line
    executor._record(point, job, 1)
    assert read_jobs(sweep)[point.id]["job_id"] == "4711"
    with Store(sweep.store) as store:
        assert (store.run(point.id).status, store.run(point.id).job_id) == ("pending", "4711")


def test_status_with_job_states():
    assert status_with_job("pending", None) == "pending"
    assert status_with_job("pending", "123 PENDING") == "pending"
    assert status_with_job("pending", "123 RUNNING") == "running"
    assert status_with_job("running", "123 CANCELLED by 42") == "failed"
    assert status_with_job("running", "123 TIMEOUT") == "failed"
    assert status_with_job("done", "123 COMPLETED") == "done"
    assert status_with_job("preempted", "123 PREEMPTED") == "preempted"  # resumable, not failed


class FakeJob:
    def __init__(self, job_id: str, result: PointState) -> None:
        self.job_id, self._result, self.state = job_id, result, "RUNNING"

    def done(self) -> bool:
        return True

    def result(self) -> PointState:
        return self._result


def test_a_preempted_point_is_resubmitted_with_a_new_job_id(tiny_world, tmp_path, monkeypatch):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1]})))
    (point,) = sweep.points
    outcomes = [PointState(point.id, "preempted"), PointState(point.id, "done")]
    submitted = []

    class FakeExecutor:
        def submit(self, fn, p):
            submitted.append(p.id)
            return FakeJob(str(100 + len(submitted)), outcomes[len(submitted) - 1])

    executor = SubmititExecutor(sweep, "local", poll_s=0, log=lambda _: None)
    monkeypatch.setattr(executor, "_executor", FakeExecutor)
    started, done = [], []
    executor.submit(sweep.points, started.append, lambda p, s: done.append(s.status))
    assert submitted == [point.id, point.id] and done == ["done"]
    assert started == [point, point]  # the resubmitted job starts again
    assert read_jobs(sweep)[point.id] | {"submitted": None} == {
        "job_id": "102",
        "cluster": "local",
        "attempt": 2,
        "submitted": None,
    }
    with Store(sweep.store) as store:
        assert store.run(point.id).job_id == "102"


def test_no_more_resubmissions_than_requeue(tiny_world, tmp_path, monkeypatch):
    sweep = load_sweep(write_spec(tmp_path, base_spec(tiny_world, grid={"retain_coef": [1]})))
    sweep.slurm = SlurmSettings(requeue=1)
    submitted = []

    class AlwaysPreempted:
        def submit(self, fn, p):
            submitted.append(p.id)
            return FakeJob(str(len(submitted)), PointState(p.id, "preempted"))

    executor = SubmititExecutor(sweep, "local", sweep.slurm, poll_s=0, log=lambda _: None)
    monkeypatch.setattr(executor, "_executor", AlwaysPreempted)
    done = []
    executor.submit(sweep.points, lambda p: None, lambda p, s: done.append(s.status))
    assert len(submitted) == 2 and done == ["preempted"]


def test_sweep_through_submitit_local_records_jobs_and_results(tiny_world, tmp_path, capsys):
    spec = write_spec(tmp_path, base_spec(tiny_world, slurm={"time": 10, "cpus_per_task": 1}))
    assert cli.main(["sweep", str(spec), "--executor", "submitit-local"]) == 0
    sweep = load_sweep(spec)
    jobs = read_jobs(sweep)
    assert set(jobs) == {p.id for p in sweep.points}
    with Store(sweep.store) as store:
        for p in sweep.points:
            run = store.run(p.id)
            assert run.status == "done" and {"forget", "retain"} <= set(store.final_evals(p.id))
            assert run.job_id == jobs[p.id]["job_id"] == RunDir(p.run_dir).read_meta().job_id
    capsys.readouterr()

    assert cli.main(["sweep", str(spec), "--status"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| point"))
    assert header.rstrip(" |").endswith("job")
    for p in sweep.points:
        row = next(line for line in out.splitlines() if line.startswith(f"| {p.id}"))
        assert "| done " in row and f"{jobs[p.id]['job_id']} FINISHED" in row
    assert "2 done" in out
    # The submitit folder holds each job's logs and pickles, next to the run directories.
    assert json.loads((sweep.out / ".submitit" / "jobs.json").read_text()) == jobs
