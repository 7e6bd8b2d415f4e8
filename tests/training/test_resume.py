"""Preemption and resume: SIGTERM -> checkpoint -> rerun ends with the uninterrupted weights;
kill -9 at any moment leaves a loadable checkpoint; a changed config is refused.

The signal tests run the real CLI in a child process. The child wraps one function to deliver
a signal to itself at a chosen point (after the metric row of step N, or inside the K-th
checkpoint write), so the tests are deterministic without any test hook in the package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from unlearn import cli
from unlearn.errors import Preempted, UsageError
from unlearn.runs.rundir import RunDir, latest_checkpoint
from unlearn.training.checkpointer import Checkpointer
from unlearn.training.loop import TrainState
from unlearn.training.optim import build_optimizer
from unlearn.training.preemption import EXIT_PREEMPTED, deferring_signals, stop_requested
from unlearn.training.tensor_files import damage, read_info

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import unlearn.training.checkpointer as resume
    from unlearn import cli
    from unlearn.runs.rundir import RunDir

    plan = json.loads(sys.argv[1])
    at = plan.get("signal_after_step")
    if at is not None:
        log = RunDir.append_metrics
        def append_metrics(self, step, values):
            log(self, step, values)
            if step == at:
                os.kill(os.getpid(), getattr(signal, plan["signal"]))
        RunDir.append_metrics = append_metrics
    kill = plan.get("kill_in")  # [function name, which call]: SIGKILL when it is reached
    if kill is not None:
        name, nth = kill
        real = getattr(resume, name)
        calls = []
        def killer(*args):
            calls.append(1)
            if len(calls) == nth:
                if name == "save_tensors":  # die with the file half written
                    with open(args[1], "wb") as f:
                        f.write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        setattr(resume, name, killer)
    sys.exit(cli.main(plan["argv"]))
    """
)


def run_child(argv: list[str], **plan) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"argv": argv, **plan})],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def run_argv(world, out: Path, *extra: str) -> list[str]:
    """A 2-phase sequential LoRA run (dropout on: the torch RNG state matters) of 8 steps."""
    return [
        "run", "--method", "sequential", "--world", str(world.root), "--out", str(out),
        "--num_train_examples", "8", "--pdbs", "2", "--grad_accum", "1", "--max_steps", "4",
        "--lora", "true", "--lora_dropout", "0.1", "--progress", "false", "--eval", "false",
        *extra,
    ]  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "full"
    assert cli.main(run_argv(tiny_world, out)) == 0
    assert not (out / "checkpoint").exists()  # a finished run drops its checkpoint
    return out


# -- unit: save/restore on a small model ----------------------------------------------------------


