"""`unlearn push RUN --repo ID`: bad input, no token and an offline hub are one line and exit 2
with nothing created; the upload itself (the hub's methods replaced) sends the run's model
folder, its card inside, to the repository named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from unlearn.cli import main as cli
from unlearn.runs.rows import RunMeta
from unlearn.runs.rundir import OWNER_FILE, RunDir


@pytest.fixture
def run_dir(tiny_world, tmp_path, monkeypatch):
    """A finished run directory whose saved model (the world's twin, stamped as the run's) has
    no card yet, like a model saved before cards existed; hub variables cleared."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no login
    out = tmp_path / "run"
    config = {"model": str(tiny_world.target), "lr": 1e-4}
    meta = RunDir(out).write_run(RunMeta("r1", "unlearn", "lens", config, status="done"))
    shutil.copytree(tiny_world.filtered, out / "model")
    for name, text in RunDir.owner_files(meta).items():
        (out / "model" / name).write_text(text)
    return out


class FakeHub:
    """Records what `unlearn push` asks of HfApi instead of contacting the hub."""

    def __init__(self, monkeypatch, exists=False, fail_upload=False):
        self.calls: list[tuple] = []
        self.exists, self.fail_upload = exists, fail_upload
        self.uploaded: dict[str, str] = {}
        api = huggingface_hub.HfApi
        monkeypatch.setattr(api, "whoami", lambda s, *a, **k: self._log("whoami") or {"name": "me"})
        monkeypatch.setattr(api, "repo_exists", lambda s, repo, **k: self.exists)
        monkeypatch.setattr(api, "create_repo", lambda s, *a, **k: self.create_repo(s, *a, **k))
        monkeypatch.setattr(api, "create_branch", lambda s, repo, **k: self._log("branch", repo, k))
        monkeypatch.setattr(api, "upload_folder", lambda s, **k: self.upload_folder(s, **k))
        monkeypatch.setattr(api, "delete_repo", lambda s, repo, **k: self._log("delete", repo))

    def _log(self, *call):
        self.calls.append(call)

    def create_repo(self, api, repo, **kwargs):
        self._log("create", repo, kwargs.get("private"), api.token)

    def upload_folder(self, api, **kwargs):
        self._log("upload", kwargs["repo_id"], kwargs.get("revision"))
        if self.fail_upload:
            raise ConnectionError("403 Forbidden: no write access")
        folder = Path(kwargs["folder_path"])
        ignored = kwargs.get("ignore_patterns") or []
        self.uploaded = {p.name: p.read_text(errors="replace") for p in folder.iterdir()
                         if not any(p.match(pattern) for pattern in ignored)}  # fmt: skip
        self.folder = folder
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
            commit_message="", commit_description="", oid="abc",
        )  # fmt: skip


def test_push_uploads_the_model_folder_with_its_card(run_dir, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    argv = ["push", str(run_dir), "--repo", "me/r1-lens", "--token", "hf_test", "--private",
            "true", "--revision", "v1"]  # fmt: skip
    assert cli(argv) == 0
    assert hub.folder == run_dir / "model"
    assert [c[0] for c in hub.calls] == ["whoami", "create", "branch", "upload"]
    assert hub.calls[1] == ("create", "me/r1-lens", True, "hf_test")
    assert hub.calls[3] == ("upload", "me/r1-lens", "v1")
    # The card is inside (written first: this model was saved without one); the run's stamp
    # stays behind.
    assert {"README.md", "config.json", "model.safetensors"} <= set(hub.uploaded)
    assert OWNER_FILE not in hub.uploaded
    card = ModelCard.load(run_dir / "model" / "README.md")
    assert card.data.to_dict()["unlearn"]["run"] == "r1"
    assert "method: `lens`" in card.text and hub.uploaded["README.md"] == str(card)
    assert "https://huggingface.co/me/r1-lens/commit/abc" in capsys.readouterr().out


def test_a_failed_upload_removes_the_repository_it_created(run_dir, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, fail_upload=True)
    assert cli(["push", str(run_dir), "--repo", "me/r1", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unlearn push: error: cannot push to me/r1: 403 Forbidden: no write access"]
    assert hub.calls[-1] == ("delete", "me/r1")
    # A repository that was there before is never deleted.
    hub = FakeHub(monkeypatch, exists=True, fail_upload=True)
    assert cli(["push", str(run_dir), "--repo", "me/r1", "--token", "hf_test"]) == 2
    assert "delete" not in [c[0] for c in hub.calls]


def _bad(case, run_dir, tmp_path, monkeypatch):
    """The argv of one bad push (and the environment it needs)."""
    repo = ["--repo", "me/r1"]
    if case == "not a run":
        return ["push", str(tmp_path), *repo, "--token", "t"]
    if case == "no model":
        shutil.rmtree(run_dir / "model")
    if case == "not the run's model":
        (run_dir / "model" / OWNER_FILE).write_text(json.dumps({"run": "other"}))
    if case == "truncated":
        weights = run_dir / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "bad repo":
        repo = ["--repo", "me/bad--name"]
    if case == "no repo":
        repo = []
    token = [] if case == "no token" else ["--token", "t"]
    adapter = ["--adapter", "true"] if case == "no adapter" else []
    return ["push", str(run_dir), *repo, *token, *adapter]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("not a run", "is not a run directory"),
        ("no model", "has no saved model"),
        ("no adapter", "has no saved adapter"),
        ("not the run's model", "was not saved by the run"),
        ("truncated", "model.safetensors"),
        ("bad repo", "--repo me/bad--name is not a hub repository id"),
        ("no repo", "--repo ID is required"),
        ("no token", "no hub token"),
        ("offline", "HF_HUB_OFFLINE is set"),
    ],
)
def test_bad_input_offline_and_no_token_are_one_line(
    case, needle, run_dir, tmp_path, monkeypatch, capsys
):
    hub = FakeHub(monkeypatch)
    assert cli(_bad(case, run_dir, tmp_path, monkeypatch)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert hub.calls == []  # the hub was never asked for anything
    assert not (run_dir / "model" / "README.md").exists()  # nothing written either


def test_an_unreachable_hub_is_one_line(run_dir, monkeypatch, capsys):
    """No hub method replaced: the hub's address is one where nothing listens (a test must not
    reach the real hub), so the first request fails, before anything is created."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert cli(["push", str(run_dir), "--repo", "me/r1", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unlearn push: error: cannot push to me/r1:")
