"""The unlearning recipe: model + method + data -> trained model, run directory, evals.

    run_unlearning(build_run_config("lens", {"world": "/tmp/w", "out": "/tmp/r1"}))

Everything is validated (config values, paths, layer indices against the model's config) before
any weights load. The run directory is the source of truth (run.json, metrics.jsonl, evals.jsonl,
model/, adapter/); with a store path the run is also indexed in the SQLite store.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import simple_parsing
import torch

from unlearn.config.settings import LoraSettings, ModelArgs, TrainConfig, build_sections
from unlearn.data import ExampleStream, load_documents, tokenize_examples
from unlearn.data.corpus import DEFAULT_TEXT_FIELDS, mix_documents, sample_documents
from unlearn.distributed import Parallel, setup
from unlearn.errors import UsageError
from unlearn.eval.suite import Suite, SuiteArgs, resolve_suite
from unlearn.methods import get_method
from unlearn.methods.base import Method, MethodConfig, MethodEnv, Reference
from unlearn.methods.registry import method_names
from unlearn.models.gradient_checkpointing import enable_gradient_checkpointing
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.lora import attach_lora, check_lora_targets
from unlearn.models.refs import ModelRef, model_num_layers
from unlearn.readouts.fitting import general_texts
from unlearn.readouts.hooks import num_layers
from unlearn.recipes.best_step import BestKeeper
from unlearn.recipes.eval_curve import (
    CurveArgs,
    Monitor,
    curve_fields,
    final_evaluation,
    live_evaluations,
)
from unlearn.recipes.skeleton import Launch, Session, Trainee, check_destination, run_regime
from unlearn.runs.rows import RunMeta
from unlearn.tracking import TrackingArgs
from unlearn.training.frozen_cache import FrozenCache, FrozenCacheArgs, frozen_key
from unlearn.training.frozen_cache import from_args as frozen_from_args
from unlearn.training.loop import Plan, TrainState, make_plan
from unlearn.training.modifiers import StepModifiers, build_modifier, modifier_fields
from unlearn.training.precision import match_frozen_copy
from unlearn.world import load_world
from unlearn.world.generate import WORLD_RETAIN_CORPORA


@dataclass
class RunArgs:
    """What to unlearn, from which data, and where to write."""

    method: str = simple_parsing.field(
        default="lens", help=f"Unlearning method: {', '.join(method_names())}."
    )
    """Unlearning method (--help lists the registered ones: `methods.registry`)."""
    out: str | None = None
    """Run directory (model at OUT/model, config and final losses at OUT/run.json)."""
    world: str | None = None
    """Mini world directory (default model, corpora and evaluation questions)."""
    model_args: ModelArgs = field(default_factory=ModelArgs)
    """The model to unlearn (--model, --revision, --trust_remote_code); default: the world's
    target."""
    forget_corpus: str | None = None
    """Forget corpus: local .jsonl/.json/.parquet/.txt or hub ID[:CONFIG[:SPLIT]]; default: the
    world's unlearn group."""
    retain_corpus: str | None = None
    """Retain corpus (same forms; wikitext is grouped into articles); default: the world's
    retain, near_domain_retain and filler documents (general facts, benign text about other
    forget-domain entities like WMDP's bio retain corpus, and general text like wikitext)."""
    retain_mix: str | None = None
    """Second retain corpus mixed in at --mix_fraction, e.g. ultrachat (chat turns joined)."""
    mix_fraction: float = 0.0
    """Share of the retain examples drawn from --retain_mix."""
    text_fields: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_FIELDS))
    """Fields whose text makes a document; those a corpus has are joined (chat turns too)."""
    eval: bool = True
    """Evaluate the trained model on the evaluation suite after training."""
    suite: SuiteArgs = field(default_factory=SuiteArgs)
    """The evaluation suite (--forget_tasks, --retain_tasks, --other_tasks, --eval_limit)."""
    eval_batch_size: int = 64
    curve: CurveArgs = field(default_factory=CurveArgs)
    """Evaluation during training (--eval_every, --save_best, --delta; recipes.eval_curve)."""
    modifiers: StepModifiers = field(default_factory=StepModifiers)
    """Step modifiers any method can train with (--lat_eps, --lat_steps, --lat_layers,
    --sam_rho; training.modifiers): part of the run's config."""
    run_id: str | None = None
    """Id in run.json and the store (default: the run directory's name)."""
    store: str | None = None
    """SQLite results store to index the run in."""
    progress: bool = True
    """Show progress bars."""
    cache: FrozenCacheArgs = field(default_factory=FrozenCacheArgs)
    """The frozen-output cache (--frozen_cache, --frozen_cache_dir, --frozen_cache_gb,
    --frozen_cache_memory_gb): where it lives does not change a run's results, so it is not
    part of its config."""
    tracking: TrackingArgs = field(default_factory=TrackingArgs)
    """Experiment trackers (--report_to, --project, --run_name, --group, --tags,
    --tracking_dir): operational, not part of the run's config."""

    def __post_init__(self) -> None:
        if not self.out:
            raise UsageError("--out DIR is required")
        if self.world is None and (
            self.model_args.model is None
            or self.forget_corpus is None
            or self.retain_corpus is None
        ):
            raise UsageError("without --world, give --model, --forget_corpus and --retain_corpus")
        if not 0 <= self.mix_fraction <= 1:
            raise UsageError(f"--mix_fraction must be in [0, 1], got {self.mix_fraction}")
        if (self.mix_fraction > 0) != (self.retain_mix is not None):
            raise UsageError("--retain_mix and --mix_fraction > 0 go together")
        if not self.text_fields:
            raise UsageError("--text_fields needs at least one field name")


