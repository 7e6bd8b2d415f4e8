"""A method is one file: a module dropped into unlearn/methods/ is registered, listed in
`unlearn run --help` and runs, with no other edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import unlearn.methods

METHODS_DIR = Path(unlearn.methods.__file__).parent


def _unlearn(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unlearn", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_copied_method_file_is_registered_listed_and_runs(tiny_world, tmp_path):
    original = (METHODS_DIR / "grad_diff.py").read_text()
    copy = original.replace('name = "grad_diff"', 'name = "grad_diff_copy"')
    assert copy != original
    new = METHODS_DIR / "grad_diff_copy.py"
    assert not new.exists()
    new.write_text(copy)
    try:
        shown = _unlearn("run", "--help")
        assert shown.returncode == 0 and "grad_diff_copy" in shown.stdout
        out = tmp_path / "run"
        done = _unlearn("run", "--method", "grad_diff_copy", "--world", str(tiny_world.root),
                        "--out", str(out), "--max_steps", "2", "--num_train_examples", "8",
                        "--progress", "false", "--eval", "false")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        record = json.loads((out / "run.json").read_text())
        assert record["method"] == "grad_diff_copy" and record["status"] == "done"
        assert (out / "model" / "config.json").exists()
    finally:
        new.unlink(missing_ok=True)
        for cached in (METHODS_DIR / "__pycache__").glob("grad_diff_copy.*"):
            cached.unlink()
