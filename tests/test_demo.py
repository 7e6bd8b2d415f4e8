"""`unlearn demo` on the tiny world: the whole campaign, then its report."""

from __future__ import annotations

from unlearn.cli import main as cli


def test_demo_smoke_on_tiny_world(tiny_world, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli(["demo", "--preset", "tiny", "--world", str(tiny_world.root), "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    for needle in ("Target (to unlearn)", "Filtered twin", "lens", "checkpoint_transfer",
                   "sequential", "Tamper"):  # fmt: skip
        assert needle in report, needle
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 2
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "store.sqlite").exists() and (out / "sweep.yaml").exists()
    # Re-running resumes: nothing is trained again.
    capsys.readouterr()
    assert (
        cli(["demo", "--preset", "tiny", "--world", str(tiny_world.root), "--out", str(out)]) == 0
    )
    err = capsys.readouterr().err
    assert "finished earlier" in err and "done earlier" in err
