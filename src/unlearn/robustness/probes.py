"""White-box probes: forget-domain knowledge an adversary reads out without fine-tuning.

Output accuracy says what a model *answers*; unlearning that only suppresses the answer at the
output leaves the knowledge readable inside. Each probe is an adversary with white-box access
(weights and activations, no weight updates) and the data it would have: answers to *other*
forget questions (`ProbeData.train`, the attack group), forget-domain documents, benign text. Its
score is measured on held-out forget questions (`ProbeData.test`) the adversary never sees
answers to. The suite compares every probe on the unlearned model with the same probe on the
data-filtered twin, which never learned the facts (design section 7: robustness is a worst case).

- `linear`: a logistic regression per layer (scikit-learn), in one of two read-outs
  (`readout.linear_readout` picks one from the choices, never from the test answers):
  `answers`, from the block output at the prompt's last token to the answer string (a test
  question is answered by the choice the classifier finds most probable), where the train
  answers name every test choice (a closed answer set, the letters of multiple choice); else
  `statements` (each question with its own answer), after "The Geometry of Truth" (Marks and
  Tegmark, 2023): each choice is scored right or wrong from the block output at the last token
  of the prompt followed by that choice, and the choice scored most likely right answers. The
  layer is chosen by cross-validation on the train questions (what an adversary without
  held-out answers can do), folds grouped by fact so that a fact's choices and paraphrases
  never sit on both sides of a split.
- `lens`: a tuned lens (`unlearn.readouts.tuned_lens`) fitted for the model under test on
  general text reads each layer's next-token distribution at the prompt's last token; the
  choice whose first token is most probable wins. The layer is chosen by accuracy on the train
  questions.
- `ablation`: directional ablation. Per layer, the unit mean difference between forget-domain
  and retain activations is removed from the output of every block at once
  (`hooks.project_out`), and the test questions are scored by the normal cloze scorer.
- `in_context`: k forget-domain documents are prefixed to each test prompt, scored by the normal
  cloze scorer (does reading about the domain wake dormant knowledge?).

Every probe returns a JSON-able dict {"acc", "layer", "per_layer", "select", "n", "chance", ...}
(`per_layer` and `select` are empty where no layer is chosen). Ties between choices earn the
expected credit of breaking them at random (`readout.tie_credit`). A probe that cannot run
raises ValueError with the reason: a made-up number would read as a result. The model's weights
and modes are left as found (`models.modes.eval_mode`; hooks live only inside context managers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from unlearn.eval.encoding import encode_requests
from unlearn.eval.native import context_window, evaluate_questions
from unlearn.eval.questions import question_problem
from unlearn.models.modes import eval_mode
from unlearn.readouts.fitting import text_batches
from unlearn.readouts.hooks import num_layers, project_out
from unlearn.readouts.lens_training import train_lens
from unlearn.readouts.tuned_lens import TunedLens
from unlearn.robustness.readout import (
    answer_text,
    check_layers,
    classifier_credits,
    cross_validated,
    cross_validated_statements,
    first_tokens,
    fit_classifier,
    fit_statement_classifier,
    last_token_hiddens,
    linear_readout,
    mean_hiddens,
    statement_credits,
    statement_features,
    statement_hiddens,
    statement_labels,
    tie_credit,
)

# In-context on the tiny world (seed 0): its models were pretrained on 64-token rows (packed
# documents), and its forget documents are 57-93 tokens, so any prefix takes the prompt past the
# positions seen in training (`context_window` reports the config's 2048 and cannot tell).
# Measured held-out forget accuracy, seeds 0/1/2, target (output accuracy without a prefix
# 0.94) and filtered twin (0.27), attack-group documents:
#   k=1 (longest sequence 100 tokens): target 0.81 0.75 0.75   twin 0.23 0.25 0.25
#   k=2 (177 tokens):                  target 0.42 0.46 0.50   twin 0.21 0.25 0.25
#   k=3 (258 tokens):                  target 0.35 0.31 0.23   twin 0.23 0.25 0.23
# Retain documents as the prefix give the same fall (k=1 0.77-0.85, k=2 0.52-0.63), so it is the
# length, not the content: past k=1 the probe measures the model breaking, not its knowledge.
# Hence k=1 by default; a model with a real context window can take a larger k.
DEFAULT_K = 1


@dataclass(frozen=True)
class ProbeData:
    """What the adversary knows (train, forget_texts, retain_texts, general_texts) and what it
    is scored on (test). Questions are cloze rows {prompt, choices, answer, ...}."""

    train: list[dict]
    """Questions with known answers (the world's attack group; the runner expands each fact to
    every paraphrase prompt of its relation). Rows with "entity" and "relation" are grouped by
    fact for cross-validation."""
    test: list[dict]
    """Held-out forget questions: the probe's score is measured on them."""
    forget_texts: list[str]
    """Forget-domain documents the adversary has (attack-group documents)."""
    retain_texts: list[str]
    """Benign documents (retain-domain text)."""
    general_texts: list[str]
    """General text to fit a tuned lens on (retain + filler)."""


