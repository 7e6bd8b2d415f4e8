"""Regenerate the result pages in docs/results/ with the tool itself (`make results`).

    python bench/results.py                      # every page (hours on a 2-core CPU)
    python bench/results.py demo search/pareto-robust

Each page is a list of `unlearn` commands run in a work directory (default out/results), then
the files the tool wrote are copied into docs/results/PAGE/ (replacing that page only). The
mini world is built once, in WORK/world, and every page uses it. docs/results/README.md is the
index: every page with the commands that produced it, its wall time and its date; the timings
of pages not regenerated this time are kept from their last run (docs/results/index.json).

A page's work directory is removed before its commands run, so a timing never measures a
resume; only directories this script created (they hold its marker file) are removed.

    python bench/results.py --render demo tamper # the reports again, from the pages' stores

`--render` writes a report page again from the results store its last run left in WORK (`unlearn
report`), without running anything else: for a change in how reports are written. The page
keeps the wall time and date of the run that measured it; the index adds the date of the
rendering.
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
from dataclasses import dataclass
from pathlib import Path

import yaml

from unlearn.methods.registry import method_names

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
MARKER = ".made-by-bench-results"


@dataclass(frozen=True)
class Page:
    commands: tuple[tuple[str, ...], ...]
    """`unlearn` argument lists; {work} is the page's work directory, {world} the world, {spec}
    the page's spec rewritten to use them."""
    files: tuple[str, ...]
    """Files copied from the page's output directory (relative to {work})."""
    spec: str | None = None
    """A sweep or search spec (repo-relative) whose `world` and `out` the script points at its
    own directories."""
    what: str = ""
    accept: tuple[int, ...] = (0,)
    """Exit codes that still produce the page (a search with no trial that meets its goal
    exits 1, and its front is the result)."""
    optional: tuple[str, ...] = ()
    """Files of `files` that may be missing (a search without a best trial has no best.yaml)."""
    report: str | None = None
    """Where (relative to {work}) the page's commands write a report of the results store
    {work}/store.sqlite: the page `--render` can write again."""
    preset: str = "default"
    """The mini world preset of {world}: default (WORK/world, the research world) or small
    (WORK/world-small, the demo's)."""


DEMO_FILES = ("report.md", "forget_vs_retain.png", "robustness_curves.png")
STEP_COST_METHODS = ",".join([*method_names(), "rmu+lat_eps=4", "npo+sam_rho=0.01"])
"""Every method, and the two step modifiers at the tamper campaign's settings."""
SEARCH_FILES = ("out/search.md", "out/best.yaml", "out/pareto.png")


def _search(name: str) -> Page:
    return Page(
        (("search", "{spec}", "--workers", "2"),),
        SEARCH_FILES,
        spec=f"examples/searches/{name}.yaml",
        what=f"the search spec examples/searches/{name}.yaml",
        accept=(0, 1),
        optional=("out/best.yaml",),
    )


def _calibration(name: str, whose: str, preset: str = "default") -> Page:
    """A sweep of calibration grids (examples/results/NAME.yaml) and its report."""
    return Page(
        (
            ("sweep", "{spec}", "--workers", "2"),
            ("report", "--store", "{work}/store.sqlite", "--out", "{work}/report"),
        ),
        ("report/report.md", "report/forget_vs_retain.png"),
        spec=f"examples/results/{name}.yaml",
        what=f"the grids {whose}' defaults were chosen from",
        report="report",
        preset=preset,
    )


