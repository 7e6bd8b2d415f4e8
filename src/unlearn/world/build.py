"""Build a world directory: generate, train the tokenizer, pretrain, evaluate the baselines.

Layout of the directory (indexed by world.json, all paths relative):

    corpus/{forget_unlearn,forget_attack,forget_heldout,retain,retain_late,near_domain,
            filler,filler_heldout}.jsonl
    questions/{forget_unlearn,forget_heldout,forget_attack,retain,retain_late,near_domain}.jsonl
    tokenizer/                      HF tokenizer
    models/target/                  HF model dirs (safetensors + the tokenizer: self-contained)
    models/filtered/
    models/checkpoints/step-NNNNN/  the target run's checkpoints; the last phase-1 one is ignorant

Everything is written inside `fsutil.atomic_dir`, so a failed or interrupted build leaves no
directory that looks like a world. The baseline evaluations (target, ignorant checkpoint,
filtered twin), the thread layout and the time of every stage go into world.json's "stats".

Threads: phase 1 and the evaluations use the build's thread budget (`threads`, default the
preset's). Phase 2's two runs (target, filtered twin) are independent; by default, on a machine
with 2+ cores or a budget of 2+ threads, they run side by side in two processes with
`max(1, threads // 2)` threads each (`unlearn.world.parallel`), else one after the other with
all the threads. Results depend on the per-run thread counts, not on the processes: a parallel
and a sequential build with the same counts give the same weights.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

from unlearn.config.settings import check_seed
from unlearn.errors import UsageError
from unlearn.fsutil import atomic_dir, atomic_write_json, check_writable_parent, write_jsonl
from unlearn.models.load import no_hub_kernels
from unlearn.world.generate import CORPUS_PHASES, generate
from unlearn.world.load import WORLD_FILE, World, load_world
from unlearn.world.parallel import available_cores
from unlearn.world.phases import torch_threads
from unlearn.world.presets import get_preset
from unlearn.world.pretrain import pretrain
from unlearn.world.scoring import evaluate_world
from unlearn.world.tokenizer import train_tokenizer

QUESTION_FILES = {
    "forget": "questions/forget_unlearn.jsonl",
    "forget_heldout": "questions/forget_heldout.jsonl",
    "forget_attack": "questions/forget_attack.jsonl",
    "retain": "questions/retain.jsonl",
    "retain_late": "questions/retain_late.jsonl",
    "near_domain": "questions/near_domain.jsonl",
}
PERPLEXITY_FILES = {"general_ppl": "corpus/filler_heldout.jsonl"}
BASELINE_METRICS = ("acc", "acc_norm", "correct_prob", "ppl", "nll", "tokens", "n")
"""Metrics of world.json's baseline table (accuracy tasks and the perplexity task)."""


def check_out_dir(out: str | os.PathLike) -> Path:
    """The absolute output path, after checking a build may write (and replace) it.

    An existing directory is only replaced if it is empty or a world: `--out ~` must never
    delete a home directory.
    """
    path = check_writable_parent(out)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a directory")
        if any(path.iterdir()) and not (path / WORLD_FILE).is_file():
            raise UsageError(f"{path} exists, is not empty and is not a world directory")
    return path