class Blocks(nn.Module):
    """A model with a `layers` block list, so Muon takes the block matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 5)
        self.embed.weight.requires_grad_(False)  # frozen: not in the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = torch.nn.functional.dropout(torch.tanh(layer(h)), 0.2, self.training)
        return self.head(h)


def _fit(model, optimizer, state, steps, checkpointer=None) -> None:
    for _ in range(steps):
        x = torch.randint(0, 5, (3, 6))  # the global RNG: restored with the checkpoint
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        state.step += 1
        if checkpointer is not None:
            checkpointer.after_step(model, optimizer, state, total_steps=6)


def test_checkpoint_restores_muon_adamw_and_rng_bit_identically(tmp_path):
    torch.manual_seed(0)
    a = Blocks()
    opt_a = build_optimizer(a, "muon", 1e-2, weight_decay=0.1)
    assert set(opt_a.optimizers) == {"muon", "adamw"}
    _fit(a, opt_a, TrainState(), 6)

    torch.manual_seed(0)
    b = Blocks()
    opt_b = build_optimizer(b, "muon", 1e-2, weight_decay=0.1)
    ck = Checkpointer(tmp_path, {"lr": 1e-2}, every=2)
    _fit(b, opt_b, TrainState(), 3, ck)  # periodic checkpoint at step 2
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    saved = torch.load(latest_checkpoint(tmp_path) / "model.pt", weights_only=True)
    assert "embed.weight" not in saved and "layers.0.weight" in saved

    torch.manual_seed(123)  # a fresh process: other weights, other RNG
    c = Blocks()
    c.embed.weight.data.copy_(b.embed.weight)  # frozen weights come from the model's files
    opt_c = build_optimizer(c, "muon", 1e-2, weight_decay=0.1)
    state = Checkpointer(tmp_path, {"lr": 1e-2}).restore(c, opt_c, TrainState)
    assert state.step == 2
    _fit(c, opt_c, state, 4)
    for (name, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_signal_makes_after_step_save_and_raise(tmp_path):
    model = Blocks()
    opt = build_optimizer(model, "adamw", 1e-2)
    ck = Checkpointer(tmp_path, {"lr": 1e-2})
    before = signal.getsignal(signal.SIGTERM)
    with ck.catching_signals():
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only a flag is set
        with pytest.raises(Preempted, match="SIGTERM at step 1"):
            _fit(model, opt, TrainState(), 2, ck)
    assert signal.getsignal(signal.SIGTERM) is before  # restored on exit
    assert read_info(latest_checkpoint(tmp_path))["step"] == 1


def test_a_signal_latched_before_training_preempts_at_the_first_step(tmp_path):
    """A sweep defers signals between its runs; a run that starts after one arrived (SLURM's
    notice came while it loaded its model) stops at its first step instead of training on."""
    model = Blocks()
    opt = build_optimizer(model, "adamw", 1e-2)
    with deferring_signals() as latch:
        os.kill(os.getpid(), signal.SIGUSR2)  # handled: only the latch is set
        assert latch.signum == signal.SIGUSR2 and stop_requested()
        ck = Checkpointer(tmp_path / "a", {"lr": 1e-2})
        with ck.catching_signals(), pytest.raises(Preempted, match="SIGUSR2 at step 1"):
            _fit(model, opt, TrainState(), 3, ck)
    assert not stop_requested()
    with deferring_signals() as latch:  # and a signal during training reaches the latch too
        ck = Checkpointer(tmp_path / "b", {"lr": 1e-2})
        with ck.catching_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(Preempted, match="SIGTERM at step 1"):
                _fit(model, opt, TrainState(), 3, ck)
        assert latch.signum == signal.SIGTERM


def test_a_damaged_checkpoint_gives_way_to_an_older_one_or_is_one_line(tmp_path, capsys):
    model = Blocks()
    opt = build_optimizer(model, "adamw", 1e-2)
    ck = Checkpointer(tmp_path, {"lr": 1e-2})
    older = ck.save(model, opt, TrainState(step=2))
    shutil.copytree(older, tmp_path / "kept")
    newer = ck.save(model, opt, TrainState(step=4))  # prunes step 2 ...
    shutil.copytree(tmp_path / "kept", older)  # ... unless killed first: an older one is left
    data = (newer / "model.pt").read_bytes()
    (newer / "model.pt").write_bytes(data[: len(data) // 2])  # cut in half
    assert damage(newer) == f"model.pt has {len(data) // 2:,} bytes, {len(data):,} were written"

    state = Checkpointer(tmp_path, {"lr": 1e-2}).restore(model, opt, TrainState)
    assert state.step == 2
    assert f"{newer} is damaged (model.pt has" in capsys.readouterr().err

    shutil.rmtree(older)  # no older one left: one line saying how to restart
    with pytest.raises(UsageError) as e:
        Checkpointer(tmp_path, {"lr": 1e-2}).find()
    message = str(e.value)
    assert f"{newer} is damaged" in message and "\n" not in message
    assert f"remove {tmp_path / 'checkpoint'} to start the run again" in message
    # The same size with one byte changed: the checksum written with the file finds it.
    middle = len(data) // 2
    (newer / "model.pt").write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])
    with pytest.raises(UsageError, match=r"model\.pt does not match the checksum"):
        Checkpointer(tmp_path, {"lr": 1e-2}).find()

    # A checkpoint written before checksums were recorded: a load error is the same one line.
    info = json.loads((newer / "state.json").read_text())
    del info["files"]
    (newer / "state.json").write_text(json.dumps(info))
    (newer / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"damaged \(model.pt: .*remove"):
        Checkpointer(tmp_path, {"lr": 1e-2}).restore(model, opt, TrainState)


def test_cli_resume_from_a_truncated_checkpoint_is_one_line_before_weights_load(
    tiny_world, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "r"
    argv = run_argv(tiny_world, out)
    log = RunDir.append_metrics

    def preempt_at_step_1(self, step, values):
        log(self, step, values)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler

    monkeypatch.setattr(RunDir, "append_metrics", preempt_at_step_1)
    assert cli.main(argv) == EXIT_PREEMPTED
    model_pt = latest_checkpoint(out) / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    capsys.readouterr()

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the checkpoint was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    for _ in range(2):  # every rerun says the same, nothing changed in between
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("unlearn run: error: checkpoint") and "\n" not in err
        assert "is damaged (model.pt has" in err and f"remove {out / 'checkpoint'}" in err
        assert RunDir(out).read_meta().status == "preempted"


def test_changed_config_or_world_size_is_refused(tmp_path):
    model = Blocks()
    opt = build_optimizer(model, "adamw", 1e-2)
    state = TrainState(step=3)
    Checkpointer(tmp_path, {"lr": 1e-2, "checkpoint_every": 1}).save(model, opt, state)
    # checkpoint_every cannot change the result, so it may change between attempts.
    assert Checkpointer(tmp_path, {"lr": 1e-2, "checkpoint_every": 5}).find()["step"] == 3
    with pytest.raises(UsageError, match=r"different configuration \(lr 0.01 -> 0.02\)"):
        Checkpointer(tmp_path, {"lr": 2e-2}).find()
    info_file = latest_checkpoint(tmp_path) / "state.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "world_size": 2}))
    with pytest.raises(UsageError, match="2 process"):
        Checkpointer(tmp_path, {"lr": 1e-2}).find()


def test_cli_mismatch_is_one_line_exit_2(tiny_world, tmp_path, capsys):
    out = tmp_path / "r"
    model = Blocks()
    ck = Checkpointer(out, {"lr": 123.0})
    ck.save(model, build_optimizer(model, "adamw", 1e-2), TrainState(step=1))
    assert cli.main(run_argv(tiny_world, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unlearn run: error:") and "different configuration" in err
    assert "\n" not in err


# -- the real command in a child process ----------------------------------------------------------


def test_sigterm_then_rerun_gives_the_uninterrupted_weights(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "r"
    argv = run_argv(tiny_world, out)
    first = run_child(argv, signal_after_step=5, signal="SIGTERM")  # phase 2, step 1 of 4
    assert first.returncode == EXIT_PREEMPTED, first.stderr
    meta = RunDir(out).read_meta()
    assert meta.status == "preempted" and "SIGTERM at step 5" in meta.error
    assert read_info(latest_checkpoint(out))["step"] == 5
    assert not (out / "adapter").exists()

    assert cli.main(argv) == 0  # the same command resumes
    record = RunDir(out).read()
    assert record.meta.status == "done" and record.meta.started == meta.started
    assert_same_weights(weights(out / "adapter"), weights(uninterrupted / "adapter"))
    full = RunDir(uninterrupted).read().metrics
    assert [(m.step, m.name, m.value) for m in record.metrics] == [
        (m.step, m.name, m.value) for m in full
    ]
    assert not (out / "checkpoint").exists()


KILL_POINTS = [
    pytest.param(("save_tensors", 4), 2, id="mid-file"),  # the 2nd checkpoint's model.pt
    pytest.param(("fsync_dir", 3), 2, id="before-rename"),  # files written, not renamed
    pytest.param(("fsync_dir", 4), 4, id="after-rename"),  # renamed, old one not pruned
]


@pytest.mark.parametrize(("kill_in", "expected_step"), KILL_POINTS)
def test_kill9_during_a_checkpoint_leaves_a_loadable_one(
    tiny_world, tmp_path, uninterrupted, kill_in, expected_step
):
    out = tmp_path / "r"
    argv = run_argv(tiny_world, out, "--checkpoint_every", "2")
    killed = run_child(argv, kill_in=kill_in)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert RunDir(out).read_meta().status == "running"  # it had no chance to record anything
    latest = latest_checkpoint(out)
    assert read_info(latest)["step"] == expected_step
    assert {p.name for p in latest.iterdir()} == {
        "model.pt",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    }
    for name in ("model.pt", "optimizer.pt", "rng.pt"):
        torch.load(latest / name, weights_only=True)

    assert cli.main(argv) == 0
    assert_same_weights(weights(out / "adapter"), weights(uninterrupted / "adapter"))
    assert not (out / "checkpoint").exists()  # temp leftovers went with it


def test_attack_with_muon_resumes_after_sigusr1(tiny_world, tmp_path):
    """Full fine-tuning with Muon + AdamW, evaluation curve kept across the preemption."""
    argv = [
        "attack", "--model", str(tiny_world.target), "--world", str(tiny_world.root),
        "--optimizer", "muon", "--max_steps", "4", "--pdbs", "2", "--eval_every", "2",
        "--forget_tasks", "forget", "--save_model", "true", "--progress", "false",
    ]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main([*argv, "--out", str(full)]) == 0
    first = run_child([*argv, "--out", str(cut)], signal_after_step=3, signal="SIGUSR1")
    assert first.returncode == EXIT_PREEMPTED, first.stderr
    assert RunDir(cut).read_meta().status == "preempted"
    assert cli.main([*argv, "--out", str(cut)]) == 0
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert_same_weights(a, b)
    rows = [(e.step, e.task, e.metric, e.value) for e in RunDir(cut).read().evals]
    assert sorted({r[0] for r in rows}) == [0, 2, 4]
    assert {r[1] for r in rows} == {"forget"}
    assert rows == [(e.step, e.task, e.metric, e.value) for e in RunDir(full).read().evals]


def test_a_preempted_sweep_point_resumes_on_the_next_sweep(tiny_world, tmp_path, monkeypatch):
    import yaml

    from unlearn.sweep.execute import SweepPreempted, run_sweep
    from unlearn.sweep.spec import load_sweep

    spec = tmp_path / "spec.yaml"
    base = {"num_train_examples": 8, "pdbs": 2, "grad_accum": 1, "max_steps": 2, "progress": False}
    spec.write_text(
        yaml.safe_dump(
            {"name": "s", "world": str(tiny_world.root), "method": "sequential", "base": base}
        )
    )
    log = RunDir.append_metrics

    def preempt_at_step_3(self, step, values):
        log(self, step, values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler, in this process

    monkeypatch.setattr(RunDir, "append_metrics", preempt_at_step_3)
    with pytest.raises(SweepPreempted) as stopped:  # the sweep stops, exit 75 from the CLI
        run_sweep(load_sweep(spec), log=lambda _: None)
    (state,) = stopped.value.states
    assert state.status == "preempted" and not state.finished
    point = load_sweep(spec).points[0]
    started = RunDir(point.run_dir).read_meta().started

    monkeypatch.setattr(RunDir, "append_metrics", log)
    (state,) = run_sweep(load_sweep(spec), log=lambda _: None)
    assert state.status == "done"
    record = RunDir(point.run_dir).read()
    assert record.meta.started == started  # resumed in place, not cleared and restarted
    assert sorted({m.step for m in record.metrics}) == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_two_ranks_resume_after_one_rank_is_signalled(tiny_world, tmp_path, mode):
    """Only rank 0 gets SIGTERM (rank 1's run directory is in memory, so the wrapper never
    fires there): the ranks agree through an all-reduce and checkpoint at the same step."""
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.replace("plan = json.loads(sys.argv[1])", "plan = json.loads(os.environ['PLAN'])")
    )
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"

    def launch(out: Path, **plan) -> int:
        argv = run_argv(tiny_world, out, "--distributed", mode, "--pdbs", "1")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PLAN": json.dumps({"argv": argv, **plan})}
        return subprocess.run(
            [*torchrun, str(script)], env=env, capture_output=True, text=True, timeout=300
        ).returncode

    assert launch(full) == 0
    assert launch(cut, signal_after_step=5, signal="SIGTERM") != 0  # torchrun reports 1
    assert RunDir(cut).read_meta().status == "preempted"
    assert read_info(latest_checkpoint(cut))["world_size"] == 2
    assert launch(cut) == 0
    assert_same_weights(weights(cut / "adapter"), weights(full / "adapter"))
