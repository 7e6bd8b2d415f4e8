"""Mini-world presets: how big the world is and how its models are pretrained.

A preset fixes everything a build needs except the seed, so `(preset, seed)` names a world.
`tiny` is sized for the test suite (built once per test session in well under a minute on two
CPU cores); `default` is the research instrument (a 6-layer model, a few hundred questions per
task, built in minutes); `small` is default's world on a narrower model, the demo's (built in
about half the time). Step counts are in optimizer steps; phase 2 is the same length for the
target and its filtered twin, so both see the same token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from unlearn.errors import UsageError


@dataclass(frozen=True)
class Preset:
    """One world size and pretraining recipe."""

    name: str

    # --- the world ---
    pathogens_per_group: int
    """Forget-domain entities in each of the groups unlearn / attack / heldout."""
    people: int
    """Retain-domain people."""
    towns: int
    """Retain-domain towns."""
    pathogen_relations: int
    """How many of the pathogen relations (in catalog order) each pathogen has."""
    person_relations: int
    town_relations: int
    docs_per_entity: int
    """Documents written about each entity; each states all its facts, one per line, through a
    rotating choice of paraphrase templates, so every template is used for every fact once
    `docs_per_entity` reaches the number of templates."""
    filler_docs: int
    """Fact-free documents of general text (retain-side training data and 'general text')."""
    late_people: int
    """`retain_late` people: their documents first appear in phase 2."""
    late_towns: int
    near_relations: int
    """How many of the benign near-domain relations each pathogen has (its own documents)."""
    heldout_filler_docs: int
    """Filler documents no model trains on: the `general_ppl` (perplexity) task."""

    # --- the tokenizer and model ---
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int

    # --- pretraining ---
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int
    phase1_steps: int
    """Steps without forget and late-retain documents; the last phase-1 checkpoint is the ignorant
    one."""
    phase2_steps: int
    """Steps with forget documents mixed in (target) or without them (filtered twin)."""
    checkpoint_interval: int
    forget_weight: int = 1
    """How many times each forget and each late-retain document appears per phase-2 epoch
    (upsampling: the late facts are learnt at the forget facts' rate)."""
    weight_decay: float = 0.0
    final_lr_ratio: float = 0.1
    """LR at the last step, as a fraction of `lr` (cosine decay after the warmup)."""
    threads: int = 2
    """torch CPU threads for the build (results are reproducible per seed and thread layout).
    Phase 2's two runs get max(1, threads // 2) each when they run side by side (the default on
    2+ cores). Small models gain little from a second thread, and on a busy machine two threads
    competing with other processes for two cores can run many times slower than one."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and f.name != "warmup_steps" and value <= 0:
                raise UsageError(f"preset {self.name}: {f.name} must be positive, got {value}")
        if self.warmup_steps < 0:
            raise UsageError(f"preset {self.name}: warmup_steps must be >= 0")
        if not 0 < self.lr < 1:
            raise UsageError(f"preset {self.name}: lr must be in (0, 1), got {self.lr}")
        if not 0 < self.final_lr_ratio <= 1:
            raise UsageError(f"preset {self.name}: final_lr_ratio must be in (0, 1]")
        if self.hidden_size % self.heads:
            raise UsageError(f"preset {self.name}: hidden_size must be a multiple of heads")
        # The ignorant checkpoint must be exactly the end of phase 1, so checkpoints land there.
        if self.phase1_steps % self.checkpoint_interval or (
            self.phase2_steps % self.checkpoint_interval
        ):
            raise UsageError(
                f"preset {self.name}: checkpoint_interval must divide phase1_steps and phase2_steps"
            )
        if self.vocab_size < 300:
            raise UsageError(f"preset {self.name}: vocab_size must be >= 300 (256 byte tokens)")

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        pathogens_per_group=12,
        people=24,
        towns=12,
        pathogen_relations=4,
        person_relations=3,
        town_relations=3,
        docs_per_entity=3,
        filler_docs=40,
        late_people=12,
        late_towns=6,
        near_relations=2,
        heldout_filler_docs=20,
        vocab_size=512,
        hidden_size=64,
        layers=4,
        heads=4,
        seq_len=64,
        batch_size=16,
        lr=5e-3,
        warmup_steps=30,
        phase1_steps=400,
        phase2_steps=600,
        checkpoint_interval=100,
        forget_weight=2,
        threads=1,
    ),
    "default": Preset(
        name="default",
        pathogens_per_group=40,
        people=60,
        towns=30,
        pathogen_relations=6,
        person_relations=5,
        town_relations=4,
        docs_per_entity=4,
        filler_docs=200,
        late_people=30,
        late_towns=15,
        near_relations=3,
        heldout_filler_docs=50,
        vocab_size=1024,
        hidden_size=128,
        layers=6,
        heads=4,
        seq_len=64,
        batch_size=32,
        lr=3e-3,
        warmup_steps=40,
        phase1_steps=400,
        phase2_steps=500,
        checkpoint_interval=100,
        forget_weight=2,
    ),
}
# The default world's facts, documents and schedule on a model half as wide (hidden 64: 0.43M
# parameters, a training step 2.3x cheaper at one thread), at a higher peak lr (1e-2; at 5e-3 it
# learnt only 71% of the forget facts in the same steps). Its world builds in about 140 s on two
# cores instead of 280 s, which is what lets `unlearn demo` (the whole campaign, world included)
# run in about 6 minutes; its baselines are within a few points of default's (docs/world.md).
PRESETS["small"] = replace(PRESETS["default"], name="small", hidden_size=64, lr=1e-2)


def get_preset(name: str) -> Preset:
    """The preset called `name` (UsageError naming the choices if there is none)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None
