"""Data safety: a command never deletes or mixes into what it did not write, and bad inputs are
refused before anything is written."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat

import pytest

from unlearn.cli import main as cli
from unlearn.errors import UsageError
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir

FAST = ["--max_steps", "1", "--pdbs", "2", "--grad_accum", "1", "--num_train_examples", "8",
        "--eval", "false", "--progress", "false"]  # fmt: skip
ATTACK_FAST = ["--max_steps", "1", "--pdbs", "2", "--eval_every", "1", "--forget_tasks", "retain",
               "--progress", "false"]  # fmt: skip


def unlearn_run(world, out, *extra: str) -> int:
    """A one-step sequential run (no lens or affine fitting, no evaluation): a few seconds."""
    return cli(["run", "--method", "sequential", "--world", str(world.root), "--out", str(out),
                *FAST, *extra])  # fmt: skip


def snapshot(path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to assert nothing was deleted or changed)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def previous_run(tiny_world, tmp_path_factory):
    """A finished run directory (with its saved model) made by `unlearn run`."""
    out = tmp_path_factory.mktemp("previous") / "r"
    assert unlearn_run(tiny_world, out) == 0
    assert (out / "model" / "config.json").is_file()
    return out


# -- item 1: the input model inside, equal to or around the output directory ---------------------


@pytest.mark.parametrize("relation", ["contains", "equals", "inside"])
@pytest.mark.parametrize("command", ["run", "attack"])
def test_out_overlapping_the_input_model_is_refused(
    tiny_world, previous_run, command, relation, capsys
):
    before = snapshot(previous_run)
    model = previous_run / "model"
    out = {"contains": previous_run, "equals": model, "inside": model / "sub"}[relation]
    if command == "run":
        rc = unlearn_run(tiny_world, out, "--model", str(model))
    else:
        rc = cli(["attack", "--model", str(model), "--world", str(tiny_world.root),
                  "--out", str(out), *ATTACK_FAST])  # fmt: skip
    assert rc == 2
    assert "input model" in one_error_line(capsys)
    assert snapshot(previous_run) == before


# -- item 3: only an empty directory or a run directory of the same kind ------------------------


@pytest.mark.parametrize("command", ["run", "attack"])
def test_out_that_is_a_users_directory_or_file_is_refused(tiny_world, tmp_path, command, capsys):
    users = tmp_path / "mine"
    (users / "model").mkdir(parents=True)
    (users / "notes.txt").write_text("my notes")
    (users / "model" / "weights.bin").write_bytes(b"precious")
    a_file = tmp_path / "file.txt"
    a_file.write_text("a file")
    for out in (users, a_file):
        before = snapshot(tmp_path)
        if command == "run":
            rc = unlearn_run(tiny_world, out)
        else:
            rc = cli(["attack", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
                      "--out", str(out), *ATTACK_FAST])  # fmt: skip
        assert rc == 2
        line = one_error_line(capsys)
        assert ("not a run directory" in line) if out == users else ("not a directory" in line)
        assert snapshot(tmp_path) == before


def test_out_holding_a_run_of_another_kind_is_refused(tiny_world, previous_run, tmp_path, capsys):
    before = snapshot(previous_run)
    rc = cli(["attack", "--model", str(tiny_world.filtered), "--world", str(tiny_world.root),
              "--out", str(previous_run), *ATTACK_FAST])  # fmt: skip
    assert rc == 2
    assert "holds a run of kind 'unlearn'" in one_error_line(capsys)
    assert snapshot(previous_run) == before


def test_reset_never_deletes_a_model_it_cannot_prove_it_wrote(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.write_run(RunMeta(id="r", kind="unlearn", method="lens", status="done"))
    (rd.path / "model").mkdir()
    (rd.path / "model" / "weights.bin").write_bytes(b"the user's")
    (rd.path / "adapter").mkdir()
    with pytest.raises(UsageError, match="was not written by"):
        rd.reset()
    assert (rd.path / "model" / "weights.bin").read_bytes() == b"the user's"
    assert rd.exists() and (rd.path / "adapter").is_dir()


def test_reset_deletes_what_the_previous_run_saved(tmp_path):
    rd = RunDir(tmp_path / "r")
    meta = RunMeta(id="r", kind="unlearn", method="lens", status="done", created="2025-01-01")
    rd.write_run(meta)
    for name in ("model", "adapter"):
        (rd.path / name).mkdir()
        (rd.path / name / "weights.bin").write_bytes(b"saved by the run")
        for file, text in rd.owner_files(meta).items():
            (rd.path / name / file).write_text(text)
    rd.reset()
    assert not (rd.path / "model").exists() and not (rd.path / "adapter").exists()
    assert not rd.exists()
    # The stamp of another run (a model copied in from elsewhere) proves nothing.
    rd.write_run(
        RunMeta(id="r", kind="unlearn", method="lens", status="done", created="2025-02-02")
    )
    (rd.path / "model").mkdir()
    for file, text in rd.owner_files(meta).items():
        (rd.path / "model" / file).write_text(text)
    with pytest.raises(UsageError, match="was not written by"):
        rd.reset()
    assert (rd.path / "model").is_dir()


def test_rerun_into_its_own_run_dir_replaces_the_model(tiny_world, tmp_path):
    out = tmp_path / "r"
    assert unlearn_run(tiny_world, out) == 0
    first = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert unlearn_run(tiny_world, out, "--seed", "1") == 0
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((out / "run.json").read_text())["status"] == "done"


# -- item 2: fit-lens / fit-affine --out --------------------------------------------------------


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.jsonl"
    docs = [f"document {i}: the river flows past the mill and the bakers rise early." for i in
            range(12)]  # fmt: skip
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def fit_lens(model, texts, out) -> int:
    return cli(["fit-lens", "--model", str(model), "--texts", str(texts), "--out", str(out),
                "--steps", "1", "--layers", "0"])  # fmt: skip


def fit_affine(model, texts, out) -> int:
    return cli(["fit-affine", "--source", str(model), "--target", str(model), "--texts",
                str(texts), "--out", str(out), "--examples", "4", "--layers", "0"])  # fmt: skip


@pytest.mark.parametrize("fit", [fit_lens, fit_affine], ids=["fit-lens", "fit-affine"])
def test_fit_out_refuses_a_users_directory_and_a_file(tiny_hf_models, texts, tmp_path, fit, capsys):
    model = tiny_hf_models["gpt_neox"]
    users = tmp_path / "mine"
    users.mkdir()
    (users / "data.csv").write_text("1,2,3\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("a file")
    for out in (users, a_file, model):
        before = snapshot(tmp_path), snapshot(model)
        assert fit(model, texts, out) == 2
        line = one_error_line(capsys)
        assert "is not a directory" in line or "is not empty" in line
        assert (snapshot(tmp_path), snapshot(model)) == before
    # An empty directory, then the tool's own output, may be (re)written.
    (tmp_path / "empty").mkdir()
    assert fit(model, texts, tmp_path / "empty") == 0
    assert fit(model, texts, tmp_path / "empty") == 0


# -- item 7: checks before the run directory exists / before weights load -----------------------


@pytest.fixture
def junk_store(tmp_path):
    path = tmp_path / "junk.db"
    path.write_text("this is not a database " * 100)
    return path


@pytest.fixture
def foreign_db(tmp_path):
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO patients (name) VALUES ('x')")
    c.close()
    return path


@pytest.mark.parametrize("store", ["junk_store", "foreign_db"])
def test_bad_store_is_refused_before_the_run_dir_exists(tiny_world, tmp_path, store, request):
    path = request.getfixturevalue(store)
    before = path.read_bytes()
    assert unlearn_run(tiny_world, tmp_path / "r", "--store", str(path)) == 2
    rc = cli(["attack", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
              "--out", str(tmp_path / "a"), "--store", str(path), *ATTACK_FAST])  # fmt: skip
    assert rc == 2
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()
    assert path.read_bytes() == before


def test_bad_store_fails_sweep_validation(tiny_world, tmp_path, junk_store):
    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "s", "world": str(tiny_world.root), "method": "sequential",
        "store": str(junk_store), "grid": {"retain_coef": [1]},
    }))  # fmt: skip
    assert cli(["sweep", str(spec), "--dry-run"]) == 2
    assert not (tmp_path / "s").exists()


def test_checkpoints_checks_store_and_out_before_loading_weights(
    tiny_world, tmp_path, junk_store, monkeypatch, capsys
):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    a_file = tmp_path / "file.txt"
    a_file.write_text("a file")
    base = ["checkpoints", "--world", str(tiny_world.root)]
    assert cli([*base, "--store", str(junk_store)]) == 2
    assert "results store" in one_error_line(capsys)
    assert cli([*base, "--out", str(a_file)]) == 2
    assert "not a directory" in one_error_line(capsys)
    assert a_file.read_text() == "a file"


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_save_marks_the_run_failed(tiny_world, tmp_path, monkeypatch, capsys):
    import unlearn.models.save

    monkeypatch.setattr(unlearn.models.save, "save_model", _disk_full)
    assert unlearn_run(tiny_world, tmp_path / "r") == 1
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["status"] == "failed" and "No space left" in meta["error"]
    assert meta["finished"] is not None
    out = tmp_path / "a"
    rc = cli(["attack", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
              "--out", str(out), "--save_model", "true", *ATTACK_FAST])  # fmt: skip
    assert rc == 1
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "failed" and "No space left" in meta["error"]


def _save_worker(rank: int, port: int, out: str) -> None:
    """Rank 0's save fails; every rank must raise (not wait for rank 0 at a collective)."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch import nn

    import unlearn.models.save
    from unlearn.distributed import Parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=20))  # fmt: skip
    unlearn.models.save.save_model = _disk_full
    try:
        Parallel("ddp", rank, 2).save_model(nn.Linear(2, 2), None, out)
        result = "saved"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    finally:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(result)
        dist.destroy_process_group()


