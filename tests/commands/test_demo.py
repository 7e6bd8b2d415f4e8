"""`unlearn demo` on the tiny world: the whole campaign, then its report."""

from __future__ import annotations

from unlearn.cli import main as cli


def test_demo_smoke_on_tiny_world(tiny_world, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli(["demo", "--preset", "tiny", "--world", str(tiny_world.root), "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    for needle in ("Target (to unlearn)", "Filtered twin", "lens", "checkpoint_transfer",
                   "sequential", "## Robustness scorecard", "linear probe"):  # fmt: skip
        assert needle in report, needle
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["forget_vs_retain.png", "robustness_curves.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "store.sqlite").exists() and (out / "sweep.yaml").exists()
    # The terminal gets a summary (baselines and best runs, the robustness scorecard), not the
    # report; its last line is where the report is.
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.md'}"
    text = "\n".join(printed)
    assert "## Baselines and the best run of each method" in text
    assert "## Robustness scorecard" in text and "## Tamper attacks" not in text
    # Every method's best run and both references went through the suite, with a number.
    scorecard = text.split("## Robustness scorecard", 1)[1]
    rows = [line for line in scorecard.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 5 and all("| done |" in row for row in rows)
    assert "## Method `lens`" not in text  # the per-method tables stay in report.md
    # Re-running resumes: nothing is trained again.
    capsys.readouterr()
    assert (
        cli(["demo", "--preset", "tiny", "--world", str(tiny_world.root), "--out", str(out)]) == 0
    )
    err = capsys.readouterr().err
    assert "finished earlier" in err and "done earlier" in err


def test_every_campaign_has_valid_sweeps_on_every_preset(tiny_world, tmp_path):
    """Each campaign's sweep entries for each preset validate on a world (the small preset's
    calibrated settings included); a preset without entries of its own gets the default
    preset's (documented defaults)."""
    from unlearn.commands.demo import CAMPAIGNS, DemoConfig, campaign_sweeps
    from unlearn.recipes.campaign import write_spec
    from unlearn.sweep.spec import load_sweep
    from unlearn.world.presets import PRESETS

    assert DemoConfig().preset == "small"
    small = {
        (p["method"], tuple(sorted(p.get("base", {})))) for p in campaign_sweeps("seed", "small")
    }
    assert ("sequential", ("lr", "num_train_examples", "remove_coef")) in small
    assert campaign_sweeps("baselines", "small") == CAMPAIGNS["baselines"]["default"]
    for campaign in CAMPAIGNS:
        for preset in PRESETS:
            entries = campaign_sweeps(campaign, preset)
            spec = write_spec(tmp_path / campaign / preset / "sweep.yaml", tiny_world.root,
                              entries, f"demo-{campaign}")  # fmt: skip
            methods = {p.method for p in load_sweep(spec).points}
            assert methods == {e["method"] for e in entries}
