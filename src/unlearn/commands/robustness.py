"""`unlearn robustness`: how much of the forgotten knowledge an adversary gets back.

    unlearn robustness --model /tmp/r1/model --world /tmp/w --out /tmp/rb           # quick suite
    unlearn robustness --model /tmp/r1/model --world /tmp/w --out /tmp/rb --suite standard
    unlearn robustness --model M --out D --suite my_suite.yaml --corpus bio.jsonl \\
        --benign_corpus wiki.jsonl --probe_questions bio_train.jsonl --forget_tasks heldout.jsonl \\
        --retain_tasks mmlu@500 --filtered FILTERED_MODEL --target ORIGINAL_MODEL

Runs the suite's fine-tuning attacks (each an attack run with a curve) and probes on the model,
and on the filtered twin and the original target (cached per world and suite), then writes
OUT/robustness.json: each model's worst case (the highest held-out forget accuracy over every
attack step that keeps each retain task within the suite's utility margin of its own accuracy
before the attack, and every probe), which attack reached it, and the gap to the twin. Where an
attack or probe has no result the worst case is only a lower bound, shown as such (exit 1).
See docs/robustness.md.
"""

from __future__ import annotations

from unlearn.commands.arguments import ArgumentParser
from unlearn.recipes.robustness import RobustnessArgs, run_robustness
from unlearn.report.robustness import partial_cell
from unlearn.report.tables import markdown_table, pct


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn robustness", description=__doc__)
    parser.add_arguments(RobustnessArgs, dest="args")
    args: RobustnessArgs = parser.parse_args(argv).args
    report = run_robustness(args)
    rows = []
    for label, row in report["models"].items():
        gap = row.get("gap_to_filtered")
        failed = ", ".join(row.get("failed") or [])
        worst = pct(row.get("worst_case"))
        if row.get("worst_case") is None and row.get("worst_case_lower_bound") is not None:
            worst = partial_cell(row["worst_case_lower_bound"])  # a lower bound, said so
        notes = f"failed: {failed}" if failed else ""
        if row.get("missing_families"):
            notes = f"no result from {', '.join(row['missing_families'])}; {notes}"
        rows.append([
            label, worst, row.get("worst_attack") or "-",
            "-" if gap is None else f"{gap * 100:+.2f} pts", row.get("status", "-"), notes,
        ])  # fmt: skip
    print(f"suite {report['suite']} on {report['heldout_task']} "
          f"(utility margin {report['utility_margin']:.2f})")  # fmt: skip
    print(markdown_table(["model", "worst case", "reached by", "gap to twin", "status", "notes"],
                         rows))  # fmt: skip
    print(f"wrote {args.out}/robustness.json")
    return 0 if report["models"][report["model"]].get("status") == "done" else 1
