"""Exporting to Hugging Face formats and reading PEFT adapters back.

* :func:`export_merged` writes a plain ``LlamaForCausalLM`` checkpoint folder
  (``config.json`` + safetensors, tokenizer files copied from a source folder)
  with a dense update merged into the base weights.
* :func:`export_peft` truncates a dense global update to rank ``r`` by SVD and
  writes a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads.
* :func:`load_peft` reads a PEFT LoRA adapter into an :class:`Adapter`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from fedhl_jax.lora import Adapter, lora_scale
from fedhl_jax.model.adapters import lora_targets, merge_delta
from fedhl_jax.model.checkpoint import (SAFETENSORS_FILE, SAFETENSORS_INDEX, open_safetensors,
                                        path_to_hf_key)
from fedhl_jax.model.architecture import LlamaConfig, read_config_json
from fedhl_jax.model.hub import resolve_checkpoint
from fedhl_jax.model.llama import LORA_MODULES, flatten_params, param_shapes

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."
_PEFT_KEY = re.compile(r"base_model\.model\.model\.(layers\.\d+\.(?:self_attn|mlp)\.(\w+))"
                       r"\.lora_(A|B)(?:\.default)?\.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
_SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_META = {"format": "pt"}  # transformers refuses safetensors files without it


# ------------------------------------------------------------------ merged checkpoint
def _source_config(cfg: LlamaConfig, hf_config_source) -> tuple[dict, Path | None]:
    """Returns the ``config.json`` dict to write and the folder to copy tokenizer files from."""
    if hf_config_source is None:
        return cfg.to_hf_dict(), None
    if isinstance(hf_config_source, (str, os.PathLike)):
        folder = Path(resolve_checkpoint(hf_config_source))  # a folder, "auto" (embedded) or a Hub id
        return read_config_json(folder), folder
    if isinstance(hf_config_source, dict):
        return dict(hf_config_source), None
    return hf_config_source.to_dict(), None  # a transformers config object


def _shard(shapes: dict[str, tuple[tuple[int, ...], int]], max_shard_bytes: int) -> list[list[str]]:
    """Groups keys (``{key: (shape, itemsize)}``) into shards of at most ``max_shard_bytes``."""
    shards, current, size = [], [], 0
    for key, (shape, itemsize) in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def export_merged(out_dir: str | os.PathLike, cfg: LlamaConfig, params: dict,
                  delta: dict | None = None, hf_config_source=None, *,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes a Hugging Face checkpoint of ``params + delta``.

    ``transformers.LlamaForCausalLM.from_pretrained(out_dir)`` and
    :func:`fedhl_jax.model.load_pretrained` load the folder as it is.

    Args:
      out_dir: output folder (created).
      cfg: model config of ``params``.
      params: base parameters.
      delta: optional ``{module_name: [d_out, d_in]}`` dense update to merge.
      hf_config_source: where ``config.json`` comes from: a checkpoint folder
        (its tokenizer and generation files are copied too), a config dict or
        ``transformers`` config, or ``None`` to build it from ``cfg``.
      dtype: saved dtype (``"float32"``, ``"bfloat16"``, ``"float16"``);
        default ``cfg.dtype``.
      max_shard_bytes: larger checkpoints are split into
        ``model-0000i-of-0000n.safetensors`` shards plus an index.

    Returns:
      The output folder.

    Raises:
      ValueError: the source config does not describe ``cfg``'s shapes, or an
        unknown dtype.
    """
    dtype = dtype or cfg.dtype
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}: use one of {sorted(_SAVE_DTYPES)}")
    hf_config, tokenizer_folder = _source_config(cfg, hf_config_source)
    source_cfg = LlamaConfig.from_hf(hf_config, dtype=cfg.dtype)
    if param_shapes(source_cfg) != param_shapes(cfg):
        raise ValueError(f"hf_config_source describes a different model: {source_cfg} vs {cfg}")
    hf_config["dtype"] = dtype
    hf_config.pop("torch_dtype", None)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_folder is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copyfile(tokenizer_folder / name, out / name)

    merged = merge_delta(params, delta) if delta else params
    flat = {path_to_hf_key(p, cfg.family): v for p, v in flatten_params(merged).items()}
    np_dtype = _SAVE_DTYPES[dtype]
    shards = _shard({k: (v.shape, np.dtype(np_dtype).itemsize) for k, v in flat.items()},
                    max_shard_bytes)
    names = ([SAFETENSORS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        tensors = {k: np.ascontiguousarray(np.asarray(flat[k]).astype(np_dtype)) for k in keys}
        save_file(tensors, str(out / name), metadata=_META)
        weight_map.update({k: name for k in keys})
        total += sum(t.nbytes for t in tensors.values())
    if len(shards) > 1:
        with open(out / SAFETENSORS_INDEX, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out


# ------------------------------------------------------------------ PEFT adapters
def lora_factors_from_dense(g, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``r`` factors of a dense update, split evenly between ``B`` and ``A``.

    With the SVD ``g = U S Vᵀ``: ``B = U_r √(S_r/scale)``, ``A = √(S_r/scale) V_rᵀ``,
    so that ``scale · B A`` is the truncated SVD of ``g`` (computed in float64).

    Args:
      g: ``[d_out, d_in]`` dense update.
      rank: target rank ``r <= min(d_out, d_in)``.
      scale: LoRA scale the factors will be used with.

    Returns:
      ``(B [d_out, r], A [r, d_in])`` float64.

    Raises:
      ValueError: rank out of range.
    """
    g = np.asarray(g, np.float64)
    if not 1 <= rank <= min(g.shape):
        raise ValueError(f"rank {rank} is out of range for a {g.shape} update "
                         f"(must be 1..{min(g.shape)})")
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    root = np.sqrt(s[:rank] / scale)  # [r]
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def truncate_dense(G: dict, rank: int) -> dict[str, np.ndarray]:
    """``{name: best rank-r approximation}`` (float64) of a dense update tree."""
    return {name: b @ a for name, (b, a) in
            ((n, lora_factors_from_dense(g, rank, 1.0)) for n, g in G.items())}


def _short_name(name: str) -> str:
    short = name.rsplit(".", 1)[-1]
    if not re.fullmatch(r"layers\.\d+\.(self_attn|mlp)\.\w+", name) or short not in LORA_MODULES:
        raise ValueError(f"not a LoRA module name: {name!r} (expected e.g. "
                         f"'layers.0.self_attn.q_proj')")
    return short


def export_peft(out_dir: str | os.PathLike, G: dict, rank: int, alpha: float,
                base_model_name_or_path: str | None, *, rslora: bool = False,
                dtype: str = "float32") -> Path:
    """Writes a dense update as a rank-``r`` PEFT LoRA adapter.

    Each ``G[name]`` is truncated to rank ``r`` by SVD (:func:`lora_factors_from_dense`);
    PEFT reproduces ``scale · lora_B · lora_A`` = the truncated update, with
    ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    Args:
      out_dir: output folder (created).
      G: ``{module_name: [d_out, d_in]}`` dense global update.
      rank: LoRA rank ``r``.
      alpha: ``lora_alpha``.
      base_model_name_or_path: recorded in ``adapter_config.json``.
      rslora: write ``use_rslora: true`` and scale accordingly.
      dtype: saved dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Returns:
      The output folder.

    Raises:
      ValueError: a bad module name or rank.
    """
    if not G:
        raise ValueError("G is empty: nothing to export")
    scale = float(lora_scale(rank, alpha, rslora=rslora))
    np_dtype = _SAVE_DTYPES[dtype]
    tensors = {}
    for name in sorted(G):
        _short_name(name)
        b, a = lora_factors_from_dense(G[name], rank, scale)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.astype(np_dtype))
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.astype(np_dtype))
    targets = [m for m in LORA_MODULES if m in {_short_name(n) for n in G}]
    config = {
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(rank),
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": bool(rslora),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PEFT_CONFIG, "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata=_META)
    return out


def load_peft(adapter_dir: str | os.PathLike, *, r_max: int | None = None,
              cfg: LlamaConfig | None = None, dtype=jnp.float32) -> tuple[Adapter, dict]:
    """Reads a PEFT LoRA adapter folder into an :class:`Adapter`.

    Args:
      adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      r_max: pad the factors to this rank (default: the adapter's ``r``).
      cfg: if given, module names and shapes are checked against this model.
      dtype: dtype of the factors, mask and scale.

    Returns:
      ``(adapter, adapter_config)``: ``mask`` has ``r`` ones, ``scale`` is
      ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``).

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unsupported PEFT config (not LoRA, DoRA, per-module
        rank/alpha patterns, biases), an unexpected key or a shape mismatch.
    """
    folder = Path(adapter_dir)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in PEFT adapter folder {folder}")
    with open(folder / PEFT_CONFIG) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"unsupported peft_type {config.get('peft_type')!r}: only LORA")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise ValueError(f"unsupported non-empty {field} {config[field]!r}: one rank and "
                             f"alpha for all modules is required")
    if config.get("use_dora"):
        raise ValueError("unsupported use_dora=True")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"unsupported LoRA bias {config.get('bias')!r}")
    if config.get("fan_in_fan_out"):
        raise ValueError("unsupported fan_in_fan_out=True")
    r = int(config["r"])
    r_max = r if r_max is None else int(r_max)
    if r_max < r:
        raise ValueError(f"r_max={r_max} is smaller than the adapter rank r={r}")
    expected = lora_targets(cfg, "all-linear") if cfg is not None else None

    factors: dict[str, dict[str, np.ndarray]] = {"A": {}, "B": {}}
    file = str(folder / PEFT_WEIGHTS)
    with open_safetensors(file) as f:
        for key in f.keys():
            m = _PEFT_KEY.fullmatch(key)
            if m is None or m.group(2) not in LORA_MODULES:
                raise ValueError(f"unexpected key {key!r} in {file}")
            name, which = m.group(1), m.group(3)
            w = f.get_tensor(key).astype(np.float32)
            if expected is not None and name not in expected:
                raise ValueError(f"key {key!r} in {file} names no module of the model")
            d_out, d_in = expected[name] if expected is not None else (None, None)
            want = (r, d_in) if which == "A" else (d_out, r)
            if w.ndim != 2 or any(x is not None and x != y for x, y in zip(want, w.shape)):
                raise ValueError(f"shape mismatch for {key!r} in {file}: {w.shape}, expected "
                                 f"{tuple('?' if x is None else x for x in want)}")
            factors[which][name] = w
    missing = sorted(set(factors["A"]) ^ set(factors["B"]))
    if missing:
        raise ValueError(f"{file} lacks lora_A or lora_B for {missing}")
    a = {n: jnp.asarray(np.pad(w, ((0, r_max - r), (0, 0))), dtype) for n, w in factors["A"].items()}
    b = {n: jnp.asarray(np.pad(w, ((0, 0), (0, r_max - r))), dtype) for n, w in factors["B"].items()}
    mask = jnp.asarray(np.arange(r_max) < r, dtype)
    scale = jnp.asarray(lora_scale(r, float(config["lora_alpha"]),
                                   rslora=bool(config.get("use_rslora"))), dtype).reshape(())
    return Adapter(B=b, A=a, mask=mask, scale=scale), config
