"""The benchmarks in bench/ run: throughput on a tiny model, the GPU check's refusal without a GPU,
and the pieces they share (interleaved timing, the MFU table)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture
def bench(monkeypatch):
    """Import a bench/ script as a module (they import each other as top-level modules)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def test_interleaved_rounds_rotate_after_one_warm_up_call_each(bench):
    interleave = bench("interleave")
    calls: list[str] = []

    def run(kind: str):
        calls.append(kind)
        return interleave.Timed({"a": 1.0, "b": 2.0, "c": 3.0}[kind], 0)

    timed = interleave.interleaved(["a", "b", "c"], run, rounds=3)
    assert calls == ["a", "b", "c", *"abc", *"bca", *"cab"]  # no kind always first or last
    times = {k: [t.seconds for t in ts] for k, ts in timed.items()}
    assert interleave.ratio(times, "c", "a") == (3.0, 3.0, 3.0)
    assert interleave.ratio_cell(times, "b", "a") == "2.00 [2.00-2.00]"


def test_peak_memory_sees_an_allocation(bench):
    interleave = bench("interleave")
    peak = interleave.PeakMemory(torch.device("cpu"))
    peak.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    used = peak.stop()
    del block
    assert used >= 48 * 2**20


def test_mfu_uses_the_dense_bf16_peak_of_known_devices(bench):
    throughput = bench("throughput")
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert throughput.peak_tflops("NVIDIA H100 PCIe") == 756  # not the SXM part's peak
    assert throughput.peak_tflops("NVIDIA H200") == 989
    assert throughput.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert throughput.peak_tflops("Some Future GPU") is None
    assert throughput.mfu(100_000_000, 1_000_000, 989) == pytest.approx(6e14 / 989e12)
    assert throughput.mfu(100_000_000, 1_000_000, 989, devices=2) == pytest.approx(3e14 / 989e12)
    assert throughput.mfu(100_000_000, 1_000_000, None) is None


def test_throughput_small_times_plain_fine_tuning_beside_methods(tmp_path):
    """The same code path as the ~100M measurement, on a tiny model: a LoRA method (lens, with
    its stand-in lens) and a full fine-tuning one, each uncached and with a warm frozen cache,
    beside plain fine-tuning of each mode."""
    out = tmp_path / "throughput.md"
    argv = [sys.executable, str(BENCH / "throughput.py"), "--small", "--methods", "rmu,lens",
            "--steps", "1", "--rounds", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3])
        for line in out.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| step")
    }
    assert rows == {
        ("plain fine-tuning", "full"),
        ("plain fine-tuning", "lora"),
        ("rmu", "full"),
        ("rmu, frozen cache warm", "full"),
        ("lens", "lora"),
        ("lens, frozen cache warm", "lora"),
    }
    if not torch.cuda.is_available():
        assert "CUDA only" in out.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_gpu_check_refuses_without_a_cuda_device_in_one_line():
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert done.stderr.startswith("gpu_check: no CUDA device visible")
    assert len(done.stderr.strip().splitlines()) == 1


def test_peak_memory_sees_heap_memory_an_earlier_call_freed(bench):
    # Small blocks live in the allocator's heap, which keeps what a call freed: without handing
    # it back before the next call, that call's identical work would read as ~0 bytes.
    interleave = bench("interleave")
    peak = interleave.PeakMemory(torch.device("cpu"))
    used = []
    for _ in range(2):
        peak.start()
        blocks = [torch.ones(4096) for _ in range(4096)]  # 4096 x 16 KiB, touched
        used.append(peak.stop())
        del blocks
    assert min(used) >= 48 * 2**20, used


def test_step_cost_entries_name_a_method_and_its_run_settings(bench, tiny_world):
    step_cost = bench("step_cost")
    assert step_cost.parse_entry("rmu") == ("rmu", {})
    assert step_cost.parse_entry("rmu+lat_eps=4+lat_layers=[1]") == (
        "rmu",
        {"lat_eps": 4, "lat_layers": [1]},
    )
    with pytest.raises(ValueError, match="METHOD\\+FIELD=VALUE"):
        step_cost.parse_entry("npo+sam_rho")
    # A modifier changes the step that is timed: SAM takes a second forward and backward.
    res = step_cost.measure(str(tiny_world.root), "npo+sam_rho=0.01", "full", 1, 1, 2)
    assert set(res["times"]) == {"method", "cached", "plain"}
    assert all(t > 0 for ts in res["times"].values() for t in ts)


