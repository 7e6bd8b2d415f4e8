"""Every command's --help: it prints, exits 0, and names each positional argument."""

from __future__ import annotations

import pytest

from unlearn import cli
from unlearn.cli import COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_help_that_names_its_arguments(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert f"unlearn {command}" in shown
    # A positional argument without a metavar is listed by simple-parsing as "None".
    assert not any(line.split()[:1] == ["None"] for line in shown.splitlines()), shown
