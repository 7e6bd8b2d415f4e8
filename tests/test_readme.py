"""The README is a short manual whose tables come from the code: the methods table from the
registry, the commands table from the CLI's command list."""

from __future__ import annotations

import re
from pathlib import Path

import unlearn.methods  # noqa: F401  (registers every method)
from unlearn.cli import commands_table
from unlearn.methods.registry import methods_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_tables_are_the_generated_ones():
    text = README.read_text()
    assert methods_table() in text, "paste unlearn.methods.registry.methods_table() into README"
    assert commands_table() in text, "paste unlearn.cli.commands_table() into README"


def test_readme_is_a_short_manual_for_users():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\bissues? [0-9]+", text, re.IGNORECASE)
    assert "the seeds" not in text.lower()
    assert "make demo" in text and "make test" in text
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)", README.read_text()):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
