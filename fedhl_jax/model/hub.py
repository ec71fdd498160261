"""Where a model comes from: ``model.name_or_path`` resolved, a local folder, or a Hub snapshot.

Imported by both ``model.architecture`` and ``model.checkpoint`` (and importing neither), so the model
package has no import cycle; it reads only paths from ``fedhl_jax.assets`` (a data-only package).

:func:`resolve_model_source` resolves ``model.name_or_path``. The Hugging Face Hub is used only when
a Hub id (``owner/name``) is given explicitly; ``auto`` never falls back to the Hub or to a random
model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fedhl_jax.assets import EMBEDDED_MODEL_NAME, MODEL_FIX, embedded_model_dir


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


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
      kind: ``"embedded"`` (the packaged stories260K), ``"local"`` (a folder),
        ``"hub"`` (a Hugging Face Hub id, downloaded on load) or ``"random"``
        (a random-init model, only when asked for by name).
      path: the folder (``embedded``/``local``), the Hub id, or ``"random"``.
      description: one line for the run log.
    """

    kind: str
    path: str
    description: str


def is_hub_id(name: str) -> bool:
    """True for ``owner/name`` strings that are not local-looking paths."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and all(part and not part.startswith(".") for part in name.split("/")))


def resolve_model_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Resolves ``model.name_or_path``.

    * ``"auto"``: the embedded stories260K (never a random model, never the Hub).
    * ``"random"``: a random-init model (explicit request only).
    * an existing folder: used as it is, after refusing pickle-only weights.
    * ``owner/name`` that is not an existing path: a Hub id (explicit; needs network).

    Raises:
      FileNotFoundError: a path that does not exist (the message names it and the ways to fix it),
        or the embedded model is missing from the installation.
      UnsafeCheckpointError: a folder whose only weights are pickles.
    """
    s = os.fspath(name_or_path)
    if s == "auto":
        path = embedded_model_dir()
        return ModelSource("embedded", str(path), f"embedded {EMBEDDED_MODEL_NAME} ({path})")
    if s == "random":
        return ModelSource("random", "random", "random-init Llama (model.name_or_path=random)")
    p = Path(s).expanduser()
    if p.is_dir():
        refuse_pickle_weights(p)
        return ModelSource("local", str(p), f"pretrained {p}")
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("local", str(p), f"pretrained {p}")
    if p.exists():
        raise FileNotFoundError(f"model.name_or_path {s!r} is a file, not a checkpoint folder; {MODEL_FIX}")
    if is_hub_id(s):
        return ModelSource("hub", s, f"Hugging Face Hub model {s}")
    raise FileNotFoundError(f"model.name_or_path {s!r}: no such folder ({p.resolve()}); {MODEL_FIX}")
