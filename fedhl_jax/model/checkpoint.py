"""Loading Hugging Face checkpoints of the registered model families (safetensors, no torch).

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or a
sharded ``model.safetensors.index.json`` plus its shards. Pickle-based weights
(``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are never read: unpickling
can run arbitrary code, so a folder holding only those is refused
(:class:`UnsafeCheckpointError`). Tensors are read with
safetensors' numpy API and mapped to parameter paths through the family's name map
(``ModelFamily.hf_names``, :mod:`fedhl_jax.model.families`; the family comes from
``config.json``'s ``model_type``); every key must map to exactly one expected
parameter of the expected shape, and hold only finite values (:func:`check_finite_weight`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from fedhl_jax.model.architecture import LlamaConfig, read_config_json
from fedhl_jax.model.families import get_family
from fedhl_jax.model.hub import (PICKLE_WEIGHT_PATTERNS, UnsafeCheckpointError, refuse_pickle_weights,  # noqa: F401
                                  resolve_checkpoint)
from fedhl_jax.model.llama import param_shapes, unflatten_params

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class NonFiniteWeightError(ValueError):
    """A base-model tensor holds NaN or Inf; the message names the tensor and the file."""


def check_finite_weight(w: np.ndarray, name: str, file: str | os.PathLike) -> None:
    """Refuses a loaded weight that holds NaN or Inf.

    Two reductions over ``w`` (``min`` and ``max``, which NaN and Inf reach), so
    no temporary array of ``w``'s size is made; the count in the message is
    computed only on failure.

    Args:
      w: the tensor, any shape, a float dtype.
      name: its name in the file (for the message).
      file: the file (for the message).

    Raises:
      NonFiniteWeightError: naming the tensor, the file and how many values are
        not finite.
    """
    if w.size and not (np.isfinite(w.min()) and np.isfinite(w.max())):
        bad = int(w.size - np.count_nonzero(np.isfinite(w)))
        raise NonFiniteWeightError(f"tensor {name!r} in {file} holds {bad} non-finite value(s) (NaN or Inf) "
                                   f"of {w.size}: the base model is refused")


def hf_key_to_path(key: str, family: str = "llama") -> str | None:
    """Maps an HF state-dict key to a parameter path, or ``None`` if it matches no rule of the family."""
    return get_family(family).hf_names.to_path(key)


def path_to_hf_key(path: str, family: str = "llama") -> str:
    """Inverse of :func:`hf_key_to_path` (``"norm"`` → ``"model.norm.weight"``).

    Raises:
      ValueError: a path the family has no key for.
    """
    key = get_family(family).hf_names.to_name(path)
    if key is None:
        raise ValueError(f"no Hugging Face key for parameter path {path!r} in model family {family!r}")
    return key


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint folder (one file, or the index's shards).

    Raises:
      FileNotFoundError: naming the missing file.
    """
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / SAFETENSORS_FILE]
        if not files[0].is_file():
            refuse_pickle_weights(folder)
            raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {folder}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"missing safetensors shard {file} (listed in {index})")
    return [str(f) for f in files]


def open_safetensors(file: str):
    """``safe_open(file, framework="np")``; unreadable or truncated files raise ``ValueError``."""
    try:
        return safe_open(file, framework="np")
    except Exception as e:  # the rust error type is not part of the public API
        raise ValueError(f"cannot read safetensors file {file} (truncated or corrupt?): {e}") from e


_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")  # of a parameter path


def check_layer_count(cfg: LlamaConfig, files: list[str], folder) -> None:
    """Refuses a ``config.json`` that claims more layers than the safetensors files hold.

    Only the files' headers (tensor names) are read, before any array is
    allocated per layer, so a config claiming 10⁸ layers is refused at once.

    Raises:
      ValueError: naming ``num_hidden_layers``, its value, the layers found and the folder.
    """
    names = cfg.model_family.hf_names
    layers = set()
    for file in files:
        with open_safetensors(file) as f:
            layers.update(int(m.group(1)) for key in f.keys() if (m := _LAYER_INDEX.match(names.to_path(key) or "")))
    if cfg.num_layers > len(layers):  # (keys beyond num_hidden_layers are named as unexpected later)
        held = f"{len(layers)} layer(s)" + (f" (model.layers.{min(layers)} .. {max(layers)})" if layers else "")
        raise ValueError(f"{folder}/config.json: num_hidden_layers={cfg.num_layers} but the safetensors files "
                         f"hold the tensors of {held}")


def _gguf_file(path_or_id) -> str | None:
    from fedhl_jax.model.gguf import find_gguf  # imported lazily: it needs the gguf package
    return find_gguf(path_or_id)


