"""Whether the Hugging Face Hub can be reached, asked once per process (offline runs never wait)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import urllib.parse

# ----------------------------------------------------------------------- where the model comes from
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_cached(repo: str) -> str | None:
    """The cached config.json of a hub repository, if the Hugging Face cache has it."""
    if not HUB_ID.fullmatch(repo):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
    except Exception:
        return None
    return hit if isinstance(hit, str) else None


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (`HF_HUB_OFFLINE` set, or one connection to its
    host failed within 5 s), or None when it may be (a proxy is configured: its client decides).
    Once it failed, this process treats the Hub as offline, so no later load waits on retries."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        _go_offline()
        return f"no connection to {host}: {getattr(e, 'strerror', None) or e}"
    return None


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
