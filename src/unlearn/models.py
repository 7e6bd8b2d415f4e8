"""Loading models and tokenizers, by local directory or hub id + revision.

The mini world's models are ordinary HF model directories, so the same code path serves a 1M-
parameter world model and a 6.9B hub checkpoint (`--model EleutherAI/deep-ignorance-unfiltered
--revision global_step38144`). `resolve_model` validates a reference cheaply (config only) so a
bad `--model` fails with one line before any weights load.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn.errors import UsageError
from unlearn.fsutil import atomic_dir, check_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def load_tokenizer(ref: ModelRef, tokenizer: str | None = None):
    """The model's tokenizer (or an explicit one), with a pad token for batching."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        tokenizer or ref.name,
        revision=None if tokenizer else ref.revision,
        trust_remote_code=ref.trust_remote_code,
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: ModelRef, dtype: str = "float32", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a causal LM in `dtype` on `device`, in eval mode (remote code as `ref` allows)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    model = AutoModelForCausalLM.from_pretrained(
        ref.name,
        revision=ref.revision,
        dtype=DTYPES[dtype],
        trust_remote_code=ref.trust_remote_code,
    )
    return model.to(device).eval()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (no dropout, LoRA dropout included) inside the block, and every
    module back in the mode it was in afterwards, also when the block raises: evaluating or
    fitting in the middle of training must not leave dropout off for the steps that follow.

    The reference model enters it once or twice per micro-batch, so it flips the `training` flag
    of the modules that are training and only those, instead of `train()`'s recursion over every
    module (about ten times slower). A module whose class gives `train()` side effects (DoRA
    clears a cache, transformers re-selects hub kernels) makes it go through `train()` itself.
    """
    modules = _submodules(model)
    overriding = [m for m in modules if type(m).train is not torch.nn.Module.train]
    if not all(_plain_train(m) for m in overriding):
        flags = [(m, m.training) for m in modules]  # modules[0] is model
        model.eval()
        try:
            yield model
        finally:
            model.train(flags[0][1])
            for m, flag in flags:  # train() set the root's mode everywhere; some had their own
                if m.training != flag:
                    _set_plain(m, "training", flag)
        return
    training = [m for m in modules if m.training]
    for m in training:
        _set_plain(m, "training", False)
    try:
        yield model
    finally:
        for m in training:
            _set_plain(m, "training", True)


def _submodules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model` and every module under it, once each (as `modules()`, without building every
    module's dotted name, which costs more than the walk)."""
    seen: set[int] = set()
    out: list[torch.nn.Module] = []
    stack: list[torch.nn.Module | None] = [model]
    while stack:
        module = stack.pop()
        if module is not None and id(module) not in seen:  # a child slot may hold None
            seen.add(id(module))
            out.append(module)
            stack.extend(module._modules.values())
    return out


def _plain_train(module: torch.nn.Module) -> bool:
    """Whether switching `module`'s mode only sets its flag although its class overrides
    `train()`: transformers' override does more only with hub kernels (`use_kernels`)."""
    from transformers import PreTrainedModel

    return type(module).train is PreTrainedModel.train and not getattr(module, "use_kernels", False)


def _set_plain(module: torch.nn.Module, name: str, value: object) -> None:
    """Set a plain attribute of `module`: what nn.Module's own __setattr__ ends in for a value
    that is no parameter, buffer or module, without its checks for those, which cost ten times
    the assignment."""
    object.__setattr__(module, name, value)


_UNSET = object()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The PEFT model `model` computing as its base model (every adapter layer off) inside the
    block, and each layer back in its previous state afterwards, also when the block raises.

    What peft's `disable_adapter()` does for LoRA-like adapters, without its costs and side
    effects: it walks every module twice and formats each adapter layer's repr
    (`get_model_status`), ~5 ms per call on the mini world's model, once or twice per
    micro-batch; and it turns requires_grad off on every adapter inside and back on for every
    active adapter on exit, undoing any freezing done since. This sets only the flag the adapter
    layers' forward reads (`_disable_adapters`) and the PEFT model's own `_adapters_disabled`,
    and never changes requires_grad. Prompt-learning adapters have no such layers: for them
    peft's own context is used.
    """
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning or config.is_adaption_prompt:
        with model.disable_adapter():
            yield model
        return
    tuner_layers = _tuner_layer_types()
    flags = [
        (m, "_disable_adapters") for m in _submodules(model) if isinstance(m, tuner_layers)
    ] + [(model, "_adapters_disabled")]
    # The instance's own value (or _UNSET where the class default applies), restored as found.
    saved = [(m, name, m.__dict__.get(name, _UNSET)) for m, name in flags]
    try:
        for m, name in flags:
            _set_plain(m, name, True)
        yield model
    finally:
        for m, name, value in saved:
            if value is _UNSET:
                m.__dict__.pop(name, None)
            else:
                _set_plain(m, name, value)


@functools.cache
def _tuner_layer_types() -> tuple[type, ...]:
    """peft's classes whose forward skips the adapter when `_disable_adapters` is set (what
    its `enable_adapters(False)` sets): adapter layers and wrapped modules_to_save."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    return (BaseTunerLayer, AuxiliaryTrainingWrapper)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


