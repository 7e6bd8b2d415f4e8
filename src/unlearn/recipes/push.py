"""Uploading a run's saved model to the Hugging Face hub (`unlearn push`).

    url = push_run("/tmp/r1", PushOptions(repo="me/r1-lens"))     # RUN/model, card inside

Design choices:
- Everything that can be checked here is checked before the hub is contacted (each failure is
  one UsageError line): RUN is a run directory, its model (or adapter) is there, stamped as
  the run's own and whole, the repo id is well formed, the hub is not switched off
  (HF_HUB_OFFLINE) and there is a token.
- Nothing half-done: the hub is first asked whose the token is, so no network or a bad token
  creates nothing; the upload is one commit (every file or none); a repository this push
  created is deleted again when its upload fails.
- The model card (README.md) travels inside the folder; a model saved before cards existed
  gets one first. The run's ownership stamp stays behind: it means something only in the run
  directory.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.fsutil import check_safetensors
from unlearn.models.card import CARD_FILE
from unlearn.models.refs import resolve_model
from unlearn.runs.cards import write_cards
from unlearn.runs.rundir import OWNER_FILE, RunDir

TRUE_VALUES = ("1", "ON", "YES", "TRUE")
"""What huggingface_hub reads as a set HF_HUB_OFFLINE."""


@dataclass
class PushOptions:
    """Options of `unlearn push`."""

    repo: str | None = None
    """The hub repository to upload to: NAME (under the token's account) or OWNER/NAME."""
    adapter: bool = False
    """Upload RUN/adapter (a LoRA run's adapter) instead of RUN/model."""
    private: bool = False
    """Create the repository private (a repository that exists keeps its visibility)."""
    revision: str | None = None
    """The branch to commit to (created from main when missing; default main)."""
    token: str | None = None
    """A hub token with write access (default: HF_TOKEN or the one `hf auth login` stored)."""


def saved_folder(run_path: str | os.PathLike, adapter: bool = False) -> tuple[RunDir, Path]:
    """The run directory and its saved model (or adapter) directory, checked: the run saved it
    (its stamp) and it is whole. UsageError otherwise."""
    run = RunDir(Path(run_path).expanduser())
    meta = run.read_meta()  # "... is not a run directory" when there is no run.json
    name = "adapter" if adapter else "model"
    folder = run.path / name
    if not folder.is_dir():
        hint = "only LoRA runs save one" if adapter else "an attack saves one with --save_model"
        raise UsageError(f"run {meta.id} in {run.path} has no saved {name} ({hint})")
    if not run.owns(folder):
        raise UsageError(
            f"{folder} was not saved by the run in {run.path} (no {OWNER_FILE} naming it); "
            "only a run's own model is pushed"
        )
    if adapter:
        if not (folder / "adapter_config.json").is_file():
            raise UsageError(f"{folder} is not a LoRA adapter (no adapter_config.json)")
        for weights in folder.glob("*.safetensors"):
            check_safetensors(weights)
    else:
        resolve_model(folder)  # config.json and whole safetensors, read without loading
    return run, folder


def check_repo_id(repo: str | None) -> str:
    """`repo` when it is a well-formed hub model id; UsageError otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo:
        raise UsageError("--repo ID is required (NAME or OWNER/NAME)")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UsageError(f"--repo {repo} is not a hub repository id: {e}") from None
    return repo


def hub_token(token: str | None) -> str:
    """The token to push with, after checking the hub may be contacted at all."""
    from huggingface_hub import constants, get_token

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the environment is asked too.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES
    if offline or constants.HF_HUB_OFFLINE:
        raise UsageError("cannot push: the hub is switched off here (HF_HUB_OFFLINE is set)")
    try:  # a token exchange that was asked for (HF_OIDC_RESOURCE) and failed raises
        found = token or get_token()
    except Exception as e:
        raise UsageError(f"cannot push: no hub token ({_first_line(e)})") from None
    if not found:
        raise UsageError(
            "cannot push: no hub token (log in with `hf auth login`, set HF_TOKEN or give --token)"
        )
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def push_run(run_path: str | os.PathLike, opts: PushOptions) -> str:
    """Upload the run's saved model (or adapter) with its card to `opts.repo`; returns the
    commit's URL. Every failure, the hub's included, is one UsageError line."""
    from huggingface_hub import HfApi

    run, folder = saved_folder(run_path, opts.adapter)
    repo = check_repo_id(opts.repo)
    token = hub_token(opts.token)
    if not (folder / CARD_FILE).exists():  # saved before model cards existed
        write_cards(run.path)
    api = HfApi(token=token)
    created = False
    try:
        # Asked first: no network or a bad token fails here, before anything exists on the hub.
        api.whoami()
        created = not api.repo_exists(repo, repo_type="model")
        api.create_repo(repo, private=opts.private or None, repo_type="model", exist_ok=True)
        if opts.revision:
            api.create_branch(repo, branch=opts.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            repo_type="model",
            revision=opts.revision,
            commit_message=f"unlearn push: run {run.read_meta().id} ({folder.name})",
            ignore_patterns=[OWNER_FILE, ".*"],
        )
    # The hub client's exceptions differ between its versions (requests', httpx's, its own);
    # whatever it raises, the push failed and says why in one line.
    except Exception as e:
        if created:
            _delete_quietly(api, repo)
        raise UsageError(f"cannot push to {repo}: {_first_line(e)}") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}")


def _delete_quietly(api, repo: str) -> None:
    """Remove a repository this push created before its upload failed (best effort: the hub
    may be what failed)."""
    # The error the user sees is the upload's, not this one's.
    with contextlib.suppress(Exception):
        api.delete_repo(repo, repo_type="model", missing_ok=True)
