"""Model references: a local directory or a hub id + revision, validated from the config alone.

The mini world's models are ordinary HF model directories, so the same code path serves a 1M-
parameter world model and a 6.9B hub checkpoint (`--model EleutherAI/deep-ignorance-unfiltered
--revision global_step38144`). `resolve_model` validates a reference cheaply (config only) so a
bad `--model` fails with one line before any weights load.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unlearn.errors import UsageError
from unlearn.fsutil import check_safetensors

if TYPE_CHECKING:
    import torch

WEIGHT_GLOBS = ("*.safetensors", "*.bin")
"""Weight files of a local model directory."""


@dataclass(frozen=True)
class ModelRef:
    """A validated model reference: a local dir or a hub id (+ revision)."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False
    """Run the repository's own modelling code (off unless asked: it executes downloaded code)."""

    @property
    def is_local(self) -> bool:
        return Path(self.name).exists()

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name

    def cache_key(self) -> dict:
        """What tells this model's weights apart, for caches of things fitted to them (lenses,
        affine maps): the name and revision, and for a local directory its weight files' sizes
        and modification times, so new weights written to the same path (a rerun into the
        same run directory) are another model. Cheap: nothing is read or hashed."""
        key: dict = {"name": self.name, "revision": self.revision}
        path = Path(self.name)
        if path.is_dir():
            files = sorted(p for ext in WEIGHT_GLOBS for p in path.glob(ext))
            key["weights"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return key


SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "max_position_embeddings",
               "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "d_model",
               "num_layers", "ffn_dim")  # fmt: skip
"""Config fields that size a model (null allowed where the architecture derives them): a value
that is not an integer >= 1 would fail deep inside the weight load."""


def check_config_sizes(config: dict, where: str) -> None:
    """UsageError naming the field unless every size field of `config` (a config.json object)
    is null or an integer >= 1; `where` names the file or model in the message."""
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{where}: {name} must be an integer >= 1, got {value!r}")


def _check_local_model(path: Path, name: str) -> None:
    """A local model directory's config.json (JSON, size fields) and safetensors weights (whole,
    and every shard an index names present), checked without loading any weights."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{config_file} is not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} is not a JSON object")
    check_config_sizes(config, str(config_file))
    for index_file in path.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{index_file} is not a readable weight index") from None
        missing = sorted(str(s) for s in shards if not (path / str(s)).is_file())
        if missing:
            raise UsageError(f"{index_file} names {missing[0]}, which is not in {name}")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(
    name: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    world_dir: str | os.PathLike | None = None,
) -> ModelRef:
    """Check that `name` is a causal LM (local dir with a config, or a reachable hub id).

    A relative path that does not exist here but does inside `world_dir` is taken from the world:
    world.json stores paths relative to the world, so `--model "$(jq -r .target W/world.json)"
    --world W` works from any directory. Reads only the config (and for a local directory the
    safetensors headers and file sizes: a truncated weight file is one line here, not a
    traceback in the load), so it is cheap and runs before any weights load.

    A `revision` with a local directory is refused (UsageError), not warned about: transformers
    ignores it for a directory, which holds exactly one version, so the run would use that
    version while its config (and any cache key) recorded the revision. Point at the revision's
    own directory, or give the hub id with the revision.
    """
    from transformers import AutoConfig

    name = str(name)
    path = Path(name).expanduser()
    if world_dir is not None and not path.is_absolute() and not path.exists():
        in_world = Path(world_dir) / path
        if in_world.exists():
            path = in_world
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"{name} is not a model directory (no config.json)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UsageError(f"{name} is not a model directory (no weight files)")
        if revision is not None:
            raise UsageError(
                f"revision {revision!r} given for the local model directory {name}: a directory "
                "holds one version (drop the revision, or give the hub id with it)"
            )
        _check_local_model(path, name)
        name = str(path.absolute())
    elif not _looks_like_hub_id(name):
        raise UsageError(f"model {name} not found (neither a local directory nor a hub id)")
    try:  # transformers 5 validates configs through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        StrictDataclassError = ValueError

    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load model config for {name}"
            f"{'@' + revision if revision else ''}: {first} "
            "(offline? download it on a connected machine or pass a local directory; "
            "HF_HUB_OFFLINE=1 skips the connection attempts)"
        ) from None
    except (ValueError, StrictDataclassError) as e:
        # transformers' own config checks (e.g. a hidden size the heads do not divide): the
        # message's last line is the specific one.
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UsageError(f"{name} is not a usable model: {lines[-1] if lines else e!r}") from None
    check_config_sizes(config.to_dict(), f"{name}{'@' + revision if revision else ''}")
    return ModelRef(name, revision, trust_remote_code)


def model_num_layers(ref: ModelRef) -> int:
    """Number of transformer blocks, read from the config alone (no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        ref.name, revision=ref.revision, trust_remote_code=ref.trust_remote_code
    )
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise UsageError(f"{ref}: cannot tell the number of layers from its config")


@functools.lru_cache(maxsize=16)
def meta_model(ref: ModelRef) -> torch.nn.Module:
    """The model built on the meta device from its config alone: its module tree and class
    attributes, with no weight read or allocated (cheap even for a 7B model). Raises whatever
    transformers raises when the model cannot be built that way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        ref.name, revision=ref.revision, trust_remote_code=ref.trust_remote_code
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)


def meta_model_or_note(ref: ModelRef, later: str) -> torch.nn.Module | None:
    """`meta_model(ref)`, or None with a note on stderr saying what is checked `later` instead
    (some remote code makes real tensors in its constructor)."""
    try:
        return meta_model(ref)
    except Exception as e:  # not a verdict on the model: the check runs when it loads
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"note: cannot build {ref} without its weights ({first}); {later}", file=sys.stderr)
        return None
