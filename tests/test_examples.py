"""The example specs (examples/*.yaml) and the local stand-ins generator.

Every example passes `unlearn sweep SPEC --dry-run` offline (hub models, corpora and benchmarks
are checked when a sweep runs, not by a dry run), and the hub-shaped campaign on local stand-ins
(examples/local-real.yaml, files from examples/make_local_real.py) runs end to end: sweep (2
points, each evaluated and attacked), then a report whose columns are named from the suite.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import socket
from collections import Counter
from pathlib import Path

import pytest
import yaml

from unlearn.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
POINTS = {
    "local-real.yaml": (2, 2),
    "seed-checkpoint-transfer.yaml": (38, 10),
    "seed-kl-retain.yaml": (13, 0),
    "seed-lens-muon.yaml": (10, 0),
    "seed-lens.yaml": (30, 2),
    "seed-sequential.yaml": (13, 13),
}
"""(points, points with an attack) of each example: a new example needs its counts here."""
PCT = re.compile(r"^\d{1,3}\.\d{2}%$")
BASELINE = "Target model (to unlearn)"


def _generator():
    """examples/make_local_real.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "make_local_real", EXAMPLES / "make_local_real.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local_real(tmp_path_factory) -> Path:
    """examples/local-real.yaml copied beside freshly generated stand-ins (its paths are
    relative to the spec file)."""
    root = tmp_path_factory.mktemp("local_real")
    _generator().make_local_real(root / "local-real", seed=0)
    shutil.copy(EXAMPLES / "local-real.yaml", root / "local-real.yaml")
    return root / "local-real.yaml"


