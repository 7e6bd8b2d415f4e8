"""Saved models through lm-eval in a child process, killed when it runs past a timeout.

    results = run_saved("path/or/hub-id", ["mmlu"], options=HarnessOptions(timeout=3600))

The child (`python -m unlearn.eval.saved REQUEST OUT`) loads the model, prepares the tasks with
`unlearn.eval.harness` and appends one JSON line per finished task, so the parent keeps every
result finished before a timeout or a crash; the unfinished tasks are failed with the reason,
never scored. Bad input the child finds (unknown task, missing dataset) comes back as a
UsageError. The child runs in its own session, so a timeout kills its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.eval.harness import HarnessOptions, evaluate_prepared, prepare_tasks
from unlearn.models.load import default_device, load_model, load_tokenizer
from unlearn.models.refs import resolve_model


@dataclass(frozen=True)
class SavedRequest:
    """What the child process evaluates (written as JSON for it)."""

    model: str
    tasks: list[str]
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    questions: dict[str, str] | None = None
    """The world's question files by task (the harness needs no more of a world)."""
    local: dict[str, list[str]] = field(default_factory=dict)
    """Question files by task name: {name: [schema, path]}."""
    include_path: list[str] = field(default_factory=list)
    batch_size: int = 64
    limit: int | None = None
    num_fewshot: int | None = None


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(line.strip() for line in text[-lines:] if line.strip()) or "no output"


def run_saved(
    model: str,
    names: Sequence[str],
    world=None,
    options: HarnessOptions | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    include_path: Sequence[str | os.PathLike] = (),
    trust_remote_code: bool = False,
    local: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, dict]:
    """Evaluate a saved model (directory or hub id) in a child process, with options.timeout.

    Tasks finished before a timeout or a crash keep their results; the rest are failed with the
    reason. Bad input found by the child (unknown task, missing dataset) is re-raised here as a
    UsageError.
    """
    options = options or HarnessOptions()
    request = SavedRequest(
        model=str(model),
        tasks=list(names),
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        questions=(
            {task: str(path) for task, path in world.questions.items()}
            if world is not None
            else None
        ),
        local={n: [kind, str(Path(path).absolute())] for n, (kind, path) in (local or {}).items()},
        include_path=[str(Path(p).absolute()) for p in include_path],
        batch_size=options.batch_size,
        limit=options.limit,
        num_fewshot=options.num_fewshot,
    )
    with tempfile.TemporaryDirectory(prefix="unlearn-lm-eval-") as tmp:
        req, out, log = Path(tmp, "request.json"), Path(tmp, "results.jsonl"), Path(tmp, "log")
        req.write_text(json.dumps(asdict(request)))
        with log.open("w") as log_file:
            # Own session: on timeout the whole process group (any workers too) is killed.
            proc = subprocess.Popen(
                [sys.executable, "-m", "unlearn.eval.saved", str(req), str(out)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=options.timeout)
                reason = f"lm-eval process exited with code {code}: {_tail(log)}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
                reason = f"timed out after {options.timeout:g} s"
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    for row in rows:
        if "usage_error" in row:
            raise UsageError(row["usage_error"])
    results = {row["task"]: row["result"] for row in rows}
    for name in names:
        if name not in results:
            results[name] = {"status": "failed", "error": reason}
    return results


@dataclass(frozen=True)
class WorldTasks:
    """What `prepare_tasks` reads of a world: its question files by task (the child process
    gets just these, so this module never loads, nor imports, the world)."""

    questions: dict[str, str]


def _child_main(request_file: str, out_file: str) -> int:
    """Child process: load the model, run each task, append one JSON line per finished task."""
    request = SavedRequest(**json.loads(Path(request_file).read_text()))
    out = Path(out_file)

    def emit(row: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    options = HarnessOptions(request.batch_size, request.limit, request.num_fewshot)
    try:
        world = WorldTasks(request.questions) if request.questions is not None else None
        local = {name: (kind, path) for name, (kind, path) in request.local.items()}
        prepared = prepare_tasks(request.tasks, world, request.include_path, local)
        ref = resolve_model(request.model, request.revision, request.trust_remote_code)
    except UsageError as e:
        emit({"usage_error": str(e)})
        return 2
    model = load_model(ref, request.dtype, default_device())
    tokenizer = load_tokenizer(ref)
    evaluate_prepared(
        model, tokenizer, prepared, options, lambda name, r: emit({"task": name, "result": r})
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:3]))