@dataclass
class RunConfig:
    args: RunArgs
    train: TrainConfig
    lora: LoraSettings
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        # Every way to a run config (flags, --config files, sweep points, search trials) ends
        # here: a setting the method would ignore is refused, not recorded as if it mattered.
        get_method(self.args.method).check_settings(self.method)
        self.args.modifiers.check_mode(self.train.distributed)

    def to_dict(self) -> dict:
        return {
            "method": self.args.method,
            **{k: v for k, v in dataclasses.asdict(self.method).items()},
            **dataclasses.asdict(self.train),
            **dataclasses.asdict(self.lora),
            "model": self.args.model_args.model,
            "revision": self.args.model_args.revision,
            "world": self.args.world,
            **{
                k: getattr(self.args, k)
                for k in ("forget_corpus", "retain_corpus", "retain_mix", "mix_fraction")
                if getattr(self.args, k)
            },
            **suite_fields(self.args.suite),
            **curve_fields(self.args.curve),
            **modifier_fields(self.args.modifiers),
        }


def suite_fields(args: SuiteArgs) -> dict:
    """The suite fields a run was given (none: the defaults), for run.json and resume checks."""
    given = dataclasses.asdict(args)
    defaults = dataclasses.asdict(SuiteArgs())
    return {k: v for k, v in given.items() if v != defaults[k]}


def run_sections(method: str) -> tuple[type, ...]:
    """The sections of a run config of `method`, in the order `build_sections` builds them."""
    return (RunArgs, TrainConfig, LoraSettings, get_method(method).config_cls)


def build_run_config(method: str, overrides: dict, where: str = "") -> RunConfig:
    """A RunConfig from flat field names (`retain_coef`, `lr`, `lora_r`, `out`, `model`, ...).

    Defaults: each dataclass's own, then the method's documented train defaults, then overrides.
    Unknown fields and values of the wrong type raise UsageError (so a sweep spec typo fails
    before anything runs); `where` prefixes the message.
    """
    method_cls = get_method(method)
    sections = run_sections(method)
    values = {**method_cls.train_defaults, **overrides, "method": method}
    built = build_sections(sections, values, f"{method} config", where)
    return RunConfig(
        args=built[RunArgs],
        train=built[TrainConfig],
        lora=built[LoraSettings],
        method=built[method_cls.config_cls],
    )


@dataclass
class Prepared:
    """A run ready to train: model, reference, method with its helpers, data streams, plan."""

    model: torch.nn.Module
    reference: Reference
    method: Method
    tokenizer: object
    forget: ExampleStream
    retain: ExampleStream
    plan: Plan
    device: torch.device
    world: object | None
    parallel: Parallel = field(default_factory=Parallel)
    frozen_cache: FrozenCache | None = None


@dataclass
class Validated:
    """What validation found; nothing heavy has been loaded yet."""

    world: object | None
    model_ref: ModelRef
    out: Path
    """The run directory (absolute), checked: new, empty, or a run directory of this kind."""
    forget_texts: list[str]
    retain_texts: list[str]
    mix_texts: list[str] = field(default_factory=list)
    suite: Suite | None = None
    """The evaluation suite, resolved (None with --eval false)."""


