"""`unlearn push`: upload a run's saved model, with its model card, to the Hugging Face hub.

    unlearn push /tmp/r1 --repo me/r1-lens
    unlearn push /tmp/r1 --repo my-org/r1-lens --private true --revision step-100
    unlearn push /tmp/r1 --repo me/r1-lens-adapter --adapter true        # RUN/adapter (LoRA)

Uploads RUN/model (or RUN/adapter) in one commit with huggingface_hub, README.md (the model
card: base model, method and config, data, the evaluation suite's results, the robustness worst
case once run) included. The token is --token, HF_TOKEN or the one `hf auth login` stored. Bad
input, no token, offline (HF_HUB_OFFLINE) or an unreachable hub: one line, exit 2, nothing
created. See docs/models-and-data.md.
"""

from __future__ import annotations

from unlearn.commands.arguments import ArgumentParser
from unlearn.recipes.push import PushOptions, push_run


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="unlearn push", description=__doc__)
    parser.add_argument("run", metavar="RUN", help="the run directory whose model is uploaded")
    parser.add_arguments(PushOptions, dest="opts")
    ns = parser.parse_args(argv)
    url = push_run(ns.run, ns.opts)
    print(f"pushed {ns.run} to {ns.opts.repo}: {url}")
    return 0