@pytest.fixture
def offline(monkeypatch):
    """No hub: HF_HUB_OFFLINE set, and any network connection fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_every_example_spec_has_its_point_count():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(POINTS)


@pytest.mark.parametrize("name", sorted(POINTS))
def test_example_passes_dry_run_offline(name, request, offline, capsys):
    spec = request.getfixturevalue("local_real") if name == "local-real.yaml" else EXAMPLES / name
    points, attacked = POINTS[name]
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f": {points} point(s)" in out
    listed = [
        line
        for line in out.splitlines()
        if re.match(r"^  \S+-[0-9a-f]{6}  ", line) and not line.startswith("  baseline-")
    ]
    assert len(listed) == points
    assert sum(line.endswith("+ attack") for line in listed) == attacked


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, the |---| line dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_local_real_campaign_end_to_end(local_real, offline, capsys):
    """sweep (2 points + attacks) then report: columns named from the suite with arrows, the
    target baseline row, and percentages in the benchmark cells."""
    from unlearn.runs.rundir import RunDir

    root = local_real.parent
    sweep_dir = root / "local-real" / "sweep"
    assert main(["sweep", str(local_real)]) == 0
    attacks = sorted(sweep_dir.glob("*-attack"))
    assert len(attacks) == 2
    assert all(RunDir(a).read().meta.status == "done" for a in attacks)

    report = root / "report"
    assert main(["report", "--store", str(sweep_dir / "store.sqlite"), "--out", str(report)]) == 0
    text = (report / "report.md").read_text()

    def column(headers: list[str], name: str, arrow: str) -> int | None:
        found = [i for i, h in enumerate(headers) if name in h.lower() and arrow in h]
        return found[0] if found else None

    tables = [
        t
        for t in _tables(text)
        if column(t[0], "wmdp", "(↓)") is not None and column(t[0], "mmlu", "(↑)") is not None
    ]
    assert tables, f"no table with WMDP (↓) and MMLU (↑) columns in:\n{text}"
    with_baseline = [t for t in tables if any(r[0] == BASELINE for r in t[1:])]
    table = max(with_baseline, key=len, default=None)  # the method's table: baseline + points
    assert table is not None, f"no {BASELINE!r} row in a results table:\n{text}"
    headers, rows = table[0], table[1:]
    forget, retain = column(headers, "wmdp", "(↓)"), column(headers, "mmlu", "(↑)")
    assert len(rows) >= 3  # the baseline and the two points
    for row in rows:
        assert PCT.match(row[forget]) and PCT.match(row[retain]), (headers, row)


def test_generator_is_deterministic_and_writes_the_schemas(tmp_path):
    make = _generator().make_local_real
    a, b, c = make(tmp_path / "a", seed=0), make(tmp_path / "b", seed=0), make(tmp_path / "c", 1)
    files = [
        "forget.jsonl", "retain.jsonl", "attack.jsonl", "wmdp_bio_robust.jsonl", "mmlu.jsonl",
        "model/model.safetensors", "model/tokenizer.json", "model/config.json",
    ]  # fmt: skip

    def digest(root: Path, name: str) -> str:
        return hashlib.sha256((root / name).read_bytes()).hexdigest()

    assert [digest(a, f) for f in files] == [digest(b, f) for f in files]
    assert digest(a, "mmlu.jsonl") != digest(c, "mmlu.jsonl")

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (a / name).read_text().splitlines()]

    for name, n in (("wmdp_bio_robust.jsonl", 40), ("mmlu.jsonl", 60)):
        questions = rows(name)
        assert len(questions) == n
        for q in questions:
            assert set(q) == {"question", "choices", "answer"}
            assert len(q["choices"]) == len(set(q["choices"])) == 4
            assert q["answer"] in range(4)
        # Balanced answer positions: always picking one letter scores 25%.
        assert set(Counter(q["answer"] for q in questions).values()) == {n // 4}
    for name in ("forget.jsonl", "retain.jsonl", "attack.jsonl"):
        docs = rows(name)
        assert 24 <= len(docs) <= 60
        assert all(set(d) == {"text"} and d["text"] for d in docs)
    config = json.loads((a / "model" / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        4,
        64,
    )


def test_local_real_search_and_its_best_config_replay(local_real, offline):
    """A boundary search without a world (a tiny random Llama, local corpora and question files
    in the benchmarks' schema), then `unlearn run --config best.yaml` trains the best trial's
    configuration again to the same result."""
    from unlearn.eval.split import part_indices
    from unlearn.runs.rundir import RunDir
    from unlearn.search.outputs import collect
    from unlearn.search.spec import load_search
    from unlearn.search.study import open_study

    root = local_real.parent
    campaign = yaml.safe_load(local_real.read_text())
    spec = {
        "name": "local-search",
        "out": "local-real/search",
        "method": "lens",
        "base": {k: v for k, v in campaign["base"].items() if k != "lr"},
        "eval": campaign["eval"],
        "baselines": campaign["baselines"],
        # Steps large enough to move a random model's forget accuracy below the target's: a
        # search whose trials unlearned nothing names no best trial.
        "space": {"lr": {"log": [0.1, 0.3]}},
        "goal": "boundary",
        "delta": 0.5,  # a random model's accuracies are noise: every trial satisfies this
        "budget": 2,
    }
    path = root / "local-search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["search", str(path)]) == 0
    out = root / "local-real" / "search"
    text = (out / "search.md").read_text()
    assert "Wmdp Bio Robust (↓)" in text or "WMDP Bio Robust (↓)" in text
    assert "Target model (to unlearn)" in text
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"].endswith("local-real/model") and "world" not in best
    search = load_search(path)
    best_trial = collect(search, open_study(search, create=False)).best
    trial = RunDir(out / "trials" / best_trial.run_id).read()
    replay = root / "replay"
    assert main(["run", "--config", str(out / "best.yaml"), "--out", str(replay)]) == 0

    def final(run):
        last = max(e.step for e in run.evals)
        return {e.task: e.value for e in run.evals if e.step == last and e.metric == "acc"}

    # The trial scored each task in its selection and report parts, the replay the whole task.
    replayed, parts = final(RunDir(replay).read()), final(trial)
    for task, n in (("wmdp_bio_robust", 40), ("mmlu", 60)):
        sizes = {p: len(part_indices(n, p)) for p in ("select", "report")}
        combined = sum(parts[f"{task}#{p}"] * k for p, k in sizes.items()) / n
        assert replayed[task] == pytest.approx(combined)
