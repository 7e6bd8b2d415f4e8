"""Distillation after unlearning (UNDO; Lee et al. 2025, "Distillation Robustifies Unlearning").

    unlearn distill --teacher RUN_DIR_OR_MODEL --world W --alpha 0.3 --out D

An unlearned model (the teacher) behaves as if it had forgotten, yet fine-tuning brings the
knowledge back: it is still in the weights. UNDO perturbs a copy of those weights, the student
(mixed with a fresh initialisation of the same architecture by a factor α, or with Gaussian noise
of α times each tensor's standard deviation), then distils the teacher's output distribution into
it on retain and general text (KL(teacher || student) per token). The student re-learns what the
teacher *does*, not what its weights still hold: α = 0 is plain self-distillation, α = 1 a model
trained from scratch on the teacher's outputs.

The result is an unlearning run (kind `unlearn`, method `distill`, parent the teacher's run):
OUT/model, evaluated with the world's suite, in the store and the report like any method, and
attacked by `unlearn robustness` like any model. run.json's `final` records `compute_fraction`:
the distillation's training compute (student forward and backward, teacher forward) as a
fraction of the world's own pretraining compute (6 · params · tokens of the target's run).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unlearn.config.settings import ModelArgs, TrainConfig, build_sections
from unlearn.data import ExampleStream, load_documents, tokenize_examples
from unlearn.errors import UsageError
from unlearn.eval.suite import SuiteArgs, resolve_suite
from unlearn.methods.base import Phase, Reference
from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing
from unlearn.models.load import load_model, load_tokenizer
from unlearn.objectives import get_objective
from unlearn.recipes.best_step import BestKeeper
from unlearn.recipes.eval_curve import (
    CurveArgs,
    curve_fields,
    final_evaluation,
    live_evaluations,
)
from unlearn.recipes.skeleton import Launch, Session, Trainee, check_destination, run_regime
from unlearn.recipes.unlearning import suite_fields
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import RunDir
from unlearn.tracking import TrackingArgs
from unlearn.training.loop import Plan, TrainState
from unlearn.world import load_world
from unlearn.world.generate import WORLD_RETAIN_CORPORA

PERTURBATIONS = ("mix", "noise")
DISTILL_TRAIN_DEFAULTS = {"lr": 1e-3, "num_train_examples": 4096, "pdbs": 16, "grad_accum": 1}
"""512 steps of 16 documents: calibrated on the default mini world (README)."""


@dataclass
class DistillArgs:
    """What to distil from, into what, on which text."""

    teacher: str | None = None
    """The unlearned model: a run directory (its OUT/model; the run becomes the parent) or a
    model directory / hub id."""
    out: str | None = None
    world: str | None = None
    """Mini world: the text (retain, near_domain_retain and filler documents) and the suite."""
    corpus: str | None = None
    """Text to distil on (local file or hub ID[:CONFIG[:SPLIT]]), instead of the world's."""
    alpha: float = 0.3
    """Perturbation strength in [0, 1]: the fresh initialisation's share (mix) or the noise's
    scale in units of each tensor's standard deviation (noise)."""
    perturb: str = "mix"
    """mix (shrink toward a fresh initialisation) or noise (add Gaussian noise)."""
    suite: SuiteArgs = field(default_factory=SuiteArgs)
    """Tasks evaluated after distillation (default: the world's)."""
    eval_batch_size: int = 64
    curve: CurveArgs = field(default_factory=CurveArgs)
    """Evaluation during distillation (--eval_every, --save_best, --delta; step 0 is the
    perturbed student)."""
    run_id: str | None = None
    store: str | None = None
    progress: bool = True
    tracking: TrackingArgs = field(default_factory=TrackingArgs)
    """Experiment trackers (--report_to, --project, --run_name, --group, --tags,
    --tracking_dir): operational, not part of the run's config."""

    def __post_init__(self) -> None:
        if not self.teacher:
            raise UsageError("--teacher is required (an unlearning run directory or a model)")
        if not self.out:
            raise UsageError("--out DIR is required")
        if self.world is None and self.corpus is None:
            raise UsageError("--corpus is required without --world (the text to distil on)")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.perturb not in PERTURBATIONS:
            raise UsageError(f"--perturb must be one of {', '.join(PERTURBATIONS)}")


@dataclass
class DistillConfig:
    args: DistillArgs
    train: TrainConfig

    def to_dict(self) -> dict:
        a = self.args
        return {**dataclasses.asdict(self.train), "teacher": a.teacher, "world": a.world,
                "corpus": a.corpus, "alpha": a.alpha, "perturb": a.perturb,
                **suite_fields(a.suite), **curve_fields(a.curve)}  # fmt: skip


DISTILL_SECTIONS = (DistillArgs, TrainConfig)
DISTILL_PLACED = ("teacher", "out", "world", "store", "run_id")
"""Fields a sweep's `distill:` block may not set: the sweep places each point's distillation."""


