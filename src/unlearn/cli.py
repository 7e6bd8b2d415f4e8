"""`unlearn` command line: a thin dispatcher over the subcommand modules in unlearn.commands.

Each subcommand module has `main(argv=None) -> int`, so tests and sweeps call them in process.
Bad input anywhere raises UsageError, printed here as one line with exit code 2.
"""

from __future__ import annotations

import importlib
import sys

from unlearn.errors import UsageError
from unlearn.quiet import quiet_libraries

COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("unlearn.commands.world", "build the mini world (corpus, tokenizer, models)"),
    "eval": ("unlearn.commands.eval", "evaluate a model on forget/retain questions"),
    "fit-lens": ("unlearn.commands.fit_lens", "train tuned lenses for a model"),
    "fit-affine": ("unlearn.commands.fit_affine", "fit ridge affine maps source -> target"),
    "checkpoints": ("unlearn.commands.checkpoints", "find the latest checkpoint still at chance"),
    "run": ("unlearn.commands.run", "unlearn with a method (lens, checkpoint_transfer, ...)"),
    "distill": ("unlearn.commands.distill", "UNDO: perturb an unlearned model, distil it back"),
    "attack": ("unlearn.commands.attack", "fine-tuning (tamper) attack with an eval curve"),
    "robustness": ("unlearn.commands.robustness", "worst case over attacks and probes vs the twin"),
    "sweep": ("unlearn.commands.sweep", "run a grid of runs -> eval -> attack"),
    "search": ("unlearn.commands.search", "Optuna search: forget/retain boundary or Pareto front"),
    "report": ("unlearn.commands.report", "markdown tables and plots from a results store"),
    "push": ("unlearn.commands.push", "upload a run's model and its model card to the hub"),
    "demo": ("unlearn.commands.demo", "the whole campaign on the mini world"),
}


def commands_table() -> str:
    """The README's commands table, from COMMANDS (a test checks that the README holds it)."""
    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| `unlearn {c}` | {help_} |" for c, (_, help_) in COMMANDS.items()]
    return "\n".join(rows) + "\n"


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: unlearn COMMAND [options]   (unlearn COMMAND --help for its options)", ""]
    lines += [f"  {c:<{width}}  {help_}" for c, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from unlearn import __version__

        print(f"unlearn {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unlearn: error: unknown command {command!r} (see unlearn --help)", file=sys.stderr)
        return 2
    quiet_libraries()
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except UsageError as e:
        print(f"unlearn {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unlearn {command}: interrupted", file=sys.stderr)
        return 130
