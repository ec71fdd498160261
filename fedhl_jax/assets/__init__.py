"""Embedded defaults that need neither network nor files outside the package.

* ``stories260K-hf/``: karpathy's tinyllamas stories260K (MIT), a real pretrained 260K-parameter
  Llama-2-style model in Hugging Face format (safetensors + tokenizer). ``model.name_or_path:
  auto`` resolves to it.
* ``gsm8k/``: the GSM8K train and test splits (MIT) as JSON Lines. ``data.dataset: gsm8k``
  without ``data.data_dir`` (and without ``$FEDHL_DATA_DIR``) reads them.

Each folder carries a ``LICENSE`` and a ``PROVENANCE.md``.

Model names are resolved by :func:`resolve_model_source`. The Hugging Face Hub is used only when
a Hub id (``owner/name``) is given explicitly; ``auto`` never falls back to the Hub or to a
random model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

__all__ = [
    "ASSETS_DIR",
    "EMBEDDED_DATASETS",
    "EMBEDDED_MODEL_NAME",
    "ModelSource",
    "embedded_data_dir",
    "embedded_model_dir",
    "is_hub_id",
    "resolve_model_source",
]

ASSETS_DIR = Path(__file__).resolve().parent
#: Name of the embedded model, as shown in messages.
EMBEDDED_MODEL_NAME = "stories260K"
#: Datasets shipped with the package (under :func:`embedded_data_dir`).
EMBEDDED_DATASETS = ("gsm8k",)

_MODEL_FIX = ("use model.name_or_path=auto for the embedded stories260K, a local folder holding "
              "config.json and model.safetensors (or a GGUF file), or a Hugging Face Hub id "
              "owner/name (needs network)")


def embedded_model_dir() -> Path:
    """Folder of the embedded stories260K checkpoint (HF layout).

    Raises:
      FileNotFoundError: the package was installed without its data files.
    """
    path = ASSETS_DIR / "stories260K-hf"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded model {path} is missing (the package was installed "
                                "without its data files); reinstall fedhl-jax or set "
                                "model.name_or_path to a local checkpoint folder")
    return path


def embedded_data_dir() -> Path:
    """Data directory of the embedded datasets: ``<dir>/gsm8k/{train,test}.jsonl``."""
    return ASSETS_DIR


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
      fedhl_jax.model.checkpoint.UnsafeCheckpointError: a folder whose only weights are pickles.
    """
    s = os.fspath(name_or_path)
    if s == "auto":
        path = embedded_model_dir()
        return ModelSource("embedded", str(path), f"embedded {EMBEDDED_MODEL_NAME} ({path})")
    if s == "random":
        return ModelSource("random", "random", "random-init Llama (model.name_or_path=random)")
    p = Path(s).expanduser()
    if p.is_dir():
        from fedhl_jax.model.checkpoint import refuse_pickle_weights

        refuse_pickle_weights(p)
        return ModelSource("local", str(p), f"pretrained {p}")
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("local", str(p), f"pretrained {p}")
    if p.exists():
        raise FileNotFoundError(f"model.name_or_path {s!r} is a file, not a checkpoint folder; {_MODEL_FIX}")
    if is_hub_id(s):
        return ModelSource("hub", s, f"Hugging Face Hub model {s}")
    raise FileNotFoundError(f"model.name_or_path {s!r}: no such folder ({p.resolve()}); {_MODEL_FIX}")
