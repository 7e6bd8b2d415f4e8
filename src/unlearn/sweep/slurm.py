"""The submitit executor: one SLURM job per sweep point, job ids recorded, preempted points resumed.

    unlearn sweep spec.yaml --executor slurm            # sbatch one job per unfinished point
    unlearn sweep spec.yaml --executor submitit-local   # the same through submitit's local executor
    unlearn sweep spec.yaml --status                    # run-directory status + each point's job

The spec's `slurm:` block (`unlearn.sweep.spec.SlurmSettings`, validated with the rest of the
spec, before anything runs):

    slurm:
      partition: gpu
      nodes: 1
      gpus_per_node: 4
      tasks_per_node: 1        # 4 with distributed: ddp|fsdp2 in base (one process per GPU)
      cpus_per_task: 16
      mem_gb: 256
      time: 240                # minutes
      sbatch: {account: proj, qos: high}           # any other sbatch option
      setup: ["module load cuda/12.4"]             # shell lines before the job starts
      requeue: 3               # resubmissions of a preempted point

Design choices:
- The sweep process stays the driver: it holds the sweep lock, submits, polls the jobs, calls the
  executor hooks (progress lines, store ingestion) and exits when every job has ended. Jobs write
  only their run directories (the truth on a shared filesystem); the driver ingests them into the
  store. Each job's own run also upserts the store while it trains, which is safe across
  processes on one machine (WAL SQLite); keep the store on a local disk, as docs/sweeps.md says.
- Job ids: the driver writes OUT/.submitit/jobs.json (point id -> job id, cluster) atomically at
  every submission, and indexes the point in the store as pending with its job id; a run records
  the id of the job it runs in (`unlearn.runs.lifecycle.current_job_id`) in run.json.
  `--status` reads jobs.json and asks SLURM (sacct, through submitit) for each recorded job's state.
- Preemption: a training run turns SIGTERM/SIGUSR1/SIGUSR2 (submitit asks SLURM for USR2 before
  the time limit) into a checkpoint and status "preempted" (unlearn.training.checkpointer). The
  driver resubmits such a point up to `requeue` times; the new job resumes from the checkpoint.
  Without a live driver, rerunning `unlearn sweep` does the same.
- A rerun of the sweep reattaches to recorded SLURM jobs that are still queued or running
  instead of submitting duplicates (a driver killed while its jobs ran).
- Several tasks per job (torchrun-style DDP/FSDP2 inside one job): each task exports the
  torch.distributed environment from SLURM's (submitit's TorchDistributedEnvironment) and runs
  the point; only rank 0 clears or writes run directories.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_write_json
from unlearn.runs.rows import RunMeta
from unlearn.runs.store import Store
from unlearn.sweep.execute import Executor, OnDone, OnStart, record_failure, run_point
from unlearn.sweep.points import Point
from unlearn.sweep.spec import SlurmSettings, Sweep
from unlearn.sweep.state import PointState, inspect_point
from unlearn.sweep.workers import WorkerPoolExecutor

EXECUTORS = ("local", "slurm", "submitit-local")
CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}
"""--executor name -> submitit cluster name."""
JOBS_DIR = ".submitit"
JOBS_FILE = "jobs.json"
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")
FAILED_STATES = (
    "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "INTERRUPTED",
)  # fmt: skip
"""SLURM (and submitit local) job states after which a job will not write its run again."""


# -- inside a job -------------------------------------------------------------------------------


def run_point_job(point: Point) -> PointState:
    """What each job runs: one sweep point (with a torch.distributed environment when the job
    has several tasks, so `distributed: ddp|fsdp2` points train on all of the job's GPUs)."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return run_point(point)


# -- the driver ---------------------------------------------------------------------------------


def jobs_file(sweep: Sweep) -> Path:
    return sweep.out / JOBS_DIR / JOBS_FILE


def read_jobs(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """{point id: {"job_id", "cluster", "submitted", "attempt"}} recorded for this sweep."""
    path = jobs_file(sweep)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def job_state(sweep: Sweep, record: dict[str, Any]) -> str:
    """A recorded job's state as submitit sees it (sacct on SLURM; a local job whose driver is
    gone reads FINISHED when it left a result, else UNKNOWN)."""
    import submitit

    folder = sweep.out / JOBS_DIR
    try:
        if record["cluster"] == "slurm":
            return submitit.SlurmJob(folder=folder, job_id=record["job_id"]).state
        job = submitit.LocalJob(folder=folder, job_id=record["job_id"])
        return "FINISHED" if job.paths.result_pickle.exists() else "UNKNOWN"
    except Exception as e:  # sacct missing or failing must not break --status
        return f"UNKNOWN ({type(e).__name__})"


def job_column(sweep: Sweep) -> dict[str, str]:
    """{point id: "JOBID STATE"} for --status (points never submitted are left out)."""
    return {
        pid: f"{rec['job_id']} {job_state(sweep, rec)}" for pid, rec in read_jobs(sweep).items()
    }


def status_with_job(status: str, job: str | None) -> str:
    """A point's status for --status: the run directory's, corrected by its job's state when the
    directory cannot know (queued but not started; killed without a chance to record it)."""
    if job is None:
        return status
    state = job.split(" ", 1)[1] if " " in job else job
    if status == "pending" and state.startswith("RUNNING"):
        return "running"
    if status in ("pending", "running") and state.split(" ")[0] in FAILED_STATES:
        return "failed"
    return status


@dataclass
class _Tracked:
    point: Point
    job: Any
    attempt: int
    started: bool = False


class SubmititExecutor(Executor):
    """One submitit job per point, on SLURM ("slurm") or as local processes ("local")."""

    def __init__(
        self,
        sweep: Sweep,
        cluster: str,
        settings: SlurmSettings | None = None,
        poll_s: float | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if cluster not in CLUSTERS.values():
            raise UsageError(f"unknown submitit cluster {cluster!r}")
        self.sweep = sweep
        self.cluster = cluster
        self.settings = settings or SlurmSettings()
        self.poll_s = poll_s if poll_s is not None else (15.0 if cluster == "slurm" else 0.5)
        self.log = log
        self.folder = sweep.out / JOBS_DIR

    def _executor(self):
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(**self.settings.parameters(f"unlearn-{self.sweep.name}"))
        return executor

    def _record(self, point: Point, job: Any, attempt: int) -> None:
        jobs = read_jobs(self.sweep)
        jobs[point.id] = {
            "job_id": str(job.job_id),
            "cluster": self.cluster,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "attempt": attempt,
        }
        atomic_write_json(jobs_file(self.sweep), jobs)
        meta = RunMeta(
            point.id,
            "unlearn",
            point.method,
            point.run_config.to_dict(),
            status="pending",
            job_id=str(job.job_id),
        )
        with Store(self.sweep.store) as store:
            store.upsert_run(meta, point.run_dir)

    def _reattach(self, point: Point) -> Any | None:
        """The still-active SLURM job of an earlier driver for this point, if any."""
        record = read_jobs(self.sweep).get(point.id)
        if record is None or record["cluster"] != "slurm" or self.cluster != "slurm":
            return None
        if job_state(self.sweep, record).split(" ")[0] not in ACTIVE_STATES:
            return None
        import submitit

        self.log(f"{point.id}: job {record['job_id']} is still active, waiting for it")
        return submitit.SlurmJob(folder=self.folder, job_id=record["job_id"])

    def submit(self, points: Sequence[Point], on_start: OnStart, on_done: OnDone) -> None:
        if not points:
            return
        executor = self._executor()
        tracked = []
        for point in points:
            job = self._reattach(point)
            if job is None:
                job = executor.submit(run_point_job, point)
                self._record(point, job, 1)
            tracked.append(_Tracked(point, job, 1))
        while tracked:
            still = []
            for t in tracked:
                done = t.job.done()
                if not t.started and (done or t.job.state.startswith("RUNNING")):
                    t.started = True
                    on_start(t.point)
                if not done:
                    still.append(t)
                    continue
                state = self._outcome(t)
                if state.status == "preempted" and t.attempt <= self.settings.requeue:
                    self.log(f"{t.point.id}: preempted, resubmitting (attempt {t.attempt + 1})")
                    job = executor.submit(run_point_job, t.point)
                    self._record(t.point, job, t.attempt + 1)
                    still.append(_Tracked(t.point, job, t.attempt + 1))
                    continue
                on_done(t.point, state)
            tracked = still
            if tracked:
                time.sleep(self.poll_s)

    def _outcome(self, t: _Tracked) -> PointState:
        """The point's state after its job ended; a job that died is recorded as failed."""
        try:
            return t.job.result()
        except Exception as e:  # the job crashed, was cancelled, or timed out uncheckpointed
            last = (str(e).strip().splitlines() or [""])[-1]
            error = f"job {t.job.job_id}: {type(e).__name__}: {last}"
            print(f"{t.point.id}: {error}", file=sys.stderr)
            meta = RunMeta(t.point.id, "unlearn", t.point.method, t.point.run_config.to_dict())
            record_failure(t.point.run_dir, meta, error)
            return inspect_point(t.point)


def make_executor(
    name: str, sweep: Sweep, log: Callable[[str], None] = print, workers: int = 1
) -> Executor | None:
    """The executor for --executor NAME (None: the sweep's default, local, one point at a time;
    `workers` > 1: that many local worker processes)."""
    if name not in EXECUTORS:
        raise UsageError(f"unknown --executor {name!r} (choose from {', '.join(EXECUTORS)})")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
    if name != "local":
        if workers != 1:
            raise UsageError(
                "--workers applies to the local executor (a cluster runs one job per point)"
            )
        return SubmititExecutor(sweep, CLUSTERS[name], sweep.slurm, log=log)
    return WorkerPoolExecutor(workers, log) if workers > 1 else None


def states_with_jobs(
    sweep: Sweep, states: list[PointState]
) -> tuple[list[PointState], dict[str, str] | None]:
    """--status: the points' states corrected by their recorded jobs, and the job column (None
    when no job was ever submitted for this sweep)."""
    jobs = job_column(sweep)
    if not jobs:
        return states, None
    return [replace(s, status=status_with_job(s.status, jobs.get(s.id))) for s in states], jobs