PAGES = {
    "demo": Page(
        (("demo", "--world", "{world}", "--out", "{work}"),),
        DEMO_FILES,
        what="`make demo` on its small world: the three seed methods, `quick` robustness suite",
        report=".",
        preset="small",
    ),
    "demo-default": Page(
        (("demo", "--world", "{world}", "--out", "{work}"),),
        DEMO_FILES,
        what="the three seed methods at their defaults, `quick` robustness suite",
        report=".",
    ),
    "baselines": Page(
        (("demo", "--campaign", "baselines", "--world", "{world}", "--out", "{work}"),),
        DEMO_FILES,
        what="the field's baselines at their defaults, `quick` robustness suite",
        report=".",
    ),
    "tamper": Page(
        (("demo", "--campaign", "tamper", "--world", "{world}", "--out", "{work}"),),
        DEMO_FILES,
        what="the tamper-resistant methods at their defaults and two step modifiers, `quick`",
        report=".",
    ),
    "robustness-standard": Page(
        (("demo", "--suite", "standard", "--world", "{world}", "--out", "{work}"),),
        DEMO_FILES,
        what="the three seed methods at their defaults, `standard` robustness suite",
        report=".",
    ),
    "tamper-standard": Page(
        (
            (
                "demo",
                "--campaign",
                "tamper",
                "--suite",
                "standard",
                "--world",
                "{world}",
                "--out",
                "{work}",
            ),
        ),
        DEMO_FILES,
        what="the tamper-resistant methods and two step modifiers, `standard` robustness suite",
        report=".",
    ),
    "calibration": _calibration("calibration", "the seed methods"),
    "calibration-tamper": _calibration("calibration-tamper", "the tamper-resistant methods"),
    "calibration-small": _calibration(
        "calibration-small", "the demo's settings on the small world", "small"
    ),
    "training-memory": Page(
        (("python", "bench/memory.py", "--out", "{work}/report.md"),),
        ("report.md",),
        what="peak memory with and without activation checkpointing, bf16 against float32",
    ),
    "throughput": Page(
        (
            (
                "python",
                "bench/throughput.py",
                "--pdbs",
                "2",
                "--rounds",
                "3",
                "--steps",
                "1",
                "--out",
                "{work}/report.md",
            ),
        ),
        ("report.md",),
        what="every method's step beside plain fine-tuning on a ~100M Llama at 512 tokens",
    ),
    "step-cost": Page(
        (
            (
                "python",
                "bench/step_cost.py",
                "--world",
                "{world}",
                "--modes",
                "full",
                "--methods",
                STEP_COST_METHODS,
                "--out",
                "{work}/report.md",
            ),
        ),
        ("report.md",),
        what="one optimizer step of each method (and step modifier) beside plain fine-tuning",
    ),
    "eval-speed": Page(
        (
            (
                "python",
                "bench/eval_speed.py",
                "--world",
                "{world}",
                "--mmlu",
                "1000",
                "--out",
                "{work}/report.md",
            ),
        ),
        ("report.md",),
        what="the native evaluator against lm-eval: the same accuracies, and the speed ratio",
    ),
    "demo-cold": Page(
        (("python", "bench/demo_cold.py", "--out", "{work}/report.md"),),
        ("report.md",),
        what="`make venv` and `make demo` on a fresh clone of the committed HEAD, timed",
    ),
    **{
        f"search/{name}": _search(name)
        for name in (
            "boundary-lens",
            "boundary-checkpoint-transfer",
            "boundary-sequential",
            "pareto-robust",
            "pareto-tamper",
        )
    },
}


def _fresh_dir(path: Path) -> None:
    """An empty directory at `path`, removing only one this script made before."""
    if path.exists():
        if not (path / MARKER).exists():
            sys.exit(f"results: {path} exists and was not made by this script; move it away")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by bench/results.py\n")


def world_dir(work_root: Path, preset: str) -> Path:
    """Where the shared world of `preset` lives in the work directory."""
    return work_root / ("world" if preset == "default" else f"world-{preset}")


def _point_spec(page: Page, work: Path, world: Path) -> Path:
    """The page's spec with `world` and `out` (and a sweep's `store`) in `work`."""
    spec = yaml.safe_load((ROOT / page.spec).read_text())
    spec["world"] = str(world)
    spec["out"] = str(work / "out")
    if "sweeps" in spec:
        spec["store"] = str(work / "store.sqlite")
    path = work / Path(page.spec).name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(argv: list[str], log, accept: tuple[int, ...] = (0,)) -> None:
    shown = " ".join(argv) if argv[0] == "python" else "unlearn " + " ".join(argv)
    print("$ " + shown, flush=True)
    log.write("$ " + shown + "\n")
    log.flush()
    if argv[0] == "python":  # a bench script of this repository
        command = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    else:
        command = [str(Path(sys.executable).with_name("unlearn")), *argv]
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode not in accept:
        sys.exit(f"results: `{shown}` exited {done.returncode} (log: {log.name})")