def test_a_failed_save_on_rank_0_raises_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_save_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        result = (tmp_path / f"rank{rank}.txt").read_text()
        assert result.startswith("OSError") and "No space left" in result, (rank, result)


# -- item 11: nothing left behind by a clean exit 2; foreign databases; the umask ---------------


def test_clean_exit_2_leaves_no_empty_output_dirs(tiny_world, tmp_path, junk_store, capsys):
    new = tmp_path / "new"
    cases = [
        ["report", "--store", str(junk_store), "--out", str(new / "report")],
        ["demo", "--preset", "tiny", "--world", str(tmp_path / "nope"), "--out", str(new / "d")],
        ["checkpoints", "--paths", str(tmp_path / "nope"), "--world", str(tiny_world.root),
         "--out", str(new / "c")],
        ["eval", "--model", str(tmp_path / "nope"), "--world", str(tiny_world.root),
         "--output", str(new / "e" / "out.json")],
    ]  # fmt: skip
    for argv in cases:
        assert cli(argv) == 2, argv
        one_error_line(capsys)
        assert not new.exists(), argv


def test_atomic_dirs_honour_the_umask(tmp_path):
    from unlearn.fsutil import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "shared") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o755
    old = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "private") as tmp:
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700


# -- a killed atomic write, weight files' permissions, eval --output -------------------------


