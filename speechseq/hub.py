"""Resolve a local directory or a Hugging Face hub id to a local folder (honouring HF_HUB_OFFLINE and the cache)."""

from __future__ import annotations

import os
from pathlib import Path

from speechseq.errors import CheckpointError, first_line

HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder holding ``name_or_path``'s files; a hub id is fetched (or found in the cache when offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise CheckpointError(f"{name}: no such directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{name}: no such directory (and huggingface_hub is not installed)") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name}: no such directory, and not in the Hugging Face cache while offline "
                              "(HF_HUB_OFFLINE=1 or no network)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such directory or Hugging Face hub repository") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{name}: not a local directory and could not be fetched from the hub "
                              f"({first_line(e)})") from None