@dataclass(frozen=True)
class ProbeOptions:
    """Settings shared by the probes."""

    layers: tuple[int, ...] | None = None
    """Layers (block outputs) to probe; None = every block. Checked against the model."""
    k: int = DEFAULT_K
    """in_context: documents prefixed to each prompt."""
    lens_steps: int = 300
    """lens: tuned-lens fitting steps."""
    seed: int = 0
    """Cross-validation folds and in-context document draws."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"in-context k must be >= 1, got {self.k}")
        if self.lens_steps < 1:
            raise ValueError(f"lens_steps must be >= 1, got {self.lens_steps}")


def _check_questions(questions: Sequence[dict], what: str) -> None:
    if not questions:
        raise ValueError(f"no {what} questions for the probe")
    for i, q in enumerate(questions):
        problem = question_problem(q)
        if problem is not None:
            raise ValueError(f"{what} question {i}: {problem}")


def _prologue(
    name: str,
    model: nn.Module,
    data: ProbeData,
    opts: ProbeOptions,
    questions: tuple[str, ...] = ("test",),
    texts: tuple[str, ...] = (),
) -> list[int]:
    """What every probe checks before it reads anything, the same way for all of them: the
    layers against the model, each question set it reads (non-empty, well-formed) and the texts
    it needs. Returns the layers to probe."""
    layers = check_layers(model, opts.layers)
    for what in questions:
        _check_questions(getattr(data, what), what)
    if any(not getattr(data, what) for what in texts):
        raise ValueError(f"the {name} probe needs {' and '.join(texts)}")
    return layers


def _chance(questions: Sequence[dict]) -> float:
    return sum(1.0 / len(q["choices"]) for q in questions) / len(questions)


def _result(
    acc: float, layer: int | None, per_layer: dict, select: dict, test: Sequence[dict]
) -> dict:
    return {
        "acc": acc,
        "layer": layer,
        "per_layer": {str(k): v for k, v in per_layer.items()},
        "select": {str(k): v for k, v in select.items()},
        "n": len(test),
        "chance": _chance(test),
    }


def _best_layer(select: dict[int, float]) -> int:
    """The layer with the highest selection accuracy (the shallowest on a tie)."""
    return max(select, key=lambda layer: (select[layer], -layer))


# ---- linear ---------------------------------------------------------------------------------


def linear_probe(
    model: nn.Module,
    tokenizer,
    data: ProbeData,
    opts: ProbeOptions,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """A logistic regression per layer in the read-out the questions allow (module
    docstring); `readout` in the result says which."""
    layers = _prologue("linear", model, data, opts, questions=("train", "test"))
    readout = linear_readout(data.train, data.test, opts.seed)
    states = last_token_hiddens if readout == "answers" else statement_hiddens
    with eval_mode(model):
        train_h = states(model, tokenizer, data.train, layers, batch_size, progress)
        test_h = states(model, tokenizer, data.test, layers, batch_size, progress)
    select, per_layer = {}, {}
    for layer in layers:
        x_train, x_test = train_h[layer].double().numpy(), test_h[layer].double().numpy()
        if readout == "answers":
            select[layer] = cross_validated(x_train, data.train, opts.seed)
            clf = fit_classifier(x_train, [answer_text(q) for q in data.train], opts.seed)
            credits = classifier_credits(clf, x_test, data.test)
        else:
            x_train = statement_features(x_train, data.train)
            x_test = statement_features(x_test, data.test)
            select[layer] = cross_validated_statements(x_train, data.train, opts.seed)
            labels = statement_labels(data.train)
            clf = fit_statement_classifier(x_train, labels, opts.seed)
            credits = statement_credits(clf, x_test, data.test)
        per_layer[layer] = sum(credits) / len(credits)
    best = _best_layer(select)
    return _result(per_layer[best], best, per_layer, select, data.test) | {"readout": readout}


# ---- lens -----------------------------------------------------------------------------------


def _fit_lens(
    model: nn.Module,
    tokenizer,
    data: ProbeData,
    layers: list[int],
    opts: ProbeOptions,
    progress: bool,
) -> tuple[TunedLens, dict[str, float]]:
    """A tuned lens for `layers` fitted on the general text, batched as `unlearn fit-lens` and
    `unlearn.readouts.fitting` batch it; the last block's lens is the identity and needs no
    fitting."""
    trained = [layer for layer in layers if layer < num_layers(model) - 1]
    if not trained:
        return TunedLens.for_model(model, layers), {}
    if not any(t.strip() for t in data.general_texts):
        raise ValueError("the lens probe needs general_texts to fit a tuned lens on")
    device = next(model.parameters()).device
    batches = text_batches(data.general_texts, tokenizer, device)
    fitted, stats = train_lens(model, batches, layers, opts.lens_steps, progress=progress)
    return fitted, {str(layer): kl for layer, kl in stats.last_kl.items()}


@torch.no_grad()
def _lens_credits(
    model: nn.Module,
    lens: TunedLens,
    tokenizer,
    questions: Sequence[dict],
    layers: list[int],
    batch_size: int,
    progress: bool,
) -> dict[int, float]:
    """Per layer: accuracy of answering by the lens log-prob of each choice's first token."""
    hiddens = last_token_hiddens(model, tokenizer, questions, layers, batch_size, progress)
    firsts = [first_tokens(tokenizer, q) for q in questions]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = {}
    for layer in layers:
        credit = 0.0
        # In batches: a batch's lens logits are [rows, vocabulary].
        for start in range(0, len(questions), batch_size):
            h = hiddens[layer][start : start + batch_size].to(device=device, dtype=dtype)
            logits = lens.to_logits(model, h, layer).float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            rows = range(start, start + len(h))
            for row, i in zip(logprobs, rows, strict=True):
                q, tokens = questions[i], firsts[i]
                credit += tie_credit(row[tokens].tolist(), int(q["answer"]))
        out[layer] = credit / len(questions)
    return out


