"""A model's architecture without its weights."""

from __future__ import annotations

import os

from fedhl_jax.model.architecture import LlamaConfig, read_config_json
from fedhl_jax.model.hub import resolve_checkpoint


def read_model_config(path_or_id: str | os.PathLike, *, dtype: str = "float32") -> LlamaConfig:
    """The ``LlamaConfig`` of a checkpoint, from its ``config.json`` or GGUF header alone.

    Args:
      path_or_id: what ``load_pretrained`` accepts: a local folder, a Hub id, or a GGUF file (or a
        folder holding one).
      dtype: as in ``load_pretrained``.

    Raises:
      FileNotFoundError / ValueError: as ``load_pretrained`` for the config (no weight is read).
    """
    from fedhl_jax.model.gguf import find_gguf, gguf_config  # lazily: it needs the gguf package

    if (gguf_file := find_gguf(path_or_id)) is not None:
        return gguf_config(gguf_file, dtype=dtype)
    return LlamaConfig.from_hf(read_config_json(resolve_checkpoint(path_or_id)), dtype=dtype)
