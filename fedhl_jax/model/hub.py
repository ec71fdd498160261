"""Where a checkpoint lives: a local folder, or a Hugging Face Hub snapshot.

Imported by both ``model.config`` and ``model.checkpoint`` (and importing neither), so the model
package has no import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """Returns a local checkpoint folder: the path itself, or a Hub snapshot.

    Args:
      path_or_id: a local folder, or a Hugging Face Hub id ``"owner/name"``
        (downloaded with ``huggingface_hub.snapshot_download``).

    Returns:
      Path of the folder.

    Raises:
      FileNotFoundError: a local-looking path that is not a folder.
    """
    s = os.fspath(path_or_id)
    p = Path(s).expanduser()
    if p.is_dir():
        return str(p)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {s} does not exist")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=s, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