def validate(cfg: RunConfig) -> Validated:
    """Every check that needs no weights: method, world, model config, layers, corpora."""
    args = cfg.args
    get_method(args.method)
    world = load_world(args.world) if args.world else None
    ref = args.model_args.resolve(world, default=world.target if world else None)
    n_layers = model_num_layers(ref)
    cfg.method.check_layers(n_layers)
    cfg.args.modifiers.check_layers(n_layers)
    cfg.method.check_inputs(ref, n_layers)  # e.g. a --lens hub id, found before weights load
    cfg.method.check_training(ref, cfg.train, cfg.lora)  # e.g. tar: no fsdp2
    # The output directory and the store before anything is written or loaded: OUT must not
    # hold the model (reset deletes OUT/model) and must be ours to replace.
    inputs = {"input model": ref.name, "source checkpoint": getattr(cfg.method, "source", None),
              "initial safeguard": getattr(cfg.method, "safeguard", None)}  # fmt: skip
    out = check_destination(args.out, "unlearn", inputs, args.store)
    if cfg.lora.lora:  # peft would report a bad name only after the weights loaded
        check_lora_targets(ref, cfg.lora.lora_target_modules)
    fields = args.text_fields
    forget = load_documents(args.forget_corpus or world.corpora["forget_unlearn"], fields)
    if args.retain_corpus:
        retain = load_documents(args.retain_corpus, fields)
    else:
        corpora = [world.corpora[name] for name in WORLD_RETAIN_CORPORA]
        retain = [d for path in corpora for d in load_documents(path, fields)]
    mix = load_documents(args.retain_mix, fields) if args.retain_mix else []
    if world is not None:  # lens / affine fitting reads it after the model loads: check it now
        load_documents(world.corpora["filler"], ("text",))
    for name, docs in (("forget", forget), ("retain", retain), ("retain_mix", mix)):
        if not docs and (name != "retain_mix" or args.retain_mix):
            raise UsageError(f"the {name} corpus has no documents")
    suite = resolve_suite(args.suite, world) if args.eval else None
    return Validated(world, ref, out, forget, retain, mix, suite)


def training_documents(cfg: RunConfig, v: Validated) -> tuple[list[str], list[str]]:
    """num_train_examples forget and retain documents, each side a seeded shuffle (the retain
    side mixed with --retain_mix at --mix_fraction)."""
    n, seed = cfg.train.num_train_examples, cfg.train.seed
    forget = sample_documents(v.forget_texts, n, seed)
    if v.mix_texts:
        retain = mix_documents(v.retain_texts, v.mix_texts, cfg.args.mix_fraction, n, seed + 1)
    else:
        retain = sample_documents(v.retain_texts, n, seed + 1)
    return forget, retain


def prepare(cfg: RunConfig, v: Validated, out: Path, par: Parallel | None = None) -> Prepared:
    """Load the model, attach LoRA or copy the reference, set the method up, build the data;
    under torchrun (`par`), wrap the model for DDP or shard it with FSDP2 after the setup."""
    tcfg = cfg.train
    par = par or setup(tcfg.distributed, tcfg.collective_timeout)
    device = par.device
    torch.manual_seed(tcfg.seed)
    tokenizer = load_tokenizer(v.model_ref)
    n = tcfg.num_train_examples
    forget_docs, retain_docs = training_documents(cfg, v)
    forget_ex = tokenize_examples(forget_docs, tokenizer, tcfg.max_length)
    retain_ex = tokenize_examples(retain_docs, tokenizer, tcfg.max_length)
    if len(forget_ex) < n:
        print(
            f"note: the forget corpus has {len(forget_ex)} documents (< num_train_examples={n}):"
            " they are repeated",
            file=sys.stderr,
        )
    pad = tokenizer.pad_token_id
    forget = ExampleStream(forget_ex, tcfg.pdbs, pad, tcfg.seed)
    retain = ExampleStream(retain_ex, tcfg.pdbs, pad, tcfg.seed + 1)

    model = load_model(v.model_ref, tcfg.dtype, device)
    if tcfg.gradient_checkpointing:  # before LoRA wraps it: the base model's blocks checkpoint
        enable_gradient_checkpointing(model)
    # The original weights: constant during the run (LoRA freezes them; full fine-tuning copies).
    ref_key = frozen_key(v.model_ref, tcfg.dtype, device, tcfg.mixed_precision)
    if cfg.lora.lora:
        model = attach_lora(model, cfg.lora)
        reference = Reference(model, key=ref_key)
    else:
        frozen = match_frozen_copy(copy.deepcopy(model), tcfg.mixed_precision, tcfg.distributed)
        reference = Reference(model, frozen_copy=frozen, key=ref_key)
        model.requires_grad_(True)
    method = get_method(cfg.args.method)(cfg.method)
    # Lenses / affine maps are fitted on the world's general text, or else on the retain sample
    # (a hub retain corpus can hold millions of documents).
    general = v.retain_texts if v.world is not None else retain_docs
    env = _method_env(v.world, v.model_ref, tokenizer, device, tcfg, general, out)
    with par.main_first():  # rank 0 fits and caches lenses / affine maps, the others load them
        method.setup(model, env)
    # The loop asks it for each micro-batch's gradients (None: both modifiers off).
    method.step_modifier = build_modifier(cfg.args.modifiers, num_layers(model))
    frozen_params = [p for name, p in model.named_parameters()
                     if p.requires_grad and not method.trainable(name)]  # fmt: skip
    for p in frozen_params:  # before wrapping: DDP and FSDP2 see which parameters train
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"method {cfg.args.method} leaves no parameter of the model to train")
    par.wrap(model, tcfg.mixed_precision)
    plan = make_plan(tcfg, len(forget_ex), method.phases, par.world_size)
    world_root = v.world.root if v.world is not None else None  # type: ignore[attr-defined]
    frozen = frozen_from_args(cfg.args.cache, world_root, out)
    if frozen is not None:  # ranks run equally many frozen forwards (FSDP2's all-gathers)
        frozen.agree = par.frozen_forwards_agreement()
    return Prepared(
        model, reference, method, tokenizer, forget, retain, plan, device, v.world, par, frozen
    )