def checkpoint_index(path_or_id: str | os.PathLike, *, dtype: str = "float32"
                     ) -> tuple[LlamaConfig, dict[str, tuple[str, str]]]:
    """The config of a Hugging Face checkpoint and where each parameter is stored; headers only.

    Every key of the safetensors files is checked against the config (name, shape, layer count)
    before any tensor is read.

    Args:
      path_or_id: local folder or Hub id (see :func:`resolve_checkpoint`).
      dtype: ``"float32"`` or ``"bfloat16"``: the config's parameter and compute dtype.

    Returns:
      ``(cfg, {parameter_path: (file, key)})`` with one entry per path of
      :func:`~fedhl_jax.model.llama.param_shapes`, in file order.

    Raises:
      As :func:`load_pretrained`, except :class:`NonFiniteWeightError` (no value is read).
    """
    folder = resolve_checkpoint(path_or_id)
    cfg = LlamaConfig.from_hf(read_config_json(folder), dtype=dtype)
    files = checkpoint_files(folder)
    check_layer_count(cfg, files, folder)
    expected = param_shapes(cfg)
    names = cfg.model_family.hf_names
    index = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                path = names.to_path(key)
                if path is None:
                    if names.is_ignored(key):
                        continue
                    raise ValueError(f"unexpected key {key!r} in {file}")
                if path == "lm_head" and cfg.tie_word_embeddings:
                    continue  # tied: the head is the embedding
                if path not in expected:
                    raise ValueError(f"unexpected key {key!r} in {file} (config has "
                                     f"{cfg.num_layers} layers, tie_word_embeddings="
                                     f"{cfg.tie_word_embeddings})")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[path]:
                    raise ValueError(f"shape mismatch for {key!r} in {file}: checkpoint has "
                                     f"{shape}, config expects {expected[path]}")
                index[path] = (file, key)
    missing = [path_to_hf_key(p, cfg.family) for p in expected if p not in index]
    if missing:
        raise ValueError(f"missing key(s) in checkpoint {folder}: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return cfg, index


def load_pretrained(path_or_id: str | os.PathLike, *, dtype: str = "float32"
                    ) -> tuple[LlamaConfig, dict]:
    """Loads a Hugging Face checkpoint of a registered family (``LlamaForCausalLM``, ...).

    Every tensor lands whole on the default device; with a ``model`` mesh axis,
    :func:`fedhl_jax.model.sharded_load.load_sharded` reads each one straight into its shards.

    Args:
      path_or_id: local folder or Hub id (see :func:`resolve_checkpoint`), or a
        GGUF file or a folder holding one (see :func:`fedhl_jax.model.gguf.load_gguf`).
      dtype: ``"float32"`` or ``"bfloat16"``: parameter and compute dtype.

    Returns:
      ``(cfg, params)`` with params as described in :mod:`fedhl_jax.model.llama`.

    Raises:
      FileNotFoundError: missing folder, config or safetensors file.
      UnsafeCheckpointError: the folder's only weights are pickle files.
      ValueError: unreadable/truncated file, a layer count other than the files'
        (:func:`check_layer_count`), unexpected or missing key, shape mismatch
        with the config, or an unsupported architecture (each message names the
        file, key, shape or value); all found from the headers, before any tensor is read.
      NonFiniteWeightError: a tensor holding NaN or Inf (naming the key and the file).
    """
    if (gguf_file := _gguf_file(path_or_id)) is not None:  # a .gguf file or a folder holding one
        from fedhl_jax.model.gguf import load_gguf
        return load_gguf(gguf_file, dtype=dtype)
    cfg, index = checkpoint_index(path_or_id, dtype=dtype)
    np_dtype = _NP_DTYPES[cfg.dtype]
    flat = {}
    for file in dict.fromkeys(file for file, _ in index.values()):
        with open_safetensors(file) as f:
            for path, (_, key) in ((p, fk) for p, fk in index.items() if fk[0] == file):
                flat[path] = f.get_tensor(key).astype(np_dtype)  # stacked on the host below
                check_finite_weight(flat[path], key, file)
    return cfg, unflatten_params(cfg, flat)


def load_tokenizer(path_or_id: str | os.PathLike):
    """``transformers.AutoTokenizer`` for a checkpoint folder or Hub id (no remote code is run), or a GGUF
    file's tokenizer (built from its metadata)."""
    if (gguf_file := _gguf_file(path_or_id)) is not None:
        from fedhl_jax.model.gguf_tokenizer import load_gguf_tokenizer
        return load_gguf_tokenizer(gguf_file)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_checkpoint(path_or_id), trust_remote_code=False)