def build_distill_config(overrides: dict, where: str = "") -> DistillConfig:
    """A DistillConfig from flat field names (a sweep's `distill:` block plus what the sweep
    places); unknown fields and bad values raise UsageError."""
    values = {**DISTILL_TRAIN_DEFAULTS, **overrides}
    built = build_sections(DISTILL_SECTIONS, values, "distill config", where)
    return DistillConfig(built[DistillArgs], built[TrainConfig])


def teacher_model(teacher: str) -> tuple[str, str | None]:
    """(model path or id, the teacher's run id or None): a run directory means its model."""
    path = Path(teacher)
    if RunDir(path).exists():
        meta = RunDir(path).read_meta()
        if not meta.model_path and not (path / "model").is_dir():
            raise UsageError(f"run {path} saved no model to distil from")
        return str(path / "model"), meta.id
    return teacher, None


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, alpha: float, mode: str, seed: int) -> None:
    """UNDO's perturbation, in place: mix every parameter with a fresh initialisation of the
    same architecture (θ ← (1-α)θ + αθ₀), or add α·std(θ)·ε."""
    g = torch.Generator().manual_seed(seed)
    if mode == "noise":
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            p.add_(alpha * p.float().std().to(p.dtype) * noise)
        return
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # the architecture's own initialisation, seeded
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        p.mul_(1 - alpha).add_(alpha * fresh_params[name].to(p.device, p.dtype))


def pretraining_compute(world) -> float | None:
    """6 · params · tokens of the world's target run (None without a world)."""
    if world is None:
        return None
    tokens = world.stats.get("trained_tokens", {})
    total = tokens.get("phase1", 0) + tokens.get("phase2_target", 0)
    return 6.0 * world.stats.get("params", 0) * total or None


def run_distill(cfg: DistillConfig) -> RunMeta:
    """Perturb, distil, save, evaluate. Returns the final RunMeta."""
    return run_regime(Distill(cfg))


class Distill:
    """The distillation regime of the recipe skeleton (`unlearn.recipes.skeleton`)."""

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.keeper: BestKeeper | None = None

    def launch(self) -> Launch:
        cfg, args = self.cfg, self.cfg.args
        self.world = world = load_world(args.world) if args.world else None
        suite = resolve_suite(args.suite, world)
        args.curve.check(cfg.train, suite)
        name, parent = teacher_model(args.teacher)
        self.ref = ref = ModelArgs(name).resolve(world)
        if args.corpus:
            texts = load_documents(args.corpus)
        else:
            texts = [t for c in WORLD_RETAIN_CORPORA for t in world.read_corpus(c)]
        if not texts:
            raise UsageError("no text to distil on")
        self.texts = texts
        out = check_destination(args.out, "unlearn", {"teacher": ref.name}, args.store)
        return Launch(
            kind="unlearn",
            out=out,
            model=ref,
            config=cfg.to_dict(),
            train=cfg.train,
            suite=suite,
            run_id=args.run_id,
            store=args.store,
            method="distill",
            parent=parent,
            resumable=False,
            progress=args.progress,
            tracking=args.tracking,
        )

    def build(self, session: Session) -> Trainee:
        args, tcfg = self.cfg.args, self.cfg.train
        par = session.parallel
        tokenizer = load_tokenizer(self.ref)
        examples = tokenize_examples(
            self.texts[: tcfg.num_train_examples], tokenizer, tcfg.max_length
        )
        stream = ExampleStream(examples, tcfg.pdbs, tokenizer.pad_token_id, tcfg.seed)
        teacher = load_model(self.ref, tcfg.dtype, par.device)
        student = copy.deepcopy(teacher)
        perturb_weights(student, args.alpha, args.perturb, tcfg.seed)
        student.requires_grad_(True)
        if tcfg.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        reference = Reference(student, frozen_copy=teacher)
        par.wrap(student, tcfg.mixed_precision)
        steps = tcfg.steps(par.world_size)
        plan = Plan(len(examples), steps, [Phase("distill", steps)],
                    tcfg.effective_batch(par.world_size), par.world_size)  # fmt: skip
        self.params = sum(p.numel() for p in teacher.parameters())
        self.mean_len = sum(len(e) for e in examples) / len(examples)
        objective = get_objective("distillation")()
        if args.curve.save_best:
            self.keeper = BestKeeper.open(session, args.curve.margin, merge=True)
        on_step = live_evaluations(session, student, tokenizer, args.eval_batch_size, steps,
                                   args.curve.eval_every, keeper=self.keeper)  # fmt: skip
        return Trainee(student, objective, tokenizer, stream, plan, reference, on_step=on_step)

    def finish(self, session: Session, t: Trainee, state: TrainState) -> None:
        run = session.run
        tokens = t.plan.examples_drawn * self.mean_len
        final = {k: v for k, v in state.last.items() if k in state.first_values}
        budget = pretraining_compute(self.world)
        if budget:  # student forward + backward (6N) and teacher forward (2N) per token
            final["compute_fraction"] = 8.0 * self.params * tokens / budget
        paths = run.save_model(session.parallel, t.model, t.tokenizer, merge=True)
        run.update(final=final, model_path=paths.get("model"))
        final_evaluation(session, t.model, t.tokenizer, self.cfg.args.eval_batch_size,
                         t.plan.total_steps, self.keeper)  # fmt: skip
