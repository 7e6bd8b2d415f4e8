"""`make demo` on a fresh clone, timed: the README's first command as a new user runs it.

    python bench/demo_cold.py --out docs/results/demo-cold/report.md [--keep DIR]

Clones this repository's committed HEAD into a temporary directory, runs `make venv` there (the
environment a fresh machine builds: pip's download cache is reused, nothing else) and then
`make demo`, each timed separately, and writes a markdown page: the commit, both wall times,
the demo's stages (world build from world.json's stats, then the campaign), the machine and its
load, and the demo's own summary table. Uncommitted changes are not in the clone: commit first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 400
"""The wall-time budget of `make demo` cold on the 2-core machine it is measured on: the demo
shares a 10-minute budget, and machines of the same kind differ by 1.5x in speed."""


def _timed(argv: list[str], cwd: Path, log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as out:
        done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"demo_cold: `{' '.join(argv)}` exited {done.returncode} (log: {log})")
    return time.time() - t0


def _summary(log: Path) -> list[str]:
    """The demo's terminal summary: its markdown table lines."""
    return [line for line in log.read_text().splitlines() if line.startswith("|")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown page to write")
    parser.add_argument("--keep", help="clone here and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="demo-cold-"))
    clone = base / "unlearn"
    if clone.exists():
        sys.exit(f"demo_cold: {clone} exists; give another --keep")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Threads are the Makefile's and the tool's own choice, as for a user.
    env_note = {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}
    load = os.getloadavg()[0]
    venv_s = _timed(["make", "venv"], clone, logs / "venv.log")
    demo_s = _timed(["make", "demo"], clone, logs / "demo.log")
    world = json.loads((clone / "out" / "demo" / "world" / "world.json").read_text())
    stats = world["stats"]
    world_s = stats["seconds"]["total"]

    lines = [
        "# `make demo` on a fresh clone",
        "",
        f"Produced by `python bench/demo_cold.py --out {args.out}` on "
        f"{datetime.date.today().isoformat()}: commit `{commit[:12]}`"
        + (" (the working tree had uncommitted changes, not measured)" if dirty else "")
        + f", {platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at start"
        + (f", {env_note}" if env_note else "")
        + ".",
        "",
        "| stage | wall time |",
        "|---|---|",
        f"| `make venv` (pip's download cache reused) | {venv_s:.0f} s |",
        f"| `make demo` | **{demo_s:.0f} s** (budget {BUDGET_S} s) |",
        f"| of which the world build ({world['preset']} preset) | {world_s:.0f} s"
        f" (phase 1 {stats['seconds']['phase1']:.0f} s,"
        f" phase 2 side by side {stats['seconds']['phase2_wall']:.0f} s) |",
        f"| of which the campaign and report | {demo_s - world_s:.0f} s |",
        "",
        "The demo's summary:",
        "",
        *_summary(logs / "demo.log"),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
