"""Where a checkpoint lives: a local folder, or a Hugging Face Hub snapshot.

Imported by both ``model.config`` and ``model.checkpoint`` (and importing neither), so the model
package has no import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path


#: File names of pickle-based weights, which are never loaded.
PICKLE_WEIGHT_PATTERNS: tuple[str, ...] = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl",
                                           "*.pickle")


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose weights exist only in a pickle-based format (never unpickled)."""


def refuse_pickle_weights(folder: str | os.PathLike) -> None:
    """Refuses a folder whose only weights are pickle files.

    A folder with ``*.safetensors`` or ``*.gguf`` weights passes even when pickle files lie
    beside them (those are ignored, never opened).

    Raises:
      UnsafeCheckpointError: naming the pickle files and the formats that are accepted.
    """
    folder = Path(folder)
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickles = sorted({f.name for pattern in PICKLE_WEIGHT_PATTERNS for f in folder.glob(pattern)})
    if pickles:
        raise UnsafeCheckpointError(
            f"{folder} holds only pickle-based weights ({', '.join(pickles)}); these are never loaded "
            "because unpickling can run arbitrary code. Convert them to safetensors "
            "(model.safetensors) or GGUF first")


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """Returns a local checkpoint folder: the path itself, or a Hub snapshot.

    Args:
      path_or_id: a local folder, ``"auto"`` (the embedded stories260K), or a
        Hugging Face Hub id ``"owner/name"`` (downloaded with
        ``huggingface_hub.snapshot_download``; only safetensors, JSON and
        tokenizer files are fetched, never pickles).

    Returns:
      Path of the folder.

    Raises:
      FileNotFoundError: a local-looking path that is not a folder.
      UnsafeCheckpointError: a folder whose only weights are pickle files.
    """
    s = os.fspath(path_or_id)
    if s == "auto":
        from fedhl_jax.assets import embedded_model_dir

        return str(embedded_model_dir())
    p = Path(s).expanduser()
    if p.is_dir():
        refuse_pickle_weights(p)
        return str(p)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {s} does not exist; use \"auto\" for the embedded "
                                "stories260K, a local folder with config.json and model.safetensors, "
                                "or a Hugging Face Hub id owner/name (needs network)")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=s, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