LORA_ALL_LINEAR = "all-linear"
"""peft's name for every linear layer of the blocks (the default `--lora_target_modules`)."""


@functools.lru_cache(maxsize=16)
def module_kinds(ref: ModelRef) -> dict[str, type] | None:
    """{module name: module class} of the model, built on the meta device from its config alone
    (no weights are read or allocated, so this is cheap even for a 7B model); None when the
    model cannot be built that way (some remote code makes real tensors in its constructor)."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(
            ref.name, revision=ref.revision, trust_remote_code=ref.trust_remote_code
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=ref.trust_remote_code
            )
    except Exception as e:  # not a verdict on the names: peft still checks them at load time
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"note: cannot list the modules of {ref} without its weights ({first});"
            " --lora_target_modules is checked when the model loads",
            file=sys.stderr,
        )
        return None
    return {name: type(module) for name, module in model.named_modules() if name}


def _lora_supported(kind: type) -> bool:
    """Module classes peft's LoRA can wrap (the ones a causal LM's target modules use)."""
    from transformers.pytorch_utils import Conv1D

    plain = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return issubclass(kind, plain)


def check_lora_targets(model_ref: ModelRef, modules: list[str]) -> None:
    """UsageError unless every `--lora_target_modules` entry names modules of the model that LoRA
    can wrap, matched as peft matches them (a module's full name, or a dotted suffix of it).

    peft finds a bad name only after the weights loaded (and ignores a name that matches nothing
    when another one matches), so a typo would cost a model load or silently adapt fewer layers.
    """
    if list(modules) == [LORA_ALL_LINEAR]:
        return
    if not modules:
        raise UsageError("--lora_target_modules is empty (all-linear adapts every linear layer)")
    if LORA_ALL_LINEAR in modules:
        raise UsageError(f"--lora_target_modules: {LORA_ALL_LINEAR} cannot be combined with names")
    kinds = module_kinds(model_ref)
    if kinds is None:
        return
    supported = {name for name, kind in kinds.items() if _lora_supported(kind)}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in supported})
    for target in modules:
        matched = {
            name: kind
            for name, kind in kinds.items()
            if name == target or name.endswith(f".{target}")
        }
        if not matched:
            raise UsageError(
                f"--lora_target_modules: {model_ref} has no module named {target!r}"
                f" (modules LoRA can adapt: {', '.join(leaves)}; or all-linear)"
            )
        unsupported = sorted({k.__name__ for name, k in matched.items() if name not in supported})
        if unsupported:
            raise UsageError(
                f"--lora_target_modules: {target!r} names {'/'.join(unsupported)} modules, which"
                f" LoRA cannot adapt (it can: {', '.join(leaves)}; or all-linear)"
            )


def attach_lora(model: torch.nn.Module, settings) -> torch.nn.Module:
    """Wrap `model` with fresh LoRA adapters (peft); only adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    targets = settings.lora_target_modules
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=LORA_ALL_LINEAR if targets == [LORA_ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def save_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir,
    merge: bool = True,
    extra_files: dict[str, str] | None = None,
) -> dict[str, str]:
    """Save atomically: a PEFT model as OUT/adapter (+ merged OUT/model), a plain one as OUT/model.

    Merging works on a copy so the training model keeps its adapters. `extra_files` ({name:
    text}) are written into each saved directory before it appears (a run's ownership stamp,
    `rundir.OWNER_FILE`). Returns the paths written.
    """

    def extras(tmp) -> None:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    out_dir = Path(out_dir)
    written = {}
    if is_peft(model):
        with atomic_dir(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            extras(tmp)
        written["adapter"] = str(out_dir / "adapter")
        if not merge:
            return written
        model = copy.deepcopy(model).merge_and_unload()
    with atomic_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        extras(tmp)
    written["model"] = str(out_dir / "model")
    return written
