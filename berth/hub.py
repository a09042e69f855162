"""Hugging Face Hub reachability.

The hub clients retry for about 20 s before giving up when there is no network. berth asks once, quickly, and
when the hub cannot be reached it turns on the libraries' offline switches, so that anything that needs the
hub fails at once with a clear message and everything local goes on.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from berth.errors import BerthError

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
# Endpoints found unreachable by configure_offline_mode, so errors can say why offline mode is on.
_unreachable_at_start: list[str] = []


def offline_requested() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in OFFLINE_VARS)


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
    if not offline_requested():
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
            reason = "offline mode is set (HF_HUB_OFFLINE)"
        raise BerthError(f"{what} needs the Hugging Face Hub, but {reason}; use local files instead")
