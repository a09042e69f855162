"""Hugging Face Hub reachability.

The hub clients retry for about 20 s before giving up when there is no network. berth asks once, quickly, and
when the hub cannot be reached it turns on the libraries' offline switches, so that anything that needs the
hub fails at once with a clear message and everything local goes on.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from berth.core.errors import BerthError

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
# Endpoints found unreachable by configure_offline_mode, and the switches the user had set before it turned on
# the rest, so errors can say why offline mode is on.
_unreachable_at_start: list[str] = []
_set_by_user: list[str] = []


def offline_switches() -> list[str]:
    """The offline switches that are on."""
    return [var for var in OFFLINE_VARS if os.environ.get(var, "").strip().lower() in _TRUE]


def offline_requested() -> bool:
    return bool(offline_switches())


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


@functools.cache
def _endpoint_answers(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 1.5) -> bool:
    """True unless offline mode is on or no TCP connection to the endpoint (HF_ENDPOINT) opens in `timeout`."""
    return not offline_requested() and _endpoint_answers(endpoint(), timeout)


def configure_offline_mode() -> bool:
    """Set the offline switches when the hub is unreachable. Call before importing datasets or transformers.

    Returns True when berth runs offline.
    """
    if hub_reachable():
        return False
    _set_by_user[:] = offline_switches()
    if not _set_by_user:
        _unreachable_at_start.append(endpoint())
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    return True


def require_hub(what: str) -> None:
    """Fail at once, in one line, when `what` needs the hub and the hub cannot be reached."""
    if not hub_reachable():
        if _unreachable_at_start or not offline_requested():
            reason = f"{endpoint()} is unreachable"
        else:
            reason = f"offline mode is set ({', '.join(_set_by_user or offline_switches())})"
        raise BerthError(f"{what} needs the Hugging Face Hub, but {reason}; use local files instead")


@dataclass(frozen=True)
class HubConfig:
    """Publishing a run's export to the Hugging Face Hub (`hub:` section of the pretrain and finetune configs)."""

    # Upload <output_dir>/final to repo_id at the end of the run.
    push: bool = False
    repo_id: str = ""  # USER/NAME or ORG/NAME
    revision: str = ""  # a branch; empty: main
    private: bool = False
    # Pretraining: also push each intermediate checkpoint's model to a branch step-N (training dynamics).
    push_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.push and self.repo_id.count("/") != 1:
            raise ValueError(f"hub.repo_id must be OWNER/NAME when hub.push is true; got {self.repo_id!r}")
        dead = {"repo_id": self.repo_id, "revision": self.revision, "private": self.private}
        dead["push_checkpoints"] = self.push_checkpoints
        for key, value in dead.items():
            if value and not self.push:
                shown = str(value).lower() if isinstance(value, bool) else value
                raise ValueError(f"hub.{key}={shown} does nothing with hub.push=false")


def hub_token() -> str:
    """HF_TOKEN or the login cache (`hf auth login`); never printed or logged."""
    from huggingface_hub import get_token

    return get_token() or ""


def check_push(repo_id: str) -> str:
    """Before any work that ends in an upload: the hub answers and there is a token. Returns the token."""
    if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise BerthError(f"repo id {repo_id!r}: expected OWNER/NAME")
    require_hub(f"pushing to {repo_id}")
    token = hub_token()
    if not token:
        raise BerthError(f"pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: str | Path, repo_id: str, revision: str = "", private: bool = False, message: str = "") -> str:
    """Upload `folder` to the model repo `repo_id` (created if missing) on branch `revision` (created from main
    if missing; empty: main). Returns the commit URL. Checks come first, so nothing starts half-way."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise BerthError(f"{folder}: not a model directory (no config.json); push a run's final/ directory")
    token = check_push(repo_id)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision or None,
            commit_message=message or f"Upload {folder.name} with berth",
            repo_type="model",
        )
    except HfHubHTTPError as exc:
        # The server's message, never the request headers (they hold the token).
        raise BerthError(f"pushing to {repo_id}: the hub refused: {str(exc).splitlines()[0]}") from None
    return str(getattr(commit, "commit_url", commit))


def hub_model_id(name: str) -> str:
    """`name` when it is a hub model id (OWNER/NAME, not a local path), else '': card metadata such as base_model
    must name a hub repo, and the hub rejects local paths there."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return ""
    return name


def card_metadata(meta: dict) -> str:
    """The YAML block at the top of a model card (README.md) that the hub reads: language, license, tags..."""
    lines = "\n".join(f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in meta.items())
    return f"---\n{lines}\n---"