def test_step_cost_page_has_one_row_per_method_and_mode(bench, tmp_path):
    step_cost = bench("step_cost")
    (tmp_path / "world.json").write_text(json.dumps({"preset": "default", "seed": 3}))
    args = step_cost.argparse.Namespace(pdbs=8, world=str(tmp_path), rounds=3, steps=2)
    res = {"device": "cpu", "times": {"method": [2.0, 3.0, 2.0], "cached": [1.0, 1.0, 1.0],
                                      "plain": [1.0, 1.0, 1.0]},
           "peak_mb": {"method": 12.0, "cached": 8.0, "plain": 4.0}}  # fmt: skip
    page = step_cost.table([("rmu+lat_eps=4", "full", res)], args)
    assert page.startswith("# Step cost")
    assert "the default mini world (seed 3)" in page and str(tmp_path) not in page
    assert (
        "| rmu+lat_eps=4 | full | 1.0000 | 2.00 [2.00-3.00] | 1.00 [1.00-1.00] | 12 / 8 / 4 |"
        in page
    )


def _results_in(tmp_path, monkeypatch, bench):
    """bench/results.py with its docs/results in tmp_path/docs (the repo's pages untouched)."""
    results = bench("results")
    monkeypatch.setattr(results, "RESULTS", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    return results


def test_results_render_rewrites_a_report_page_from_its_store_and_keeps_its_timing(
    bench, tmp_path, monkeypatch
):
    from unlearn.runs.rows import RunMeta
    from unlearn.runs.store import Store

    results = _results_in(tmp_path, monkeypatch, bench)
    work = tmp_path / "work"
    results._fresh_dir(work / "calibration")
    with Store(work / "calibration" / "store.sqlite") as store:
        store.upsert_run(RunMeta(id="r1", kind="unlearn", method="npo", status="running",
                                 config={"world": str(work / "world"), "lr": 1e-4},
                                 started="2026-01-05T10:00:00+00:00",
                                 finished="2026-01-05T10:02:30+00:00"))  # fmt: skip
        store.record_eval("r1", 0, "forget", {"acc": 0.3})
        store.set_status("r1", "done")
    measured = {"commands": ["unlearn sweep"], "spec": None, "what": "w", "seconds": 400,
                "date": "2026-01-05", "machine": "x86_64"}  # fmt: skip
    (tmp_path / "docs" / "index.json").write_text(json.dumps({"calibration": measured}))

    assert results.main(["--work", str(work), "--render", "calibration"]) == 0
    page = (tmp_path / "docs" / "calibration" / "report.md").read_text()
    assert "| r1 |" in page and "2.5 min" in page  # rendered now, from the store
    assert "`world=WORK/world`" in page and str(tmp_path) not in page  # no path of this machine
    entry = json.loads((tmp_path / "docs" / "index.json").read_text())["calibration"]
    assert entry["seconds"] == 400 and entry["date"] == "2026-01-05"  # the measuring run's
    assert "rendered" in entry
    index = (tmp_path / "docs" / "README.md").read_text()
    assert f"2026-01-05 (report rendered again {entry['rendered']})" in index


def test_results_refuses_what_it_cannot_render_or_did_not_make(bench, tmp_path, monkeypatch):
    results = _results_in(tmp_path, monkeypatch, bench)
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="not a report of a results store"):
        results.render("throughput", work)
    results._fresh_dir(work / "tamper")
    with pytest.raises(SystemExit, match="no results store"):
        results.render("tamper", work)
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(SystemExit, match="not made by this script"):
        results._fresh_dir(work / "mine")
    assert (work / "mine" / "notes.txt").read_text() == "the user's"
    assert results.main(["--work", str(work), "--render", "demo"]) == 2  # never run here


def test_eval_speed_page_agrees_with_lm_eval_on_the_world_and_names_no_local_path(
    tiny_world, tmp_path
):
    out = tmp_path / "eval-speed.md"
    argv = [sys.executable, str(BENCH / "eval_speed.py"), "--world", str(tiny_world.root),
            "--mmlu", "0", "--repeats", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    page = out.read_text()
    rows = [line.split("|") for line in page.splitlines() if line.startswith("| forget")]
    assert rows and all(row[5].strip() == "yes" for row in rows)  # native == lm-eval, per task
    assert "the target of the tiny mini world (seed 0)" in page
    assert "speed ratio native/lm-eval" in page
    assert str(tiny_world.root) not in page.split("\n", 3)[3]  # only the command names it
