"""The tamper-attack recipe: fine-tune a (possibly unlearned) model on forget-domain text and
record an evaluation curve (step 0, every `eval_every` steps, and the last step) on an evaluation
suite (`unlearn.eval.suite`), scoring the live model at each point.

On the mini world the attack trains on the `attack` group's documents and evaluates the
`unlearn` group (forget), the never-trained `heldout` group (forget_heldout) and retain. Recovery
of held-out facts after training on other facts measures latent knowledge, not re-learning; the
same attack on the filtered twin (never saw the domain) and on the original target gives the
reference curves. Elsewhere the attack documents are `--corpus` (required) and the curve is on the
suite's tasks (default: wmdp_bio_robust and mmlu; `--eval_limit` keeps in-loop points cheap).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from unlearn.config.settings import LoraSettings, ModelArgs, TrainConfig, build_sections
from unlearn.data import ExampleStream, load_documents, tokenize_examples
from unlearn.data.corpus import DEFAULT_TEXT_FIELDS
from unlearn.errors import UsageError
from unlearn.eval.suite import Scorer, SuiteArgs, resolve_suite
from unlearn.methods.base import Phase
from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.lora import attach_lora, check_lora_targets
from unlearn.objectives import get_objective
from unlearn.recipes.skeleton import Launch, Session, Trainee, check_destination, run_regime
from unlearn.recipes.unlearning import suite_fields
from unlearn.runs.rows import RunMeta
from unlearn.tracking import TrackingArgs
from unlearn.training.loop import Plan, TrainState
from unlearn.world import load_world

ATTACK_TRAIN_DEFAULTS = {
    "lr": 1e-3,
    "num_train_examples": 100_000,  # every document of the attack corpus
    "pdbs": 16,
    "grad_accum": 1,
    "max_steps": 60,
    "warmup": 0.0,
}
"""Calibrated on the default mini world: strong enough to teach the attack group to the
filtered twin, while the twin's held-out group stays at chance (see README)."""


@dataclass
class AttackArgs:
    """What to attack, with which data, and where to write."""

    model_args: ModelArgs = field(default_factory=ModelArgs)
    """The model to attack (--model, --revision, --trust_remote_code), e.g. OUT/model of an
    unlearning run."""
    out: str | None = None
    """Attack run directory (run.json, metrics.jsonl, evals.jsonl)."""
    world: str | None = None
    """Mini world (default attack corpus and evaluation questions)."""
    corpus: str | None = None
    """Forget-domain documents to fine-tune on: local .jsonl/.json/.parquet/.txt or hub
    ID[:CONFIG[:SPLIT]]; default: the world's attack group (required without --world)."""
    world_corpora: list[str] = field(default_factory=list)
    """With --world and no --corpus: the world corpora to fine-tune on (default forget_attack;
    the robustness suite's benign attacks use retain and filler)."""
    text_fields: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_FIELDS))
    """Fields whose text makes a document; those the corpus has are joined."""
    eval_every: int = 10
    """Optimizer steps between evaluations (step 0 and the last step are always evaluated)."""
    suite: SuiteArgs = field(default_factory=SuiteArgs)
    """Tasks on the curve (--forget_tasks, --retain_tasks, --other_tasks, --eval_limit);
    default: the world's, else wmdp_bio_robust and mmlu."""
    eval_batch_size: int = 64
    parent: str | None = None
    """Run id of the attacked model (links the curve to its unlearning run in reports)."""
    run_id: str | None = None
    store: str | None = None
    progress: bool = True
    save_model: bool = False
    """Also save the attacked model at OUT/model."""
    tracking: TrackingArgs = field(default_factory=TrackingArgs)
    """Experiment trackers (--report_to, --project, --run_name, --group, --tags,
    --tracking_dir): operational, not part of the run's config."""

    def __post_init__(self) -> None:
        if not self.model_args.model:
            raise UsageError("--model is required")
        if not self.out:
            raise UsageError("--out DIR is required")
        if self.world is None and self.corpus is None:
            raise UsageError("--corpus is required without --world (the documents to attack with)")
        if self.eval_every < 1:
            raise UsageError(f"--eval_every must be >= 1, got {self.eval_every}")
        if self.world_corpora and (self.world is None or self.corpus is not None):
            raise UsageError("--world_corpora names corpora of --world, and replaces --corpus")


@dataclass
class AttackConfig:
    args: AttackArgs
    train: TrainConfig
    lora: LoraSettings

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self.train),
            **dataclasses.asdict(self.lora),
            "model": self.args.model_args.model,
            "corpus": self.args.corpus,
            **({"world_corpora": self.args.world_corpora} if self.args.world_corpora else {}),
            "eval_every": self.args.eval_every,
            **suite_fields(self.args.suite),
        }


ATTACK_SECTIONS = (AttackArgs, TrainConfig, LoraSettings)
"""The sections of an attack config, in the order `build_sections` builds them."""


def build_attack_config(overrides: dict, where: str = "") -> AttackConfig:
    """An AttackConfig from flat field names; unknown fields and values of the wrong type raise
    UsageError (`where` prefixes the message)."""
    values = {**ATTACK_TRAIN_DEFAULTS, "lora": False, **overrides}
    built = build_sections(ATTACK_SECTIONS, values, "attack config", where)
    return AttackConfig(built[AttackArgs], built[TrainConfig], built[LoraSettings])