def _publish(page_name: str, files: dict[str, Path], work_root: Path) -> None:
    """Replace docs/results/PAGE with `files`, atomically (temp dir, then rename). In markdown
    pages the work directory reads WORK (as in the index) and paths in this checkout are
    relative to it: a page names no path of the machine that made it."""
    target = RESULTS / page_name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    for name, source in files.items():
        if name.endswith(".md"):
            text = source.read_text().replace(str(work_root), "WORK")
            (tmp / name).write_text(text.replace(f"{ROOT}/", ""))
        else:
            shutil.copy2(source, tmp / name)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def regenerate(name: str, work_root: Path, resume: bool = False) -> dict:
    """Run the page's commands in a fresh work directory and publish its files. With `resume`
    a work directory this script made is kept: a sweep or search picks up where an interrupted
    run stopped, and the wall time counts from that run's start."""
    page = PAGES[name]
    work, world = work_root / name, world_dir(work_root, page.preset)
    started = None
    if resume and (work / MARKER).exists():
        started = (work / MARKER).stat().st_mtime
    else:
        _fresh_dir(work)
    spec = _point_spec(page, work, world) if page.spec else None
    commands = [
        [a.format(work=work, world=world, spec=spec) for a in argv] for argv in page.commands
    ]
    load = os.getloadavg()[0]  # other work on the machine slows a page down: say how busy it was
    t0 = time.time() if started is None else started
    with open(work / "commands.log", "a" if started else "w") as log:
        for argv in commands:
            _run(argv, log, page.accept)
    seconds = time.time() - t0
    _publish(name, _page_files(name, work), work_root)
    shown = [" ".join(argv).replace(str(work_root), "WORK") for argv in commands]
    return {
        "commands": [c if c.startswith("python") else f"unlearn {c}" for c in shown],
        "spec": page.spec,
        "what": page.what,
        "seconds": round(seconds),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at start",
    }


def _page_files(name: str, work: Path) -> dict[str, Path]:
    """The files of page `name` in its work directory, by published name (exits when the tool
    did not write one the page needs)."""
    page = PAGES[name]
    files = {Path(f).name: work / f for f in page.files}
    files = {
        n: p
        for n, p in files.items()
        if p.is_file() or str(p.relative_to(work)) not in page.optional
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"results: page {name}: the tool wrote no {', '.join(missing)}")
    return files


def render(name: str, work_root: Path) -> str:
    """Write page `name`'s report again from the store its last run left in its work
    directory, publish it, and return the date of the rendering."""
    page, work = PAGES[name], work_root / name
    if page.report is None:
        sys.exit(f"results: page {name} is not a report of a results store: run it instead")
    store = work / "store.sqlite"
    if not (work / MARKER).exists() or not store.is_file():
        sys.exit(f"results: page {name} has no results store in {work} to render: run it first")
    with open(work / "commands.log", "a") as log:
        _run(["report", "--store", str(store), "--out", str(work / page.report)], log)
    _publish(name, _page_files(name, work), work_root)
    return datetime.date.today().isoformat()


