"""Where `--lens` finds a tuned lens: a local directory, or a lens published on the HF hub.

The forms (a local directory that exists always wins):

- `DIR`: a directory in the tuned-lens format (`config.json` + `params.pt`, see
  `unlearn.readouts.lens_files`);
- `OWNER/NAME`: a hub repository with the lens at its root, as a lens uploaded on its own is
  (the reference campaign's `EleutherAI/deep-ignorance-unfiltered-lens`). When the root has no
  config.json, the tuned-lens library's own layout is tried next: its lens repositories keep one
  folder per model, `lens/<model id>/`, and the library looks a model's lens up there by the model's
  name;
- `OWNER/NAME:FOLDER`: the lens in that folder of the repository, e.g. the library's published
  lenses, `spaces/AlignmentResearch/tuned-lens:lens/gpt2-large` (a `spaces/` or `datasets/`
  prefix names the repository type, as in hub URLs; the default is a model repository);
- any hub form + `@REVISION`: a branch, tag or commit of the repository.

Only `config.json` and `params.pt` are fetched, with `hf_hub_download` into the usual Hugging
Face cache, so HF_HOME and HF_HUB_OFFLINE apply as for models. Validation (`download=False`)
fetches the small config.json and makes sure params.pt is cached or on the hub without
downloading it, so a lens that cannot be had costs one line and exit 2 before any weights load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.models.refs import ModelRef

_HUB_FORM = re.compile(
    r"(?:(?P<kind>models|datasets|spaces)/)?(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?::(?P<folder>[^@:]+))?(?:@(?P<revision>[^@]+))?"
)
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
LENS_FILES = ("config.json", "params.pt")


@dataclass(frozen=True)
class HubLens:
    """A lens on the hub: repository, its type, the folder holding the files, revision."""

    repo_id: str
    repo_type: str = "model"
    folder: str | None = None
    """None: the root, then the library's `lens/<model id>/`."""
    revision: str | None = None

    def download_hint(self) -> str:
        """The command that caches this lens where the hub is reachable."""
        files = [f"{self.folder}/{name}" if self.folder else name for name in LENS_FILES]
        words = ["hf download", self.repo_id, *files]
        if self.repo_type != "model":
            words.append(f"--repo-type {self.repo_type}")
        if self.revision:
            words.append(f"--revision {self.revision}")
        return " ".join(words)


def parse_hub_lens(spec: str) -> HubLens | None:
    """The hub form of `spec`, or None when it is not one."""
    m = _HUB_FORM.fullmatch(spec)
    if m is None:
        return None
    folder = m["folder"].strip("/") if m["folder"] else None
    return HubLens(m["repo"], _REPO_TYPES[m["kind"] or "models"], folder or None, m["revision"])


def resolve_lens(spec: str, model: ModelRef | None = None, download: bool = True) -> Path:
    """The local directory holding the lens `spec` names (see the module docstring).

    `model` (a hub model) lets a repository in the library's layout be found by its name.
    With `download=False` only config.json is fetched; params.pt is checked, not downloaded.
    UsageError (one line) when the lens cannot be had.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    hub = parse_hub_lens(spec)
    if hub is None:
        raise UsageError(
            f"--lens {spec}: no such directory, and not a hub id (OWNER/NAME[:FOLDER][@REVISION])"
        )
    if hub.folder is not None:
        folders = [hub.folder]
    else:
        folders = [""] + ([f"lens/{model.name}"] if model and not model.is_local else [])
    not_cached = False
    for folder in folders:
        try:
            config = _fetch(spec, hub, folder, "config.json", download=True)
            if config is None:
                continue
            if _fetch(spec, hub, folder, "params.pt", download=download) is None:
                where = f"in {folder}/" if folder else "at its root"
                raise UsageError(f"--lens {spec}: config.json but no params.pt {where}")
            return config.parent
        except _NotCached:  # offline: another folder may still be cached
            not_cached = True
    if not_cached:
        raise UsageError(
            f"--lens {spec}: not a local directory, and not in the local Hugging Face cache with "
            f"the hub unreachable (offline?); cache it where the hub is reachable, with the same "
            f"HF_HOME: `{hub.download_hint()}`, or pass a local lens directory"
        )
    tried = " or ".join(f"{f}/" if f else "its root" for f in folders)
    raise UsageError(
        f"--lens {spec}: the {hub.repo_type} repository {hub.repo_id} has no tuned lens "
        f"(config.json + params.pt) in {tried}; name its folder as {hub.repo_id}:FOLDER"
    )


class _NotCached(Exception):
    """A file of the lens is neither in the cache nor reachable (offline)."""


def _fetch(spec: str, hub: HubLens, folder: str, name: str, download: bool) -> Path | None:
    """The cached path of one file of the lens (downloaded if need be; with download=False only
    its presence is checked), or None when the repository has no such file; _NotCached when
    it is not cached and the hub cannot be asked."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    filename = f"{folder}/{name}" if folder else name
    try:
        found = hf_hub_download(
            hub.repo_id,
            filename,
            repo_type=hub.repo_type,
            revision=hub.revision,
            dry_run=not download,
        )
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and not in the cache
        raise _NotCached(filename) from None
    except EntryNotFoundError:  # the repository is there, the file is not
        return None
    except RepositoryNotFoundError:
        raise UsageError(
            f"--lens {spec}: no {hub.repo_type} repository {hub.repo_id} on the hub "
            "(or it is private or gated: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise UsageError(f"--lens {spec}: {hub.repo_id} has no revision {hub.revision!r}") from None
    except (HFValidationError, HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--lens {spec}: cannot fetch {filename} from the hub: {first}") from None
    return Path(found) if download else Path(found.local_path)