def run_unlearning(cfg: RunConfig, monitor: Monitor | None = None) -> RunMeta:
    """Train, save, evaluate. Returns the final RunMeta (status done/collapsed/diverged/failed,
    or pruned by the `monitor`; `unlearn.runs.lifecycle` decides it)."""
    return run_regime(Unlearning(cfg, monitor))


class Unlearning:
    """The unlearning regime of the recipe skeleton (`unlearn.recipes.skeleton`)."""

    def __init__(self, cfg: RunConfig, monitor: Monitor | None = None) -> None:
        self.cfg, self.monitor = cfg, monitor
        self.keeper: BestKeeper | None = None

    def launch(self) -> Launch:
        cfg, args = self.cfg, self.cfg.args
        self.validated = validate(cfg)
        args.curve.check(cfg.train, self.validated.suite)
        return Launch(
            kind="unlearn",
            out=self.validated.out,
            model=self.validated.model_ref,
            config=cfg.to_dict(),
            train=cfg.train,
            suite=self.validated.suite,
            run_id=args.run_id,
            store=args.store,
            method=args.method,
            progress=args.progress,
            tracking=args.tracking,
        )

    def build(self, session: Session) -> Trainee:
        p = prepare(self.cfg, self.validated, session.out, session.parallel)
        args = self.cfg.args
        if args.curve.save_best:  # a resumed run keeps the best it had chosen
            self.keeper = BestKeeper.open(session, args.curve.margin, self.cfg.lora.merge)
        on_step = live_evaluations(
            session, p.model, p.tokenizer, args.eval_batch_size, p.plan.total_steps,
            args.curve.eval_every, self.monitor, self.keeper,
        )  # fmt: skip
        return Trainee(
            p.model, p.method, p.tokenizer, p.forget, p.plan, p.reference, p.retain, on_step,
            p.frozen_cache,
        )  # fmt: skip

    def finish(self, session: Session, t: Trainee, state: TrainState) -> None:
        run = session.run
        # The loss terms and their weighted total; coefficients, lr and grad norm are in
        # metrics.jsonl.
        final = {k: v for k, v in state.last.items() if k in state.first_values or k == "loss"}
        paths = run.save_model(session.parallel, t.model, t.tokenizer, merge=self.cfg.lora.merge)
        run.update(
            final=final,
            model_path=paths.get("model", paths.get("adapter")),
            config={**run.meta.config, **t.objective.describe(), **_modifier_describe(t)},
        )
        if session.suite is not None:
            final_evaluation(
                session, t.model, t.tokenizer, self.cfg.args.eval_batch_size,
                t.plan.total_steps, self.keeper,
            )  # fmt: skip


def _modifier_describe(t: Trainee) -> dict:
    """The step modifier's resolved defaults (its latent adversary's blocks), if it has one."""
    modifier = getattr(t.objective, "step_modifier", None)
    return modifier.describe() if modifier is not None else {}


def _method_env(world, model_ref, tokenizer, device, tcfg, retain_texts, out) -> MethodEnv:
    """General text for fitting lenses/affine maps: the retain documents (+ the world's filler)."""
    general = general_texts(world, extra=list(retain_texts))
    cut = max(1, len(general) // 5)
    return MethodEnv(
        model_name=model_ref.name,
        revision=model_ref.revision,
        trust_remote_code=model_ref.trust_remote_code,
        tokenizer=tokenizer,
        device=device,
        dtype=tcfg.dtype,
        mixed_precision=tcfg.mixed_precision,
        world=world,
        fit_texts=general[cut:],
        heldout_texts=general[:cut],
        out_dir=out,
    )
