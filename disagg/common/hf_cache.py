"""Hugging Face Hub ids resolved from the local cache only (``HF_HUB_OFFLINE`` semantics):
nothing is ever downloaded; an id that is not cached is a ConfigError saying so."""

from __future__ import annotations

import os

from disagg.common.config import ConfigError


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a cached Hub model; None when it is not cached (or the
    name cannot be a Hub id)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError); not an id
        return None
    return path if isinstance(path, str) and os.path.isdir(path) else None


def resolve_model(name: str) -> str:
    """``builtin:*`` and directories as given; a Hub id -> its cached snapshot directory."""
    if name.startswith("builtin:") or os.path.isdir(name):
        return name
    path = cached_snapshot(name)
    if path is None:
        raise ConfigError(f"model {name!r} is not a directory, a builtin model or a Hugging Face "
                          "id in the local cache (nothing is downloaded: fetch it first with "
                          f"`hf download {name}` (older huggingface_hub: `huggingface-cli "
                          "download`), or give a directory)")
    return path