def _save_model(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@dataclass(frozen=True)
class ThreadLayout:
    """torch threads of a build: `build` for phase 1 and the evaluations, `phase2` for each
    phase-2 run, the two runs side by side in two processes when `parallel`."""

    build: int
    phase2: int
    parallel: bool

    @classmethod
    def choose(cls, threads: int, parallel: bool | None) -> ThreadLayout:
        """The layout for a budget of `threads`; `parallel` None: when 2+ cores or threads."""
        if parallel is None:
            parallel = threads >= 2 or available_cores() >= 2
        return cls(threads, max(1, threads // 2) if parallel else threads, parallel)


def build_world(
    preset: str,
    seed: int,
    out: str | os.PathLike,
    progress: bool = True,
    threads: int | None = None,
    parallel: bool | None = None,
) -> World:
    """Build the world `(preset, seed)` into `out` (replacing a world already there).

    `threads` (default: the preset's) is torch's CPU thread budget for the build, restored
    afterwards. `parallel` runs phase 2's two runs side by side with `threads // 2` threads each
    (default: on 2+ cores or threads; False: one after the other with `threads` each). Results
    are deterministic for a given seed and thread layout on one machine.
    """
    settings = get_preset(preset)
    threads = settings.threads if threads is None else threads
    check_seed(seed, "seed")
    if threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    out = check_out_dir(out)
    layout = ThreadLayout.choose(threads, parallel)
    with torch_threads(threads), atomic_dir(out) as tmp:
        _build_into(tmp, settings.name, seed, progress, layout)
    return load_world(out)


def _build_into(root: Path, preset: str, seed: int, progress: bool, layout: ThreadLayout) -> None:
    settings = get_preset(preset)
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    data = generate(settings, seed)
    corpora = {name: root / "corpus" / f"{name}.jsonl" for name in data.corpora}
    for name, docs in data.corpora.items():
        write_jsonl(corpora[name], [{"text": d} for d in docs])
    questions = {task: root / rel for task, rel in QUESTION_FILES.items()}
    for task, rows in data.questions.items():
        write_jsonl(questions[task], rows)
    lap("generate")

    # The tokenizer learns from the training text only (held-out text must stay unseen).
    all_docs = [
        d for name, docs in data.corpora.items() if CORPUS_PHASES[name] != "none" for d in docs
    ]
    tokenizer = train_tokenizer(all_docs, settings.vocab_size)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    token_docs = {
        name: tokenizer(docs, add_special_tokens=False)["input_ids"]
        for name, docs in data.corpora.items()
    }
    lap("tokenizer")

    def save_checkpoint(model: GPTNeoXForCausalLM, step: int) -> Path:
        return _save_model(model, tokenizer, root / "models" / "checkpoints" / f"step-{step:05d}")

    result = pretrain(
        settings,
        token_docs,
        tokenizer.eos_token_id,
        seed,
        save_checkpoint,
        len(tokenizer),
        progress,
        phase2_threads=layout.phase2,
        parallel=layout.parallel,
        workdir=root,  # the twin process's files go away with a failed build
    )
    target = _save_model(result.target, tokenizer, root / "models" / "target")
    filtered = _save_model(result.filtered, tokenizer, root / "models" / "filtered")
    seconds["phase1"] = round(result.phase1.seconds, 2)
    seconds["phase2_target"] = round(result.target_phase2.seconds, 2)
    seconds["phase2_filtered"] = round(result.filtered_phase2.seconds, 2)
    seconds["phase2_wall"] = round(result.phase2_seconds, 2)
    lap("pretrain")

    checkpoints = result.phase1.checkpoints + result.target_phase2.checkpoints
    world = World(
        root=root,
        preset=preset,
        seed=seed,
        tokenizer=root / "tokenizer",
        target=target,
        filtered=filtered,
        ignorant_checkpoint=result.phase1.checkpoints[-1],
        checkpoints=tuple(checkpoints),
        questions=questions,
        corpora=corpora,
        groups=data.groups,
        perplexity={task: root / rel for task, rel in PERPLEXITY_FILES.items()},
    )
    ignorant = GPTNeoXForCausalLM.from_pretrained(
        str(world.ignorant_checkpoint), **no_hub_kernels()
    )
    baseline = {}
    for name, model in (
        ("target", result.target),
        ("ignorant", ignorant),
        ("filtered", result.filtered),
    ):
        metrics = evaluate_world(model, tokenizer, world, progress=progress)
        baseline[name] = {
            task: {
                k: m[k] if isinstance(m[k], int) else round(m[k], 4)
                for k in BASELINE_METRICS
                if k in m
            }
            for task, m in metrics.items()
        }
    lap("eval")
    seconds["total"] = round(time.perf_counter() - start, 2)

    phases = {"phase1": result.phase1, "phase2_target": result.target_phase2}
    phases["phase2_filtered"] = result.filtered_phase2
    stats = {
        "seconds": seconds,
        "threads": {"phase1": layout.build, "phase2": layout.phase2},
        "phase2_parallel": layout.parallel,
        "params": result.params,
        "vocab_size": len(tokenizer),
        "corpus_tokens": {name: sum(len(d) + 1 for d in docs) for name, docs in token_docs.items()},
        "trained_tokens": {name: r.tokens for name, r in phases.items()},
        "epochs": {name: round(r.epochs, 2) for name, r in phases.items()},
        "final_loss": {name: round(r.final_loss, 4) for name, r in phases.items()},
        "baseline": baseline,
        "preset_settings": dataclasses.asdict(settings),
    }
    atomic_write_json(root / WORLD_FILE, dataclasses.replace(world, stats=stats).to_json())