def test_weight_files_honour_the_umask(tmp_path):
    """safetensors' save_file writes 0600 files; inside an atomic_dir they get the umask's."""
    import torch
    from safetensors.torch import save_file

    from unlearn.fsutil import atomic_dir

    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            with atomic_dir(tmp_path / "model") as tmp:
                save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
                (tmp / "sub").mkdir(mode=0o700)
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == mode
        assert stat.S_IMODE((tmp_path / "model" / "sub").stat().st_mode) == 0o777 & ~umask


KILLED_WRITE = """
import os, sys
from unlearn.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half").write_text("half written")
    os.kill(os.getpid(), 9)
"""


def test_a_killed_atomic_write_leaves_a_temp_dir_that_the_next_one_removes(tmp_path, capsys):
    import subprocess
    import sys

    from unlearn.fsutil import _owner_tag, atomic_dir

    world = tmp_path / "world"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(world)], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    (left,) = tmp_path.glob(".world.tmp-*")  # what a killed `world build` leaves
    host, dead = _owner_tag().split("@", 1)[1], _dead_pid()
    # Kept: a live process's (this one's), another machine's, another naming's, another
    # artifact's, and anything else.
    kept = [
        f".world.tmp-{os.getpid()}@{host}-abcdefgh",
        f".world.tmp-{dead}@other-host-abc_1234",
        ".world.tmp-abc_1234",
        f".other.tmp-{dead}@{host}-abcdefgh",
        ".world.notes",
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    with atomic_dir(world) as tmp:
        (tmp / "done").write_text("whole")
    assert not left.exists()
    assert f"removed {left}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "world"])
    assert (world / "done").read_text() == "whole"


def _dead_pid() -> int:
    """The pid of a process that has ended (reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_eval_output_replaces_only_an_earlier_results_file(
    tiny_world, previous_run, tmp_path, capsys, monkeypatch
):
    from unlearn.recipes.evaluation import is_eval_results

    argv = ["eval", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
            "--tasks", "forget", "--limit", "2"]  # fmt: skip
    results = tmp_path / "results.json"
    assert cli([*argv, "--output", str(results)]) == 0
    assert cli([*argv, "--output", str(results)]) == 0  # its own earlier results: replaced
    first = json.loads(results.read_text())
    assert first["results"]["forget"]["n"] == 2 and is_eval_results(results)
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"baselines": {"Target": first, "Filtered twin": first}}))
    assert is_eval_results(baselines)  # what --baselines --output writes

    capsys.readouterr()
    users = tmp_path / "uf.txt"
    users.write_text("precious\n")
    not_quite = tmp_path / "notes.json"
    not_quite.write_text(json.dumps({"model": "m", "results": {}, "my notes": "keep"}))
    before = snapshot(previous_run)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    for output in (users, not_quite, previous_run / "run.json"):
        kept = output.read_bytes()
        assert cli([*argv, "--output", str(output)]) == 2
        line = one_error_line(capsys)
        assert f"--output {output} exists and is not an eval results file" in line, line
        assert output.read_bytes() == kept
    assert snapshot(previous_run) == before
