"""The `World` handle and `world.json`, the index of a world directory.

`world.json` stores every path relative to the world directory, so a world can be moved or
copied; `load_world` turns them into absolute paths and checks they exist, so a stage that gets a
`World` never meets a missing file halfway through a run. Every question file is validated too
(`unlearn.eval.questions`): a few thousand short JSON lines, read in milliseconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError
from unlearn.eval.questions import read_questions
from unlearn.fsutil import read_jsonl

WORLD_FORMAT = 2
"""2 added the retain_late and near_domain tasks and the general_ppl perplexity task.
A format-1 world is refused with one line naming the command that rebuilds it: its models never
saw the new facts, so no evaluation of it could be compared with a format-2 world's."""
WORLD_FILE = "world.json"


@dataclass(frozen=True)
class World:
    """A built mini world: absolute paths to its tokenizer, models, questions and corpora."""

    root: Path
    preset: str
    seed: int
    tokenizer: Path
    target: Path
    """The fully pretrained model (has seen every forget group)."""
    filtered: Path
    """The data-filtered twin: same schedule and token budget, never saw a forget document."""
    ignorant_checkpoint: Path
    """The last phase-1 checkpoint of the target's run (never saw a forget document)."""
    checkpoints: tuple[Path, ...]
    """The target run's intermediate checkpoints, in training order."""
    questions: dict[str, Path]
    """Task (forget, forget_heldout, forget_attack, retain) -> question JSONL."""
    corpora: dict[str, Path]
    """forget_unlearn, forget_attack, forget_heldout, retain, filler -> document JSONL."""
    groups: dict[str, list[str]]
    """Forget group (unlearn, attack, heldout) -> pathogen names."""
    perplexity: dict[str, Path] = field(default_factory=dict)
    """Perplexity task (general_ppl) -> JSONL of held-out {"text"} documents no model of the
    world was trained on."""
    stats: dict[str, Any] = field(default_factory=dict)

    def read_questions(self, task: str) -> list[dict]:
        if task not in self.questions:
            raise UsageError(f"world has no question task {task!r} (has {sorted(self.questions)})")
        return read_questions(self.questions[task])

    def read_corpus(self, name: str) -> list[str]:
        """The documents of corpus `name` as plain strings."""
        if name not in self.corpora:
            raise UsageError(f"world has no corpus {name!r} (has {sorted(self.corpora)})")
        return [row["text"] for row in read_jsonl(self.corpora[name])]

    def to_json(self) -> dict[str, Any]:
        """The world.json object, with paths relative to `root`."""

        def rel(p: Path) -> str:
            return Path(os.path.relpath(p, self.root)).as_posix()

        return {
            "format": WORLD_FORMAT,
            "preset": self.preset,
            "seed": self.seed,
            "tokenizer": rel(self.tokenizer),
            "target": rel(self.target),
            "filtered": rel(self.filtered),
            "ignorant_checkpoint": rel(self.ignorant_checkpoint),
            "checkpoints": [rel(p) for p in self.checkpoints],
            "questions": {k: rel(p) for k, p in self.questions.items()},
            "corpora": {k: rel(p) for k, p in self.corpora.items()},
            "groups": self.groups,
            "perplexity": {k: rel(p) for k, p in self.perplexity.items()},
            "stats": self.stats,
        }


def load_world(path: str | os.PathLike) -> World:
    """Read DIR/world.json into a `World` with absolute paths (UsageError if it is not a world)."""
    root = Path(path).expanduser().absolute()
    index = root / WORLD_FILE
    try:
        data = json.loads(index.read_text())
    except FileNotFoundError:
        raise UsageError(f"{root} is not a world directory (no {WORLD_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {index}: {e}") from None
    if not isinstance(data, dict) or "format" not in data:
        raise UsageError(f"{index} is not a world index (no format)")
    if data["format"] != WORLD_FORMAT:
        raise UsageError(
            f"{root} is a format-{data['format']} world; this version reads format {WORLD_FORMAT} "
            f"(rebuild it: unlearn world build --preset {data.get('preset', 'PRESET')} "
            f"--seed {data.get('seed', 'SEED')} --out DIR)"
        )

    def resolve(rel: object) -> Path:
        if not isinstance(rel, str):
            raise UsageError(f"{index}: expected a relative path, got {rel!r}")
        p = root / rel
        if not p.exists():
            raise UsageError(f"{index} names {rel}, which does not exist")
        return p

    try:
        world = World(
            root=root,
            preset=str(data["preset"]),
            seed=int(data["seed"]),
            tokenizer=resolve(data["tokenizer"]),
            target=resolve(data["target"]),
            filtered=resolve(data["filtered"]),
            ignorant_checkpoint=resolve(data["ignorant_checkpoint"]),
            checkpoints=tuple(resolve(p) for p in data["checkpoints"]),
            questions={k: resolve(p) for k, p in data["questions"].items()},
            corpora={k: resolve(p) for k, p in data["corpora"].items()},
            groups={k: list(v) for k, v in data["groups"].items()},
            perplexity={k: resolve(p) for k, p in data.get("perplexity", {}).items()},
            stats=dict(data.get("stats", {})),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{index} is incomplete or malformed ({type(e).__name__}: {e})") from None
    # Every command that reads questions loads the world first, before any weights: checking
    # each question file here makes a bad row one line naming FILE:LINE for all of them.
    for path in world.questions.values():
        read_questions(path)
    return world