class StartScores:
    """Step-0 evaluations shared by the attacks of one model (a robustness suite's grid).

    At step 0 no attack has changed a weight (a LoRA adapter starts at zero), so every attack
    on the same model, loaded and run in the same dtype and scored on the same suite, records
    the same numbers: the first one scores them, the others reuse its (metrics, collapsed) per
    task. A task whose scoring raised is not kept (the next attack scores it again)."""

    def __init__(self) -> None:
        self._scores: dict[str, dict[str, tuple[dict, bool]]] = {}

    @staticmethod
    def key(cfg: AttackConfig) -> str:
        """What the step-0 numbers depend on: the weights as loaded, their dtype and compute
        precision, and the suite and its batching. Training settings are not part of it."""
        model = cfg.args.model_args
        return json.dumps(
            [model.model, model.revision, model.trust_remote_code, cfg.args.world,
             cfg.train.dtype, cfg.train.mixed_precision, cfg.args.eval_batch_size,
             suite_fields(cfg.args.suite)],
            sort_keys=True, default=str,
        )  # fmt: skip

    def scorer(self, cfg: AttackConfig, score: Scorer) -> Scorer:
        """`score`, answered from an earlier attack's step 0 where there is one."""
        seen = self._scores.setdefault(self.key(cfg), {})

        def shared(task: str) -> tuple[dict, bool]:
            if task not in seen:
                seen[task] = score(task)  # raises: nothing kept
            return seen[task]

        return shared


def run_attack(cfg: AttackConfig, start: StartScores | None = None) -> RunMeta:
    """Fine-tune and evaluate along the way. Returns the final RunMeta (`unlearn.runs.lifecycle`
    decides its status: failed if any evaluation on the curve failed). `start` shares the
    step-0 evaluation with the other attacks of the same model."""
    return run_regime(Attack(cfg, start))


class Attack:
    """The tamper-attack regime of the recipe skeleton (`unlearn.recipes.skeleton`)."""

    def __init__(self, cfg: AttackConfig, start: StartScores | None = None) -> None:
        self.cfg = cfg
        self.start = start

    def launch(self) -> Launch:
        cfg, args = self.cfg, self.cfg.args
        world = load_world(args.world) if args.world else None
        suite = resolve_suite(args.suite, world)
        self.ref = ref = args.model_args.resolve(world)
        if cfg.lora.lora:  # peft would report a bad name only after the weights loaded
            check_lora_targets(ref, cfg.lora.lora_target_modules)
        if args.corpus:
            texts = load_documents(args.corpus, args.text_fields)
        else:  # UsageError for a corpus the world does not have
            names = args.world_corpora or ["forget_attack"]
            texts = [text for name in names for text in world.read_corpus(name)]
        if not texts:
            raise UsageError("the attack corpus has no documents")
        self.texts = texts
        out = check_destination(args.out, "attack", {"input model": ref.name}, args.store)
        return Launch(
            kind="attack",
            out=out,
            model=ref,
            config=cfg.to_dict(),
            train=cfg.train,
            suite=suite,
            run_id=args.run_id,
            store=args.store,
            parent=args.parent or str(args.model_args.model),
            progress=args.progress,
            tracking=args.tracking,
        )

    def build(self, session: Session) -> Trainee:
        # Resumes with the curve up to the checkpoint, failed evaluations included.
        cfg, args, tcfg = self.cfg, self.cfg.args, self.cfg.train
        tokenizer = load_tokenizer(self.ref)
        examples = tokenize_examples(
            self.texts[: tcfg.num_train_examples], tokenizer, tcfg.max_length
        )
        stream = ExampleStream(examples, tcfg.pdbs, tokenizer.pad_token_id, tcfg.seed)
        model = load_model(self.ref, tcfg.dtype, session.parallel.device)
        if tcfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.lora.lora:
            model = attach_lora(model, cfg.lora)
        else:
            model.requires_grad_(True)
        session.parallel.wrap(model, tcfg.mixed_precision)
        world_size = session.parallel.world_size
        steps = tcfg.steps(world_size)
        plan = Plan(
            len(examples), steps, [Phase("attack", steps)], tcfg.effective_batch(world_size),
            world_size,
        )  # fmt: skip
        suite = session.suite
        score = suite.scorer(model, tokenizer, args.eval_batch_size)

        start = self.start.scorer(cfg, score) if self.start is not None else score

        def on_step(step: int) -> None:
            if step % args.eval_every == 0 or step == steps:
                # In eval mode, restored after (unlearn.models.modes.eval_mode).
                scorer = start if step == 0 else score
                session.run.evaluate(step, suite.suite.task_keys(), scorer, suite.suite.metric)

        objective = get_objective("language_modeling")()
        return Trainee(model, objective, tokenizer, stream, plan, on_step=on_step)

    def finish(self, session: Session, t: Trainee, state: TrainState) -> None:
        model_path = None
        if self.cfg.args.save_model:
            model_path = session.run.save_model(session.parallel, t.model, t.tokenizer, True)
            model_path = model_path["model"]
        session.run.update(final=dict(state.last), model_path=model_path)
