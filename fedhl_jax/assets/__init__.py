"""Embedded defaults that need neither network nor files outside the package.

* ``stories260K-hf/``: karpathy's tinyllamas stories260K (MIT), a real pretrained 260K-parameter
  Llama-2-style model in Hugging Face format (safetensors + tokenizer). ``model.name_or_path:
  auto`` resolves to it.
* ``gsm8k/``: the GSM8K train and test splits (MIT) as JSON Lines. ``data.dataset: gsm8k``
  without ``data.data_dir`` (and without ``$FEDHL_DATA_DIR``) reads them.

Each folder carries a ``LICENSE`` and a ``PROVENANCE.md``.

This package holds data and the paths to it, and imports nothing else of ``fedhl_jax``. Model names
are resolved by :func:`fedhl_jax.model.hub.resolve_model_source`; which datasets are embedded is
said by their specs (``DatasetSpec.embedded``, :mod:`fedhl_jax.data.registry`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ASSETS_DIR",
    "EMBEDDED_MODEL_NAME",
    "MODEL_FIX",
    "embedded_data_dir",
    "embedded_model_dir",
]

ASSETS_DIR = Path(__file__).resolve().parent
#: Name of the embedded model, as shown in messages.
EMBEDDED_MODEL_NAME = "stories260K"

#: How to name a model, for messages about a bad ``model.name_or_path``.
MODEL_FIX = ("use model.name_or_path=auto for the embedded stories260K, a local folder holding "
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