def write_index(entries: dict[str, dict]) -> None:
    (RESULTS / "index.json").write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Results",
        "",
        "Every page here was produced by the tool; `make results` regenerates them all",
        '(`make results PAGES="demo search/pareto-robust"` some of them) with',
        "bench/results.py, which writes this index. WORK is its work directory (out/results).",
        "The mini worlds are built once each (seed 0): the default preset's, the research world",
        "of most pages, with `unlearn world build --out WORK/world`"
        f" ({entries.get('_world', {}).get('seconds', 'not yet timed')} s), and the small",
        "preset's, `make demo`'s, with `unlearn world build --preset small --out WORK/world-small`"
        f" ({entries.get('_world-small', {}).get('seconds', 'not yet timed')} s).",
        "`make results RENDER=1` writes the report pages again from the results stores their",
        "last run left in WORK (`unlearn report`), keeping that run's wall time and date.",
        "",
        "| page | what | commands | wall time | date | machine |",
        "|---|---|---|---|---|---|",
    ]
    for name, page in PAGES.items():
        e = entries.get(name)
        path = f"{name}/search.md" if name.startswith("search/") else f"{name}/report.md"
        if e is None:  # a page from before this script: its commands, no timing yet
            spec = f"WORK/{name}/{Path(page.spec).name}" if page.spec else None
            world = world_dir(Path("WORK"), page.preset)
            shown = [
                ("" if argv[0] == "python" else "unlearn ")
                + " ".join(argv).format(work=f"WORK/{name}", world=world, spec=spec)
                for argv in page.commands
            ]
            e = {"commands": shown, "spec": page.spec, "what": page.what, "seconds": None,
                 "date": "not yet run by `make results`", "machine": "-"}  # fmt: skip
        commands = "<br>".join(f"`{c}`" for c in e["commands"])
        if e.get("spec"):
            commands += f"<br>(spec: {e['spec']})"
        minutes = "-" if e["seconds"] is None else f"{e['seconds'] / 60:.0f} min"
        date = e["date"] + (f" (report rendered again {e['rendered']})" if "rendered" in e else "")
        lines.append(
            f"| [{name}]({path}) | {e['what']} | {commands} | {minutes} | {date} | {e['machine']} |"
        )
    timed = [e["seconds"] for n, e in entries.items() if n in PAGES and e["seconds"] is not None]
    total = f"{sum(timed) / 3600:.1f} h" if timed else "-"
    lines += [
        "",
        f"Wall time of the {len(timed)} timed pages, one after another: {total}.",
        "",
        "Not made by `make results`: [gpu-check.md](gpu-check.md), the GPU check "
        "(`bash bench/gpu_check.sh`), which needs a machine with CUDA devices.",
        "",
    ]
    (RESULTS / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help=f"pages (default: all): {', '.join(PAGES)}")
    parser.add_argument("--work", default=str(ROOT / "out" / "results"))
    parser.add_argument("--index", action="store_true", help="only rewrite docs/results/README.md")
    parser.add_argument("--render", action="store_true",
                        help="write the pages' reports again from the results stores their last"
                        " runs left in WORK, keeping those runs' timings")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="keep each page's work directory: an interrupted sweep or search"
                        " goes on where it stopped")  # fmt: skip
    args = parser.parse_args(argv)
    unknown = [p for p in args.pages if p not in PAGES]
    if unknown:
        print(f"results: unknown page {unknown[0]!r} (choose from {', '.join(PAGES)})",
              file=sys.stderr)  # fmt: skip
        return 2
    work = Path(args.work).resolve()
    index = RESULTS / "index.json"
    entries = json.loads(index.read_text()) if index.exists() else {}
    if args.index:
        write_index(entries)
        return 0
    if args.render:
        names = args.pages or [n for n, p in PAGES.items() if p.report is not None]
        for name in names:
            if name not in entries:
                print(f"results: page {name} was never run by this script: run it first",
                      file=sys.stderr)  # fmt: skip
                return 2
            entries[name] = {**entries[name], "rendered": render(name, work)}
            write_index(entries)
            print(f"results: {name}: report rendered again", flush=True)
        return 0
    mine: dict[str, dict] = {}  # the entries this process measured
    names = args.pages or list(PAGES)
    for preset in dict.fromkeys(PAGES[name].preset for name in names):
        world = world_dir(work, preset)
        if not (world / "world.json").exists():
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(work / f"{world.name}-build.log", "w") as log:
                _run(["world", "build", "--preset", preset, "--out", str(world)], log)
            mine[f"_{world.name}"] = {"seconds": round(time.time() - t0)}
            entries.update(mine)
    for name in names:
        mine[name] = regenerate(name, work, args.resume)
        # Re-read: another `make results` may have published a page since this one started.
        entries = {**(json.loads(index.read_text()) if index.exists() else {}), **mine}
        write_index(entries)
        print(f"results: {name}: {entries[name]['seconds']} s", flush=True)
    write_index(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