def lens_probe(
    model: nn.Module,
    tokenizer,
    data: ProbeData,
    opts: ProbeOptions,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Tuned-lens read-out of each choice's first token at the prompt's last position.

    One position can only rank first tokens. Choices that share their first token (" bats" and
    " bleeding" may both start with " b") get the same score: a tie, worth 1/k of a point when
    the right answer is among the k tied at the top (`tie_credit`). `shared_first_token` counts
    the test questions whose right answer shares its first token with another choice.
    """
    layers = _prologue("lens", model, data, opts, questions=("train", "test"))
    with eval_mode(model):
        lens, kl = _fit_lens(model, tokenizer, data, layers, opts, progress)
        select = _lens_credits(model, lens, tokenizer, data.train, layers, batch_size, progress)
        per_layer = _lens_credits(model, lens, tokenizer, data.test, layers, batch_size, progress)
    best = _best_layer(select)
    shared = 0
    for q in data.test:
        tokens = first_tokens(tokenizer, q)
        shared += tokens.count(tokens[int(q["answer"])]) > 1
    return _result(per_layer[best], best, per_layer, select, data.test) | {
        "shared_first_token": shared,
        "lens_kl": kl,
    }


# ---- ablation -------------------------------------------------------------------------------


def ablation_probe(
    model: nn.Module,
    tokenizer,
    data: ProbeData,
    opts: ProbeOptions,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Score the test questions with each layer's forget-minus-retain mean direction removed
    from its block output, at every probed layer at once.

    The direction is computed per layer (the mean over the non-pad tokens of the forget texts
    minus that of the retain texts) and removed where it was measured; one forward with all of
    them removed is the adversary's single attempt, so there is no layer to choose (`layer` is
    None). `direction_norm` is each mean difference's length before normalising.
    """
    texts = ("forget_texts", "retain_texts")
    layers = _prologue("ablation", model, data, opts, texts=texts)
    with eval_mode(model):
        forget = mean_hiddens(model, tokenizer, data.forget_texts, layers, batch_size)
        retain = mean_hiddens(model, tokenizer, data.retain_texts, layers, batch_size)
        directions = {layer: forget[layer] - retain[layer] for layer in layers}
        with project_out(model, directions):
            scored = evaluate_questions(model, tokenizer, data.test, batch_size, progress)
    norms = {str(layer): float(d.norm()) for layer, d in directions.items()}
    return _result(scored["acc"], None, {}, {}, data.test) | {
        "layers": layers,
        "direction_norm": norms,
        "collapse": scored["collapse"],
    }


# ---- in-context -----------------------------------------------------------------------------


def _prefixed(questions: Sequence[dict], texts: Sequence[str], k: int, seed: int) -> list[dict]:
    """Each question with k documents before its prompt.

    The documents are drawn per question, in question order, from one `random.Random(seed)`
    (`sample`: k distinct documents), so the score averages over many draws rather than
    hanging on one lucky set, and the same seed gives the same prompts. Documents are joined
    by newlines and the prompt starts a new line: the world's documents are lines of facts and
    a question prompt is tokenized like a line start.
    """
    rng = random.Random(seed)
    out = []
    for q in questions:
        docs = [texts[i].strip("\n") for i in rng.sample(range(len(texts)), k)]
        out.append({**q, "prompt": "\n".join([*docs, q["prompt"]])})
    return out


def _check_window(model: nn.Module, tokenizer, questions: Sequence[dict], k: int) -> int:
    """The longest scored sequence in tokens; ValueError when one exceeds the context window
    (the scorer would cut the prefix's start, silently probing fewer documents)."""
    window = context_window(model, tokenizer)
    pairs = encode_requests(tokenizer, [(q["prompt"], c) for q in questions for c in q["choices"]])
    longest = max(len(ctx) + len(cont) - 1 for ctx, cont in pairs)
    if longest > window:
        raise ValueError(
            f"in-context prompts with k={k} documents run to {longest} tokens, past the model's"
            f" context window of {window}: use a smaller k or shorter documents"
        )
    return longest


def in_context_probe(
    model: nn.Module,
    tokenizer,
    data: ProbeData,
    opts: ProbeOptions,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Score the test questions with k forget-domain documents prefixed to each prompt."""
    _prologue("in_context", model, data, opts)
    texts = [t for t in data.forget_texts if t.strip()]
    if len(texts) < opts.k:
        raise ValueError(
            f"the in-context probe needs k={opts.k} forget_texts, got {len(texts)} non-empty"
        )
    questions = _prefixed(data.test, texts, opts.k, opts.seed)
    longest = _check_window(model, tokenizer, questions, opts.k)
    scored = evaluate_questions(model, tokenizer, questions, batch_size, progress)
    return _result(scored["acc"], None, {}, {}, data.test) | {
        "k": opts.k,
        "max_tokens": longest,
        "collapse": scored["collapse"],
    }


PROBES: dict[str, Callable[..., dict]] = {
    "linear": linear_probe,
    "lens": lens_probe,
    "ablation": ablation_probe,
    "in_context": in_context_probe,
}
"""Probe name -> probe(model, tokenizer, data, opts, batch_size, progress) -> result dict."""


def run_probe(
    name: str,
    model: nn.Module,
    tokenizer,
    data: ProbeData,
    opts: ProbeOptions,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Run the probe called `name` (ValueError naming the choices for an unknown one).

    The layers are checked against the model first, for every probe, so a bad option fails at
    once and the same way whichever probe meets it. The result carries its probe's name.
    """
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r} (choose from {', '.join(PROBES)})")
    check_layers(model, opts.layers)  # before a probe's own checks: one message for all
    return {"probe": name} | PROBES[name](model, tokenizer, data, opts, batch_size, progress)
