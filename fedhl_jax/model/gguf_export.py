"""Exporting a (merged) model to a GGUF file that llama.cpp-based tools run.

:func:`export_gguf` writes ``params + delta`` with ``gguf.GGUFWriter`` under the
family's GGUF architecture (``llama``, ``qwen2``, ``qwen3``) and tensor names: the
hyper-parameters from the :class:`LlamaConfig`, the q/k rows permuted to
llama.cpp's RoPE layout where the family's converter does it
(:func:`fedhl_jax.model.gguf.permute_qk`, ``llama`` only), Llama-3's ``llama3``
RoPE scaling as the ``rope_freqs.weight`` divisors llama.cpp reads, and the
tokenizer, chat template and descriptive ``general.*`` metadata copied from a
source GGUF file. Norm gains and biases are always stored as F32; the matrices as F32,
F16, BF16 or Q8_0 (a matrix whose rows are not a multiple of 32 falls back to
F16 under Q8_0, as llama.cpp's converter does).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from fedhl_jax.model.adapters import merge_delta
from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.gguf import (QK, ROPE_FREQS, find_gguf, llama3_rope_factors, open_gguf, path_to_gguf_key,
                                  permute_qk, qk_heads)
from fedhl_jax.model.llama import flatten_params, param_shapes

_T = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType
# export dtype -> (tensor type of the matrices, general.file_type)
GGUF_EXPORT_TYPES = {
    "f32": (_T.F32, _F.ALL_F32),
    "f16": (_T.F16, _F.MOSTLY_F16),
    "bf16": (_T.BF16, _F.MOSTLY_BF16),
    "q8_0": (_T.Q8_0, _F.MOSTLY_Q8_0),
}
# Source metadata not copied: written from the config, or by GGUFWriter itself.
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version",
             "general.alignment")


def _copyable_metadata(source) -> list[tuple[str, object, gguf.GGUFValueType,
                                             gguf.GGUFValueType | None]]:
    """``(key, value, type, array item type)`` of the source GGUF's non-model metadata."""
    file = find_gguf(source)
    if file is None:
        raise FileNotFoundError(f"no GGUF file at {os.fspath(source)}")
    reader = open_gguf(file)
    arch = reader.fields["general.architecture"].contents()
    out = []
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", f"{arch}.")) or key in _OWN_KEYS:
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY and len(field.types) != 2:
            continue  # nested arrays: none of the tokenizer/general keys use them
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), main, sub))
    return out


def _add_config(writer: gguf.GGUFWriter, cfg: LlamaConfig) -> None:
    """The ``<arch>.*`` hyper-parameters llama.cpp reads (``<arch>``: the family's GGUF architecture)."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    elif cfg.rope_type == "llama3":  # the divisors go in rope_freqs.weight; llama.cpp reads this key for YaRN only
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_position_embeddings)


def encode_tensor(w: np.ndarray, qtype, name: str = "?"
                  ) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Encodes a float array for ``GGUFWriter.add_tensor``.

    Args:
      w: float array, NumPy layout (``[d_out, d_in]``).
      qtype: wanted ``GGMLQuantizationType`` (F32, F16, BF16 or Q8_0); 1-D
        arrays are always F32, and Q8_0 falls back to F16 when the last
        dimension is not a multiple of 32.
      name: tensor name, for error messages.

    Returns:
      ``(data, type)``: float32/float16 data, or uint8 bytes of a quantised type.

    Raises:
      ValueError: values that overflow float16, or an unsupported type.
    """
    w = np.asarray(w, np.float32)
    if w.ndim == 1 or qtype == _T.F32:
        return np.ascontiguousarray(w), _T.F32
    if qtype == _T.Q8_0 and w.shape[-1] % QK:
        qtype = _T.F16
    if qtype == _T.F16:
        if np.abs(w).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError(f"tensor {name!r} has values beyond float16's range")
        return np.ascontiguousarray(w.astype(np.float16)), _T.F16
    if qtype in (_T.BF16, _T.Q8_0):
        return gguf.quants.quantize(w, qtype), qtype
    raise ValueError(f"unsupported export type {qtype!r} for tensor {name!r}")


def export_gguf(path: str | os.PathLike, cfg: LlamaConfig, params: dict,
                delta: dict | None = None, *, dtype: str = "f16", gguf_source=None,
                name: str | None = None) -> Path:
    """Writes ``params + delta`` as a llama.cpp GGUF file.

    :func:`fedhl_jax.model.load_pretrained` loads the file back; with a
    ``gguf_source`` that carries a tokenizer, llama.cpp-based tools and
    ``transformers`` (``gguf_file=``) run it as well.

    Args:
      path: output ``.gguf`` file (its folder is created).
      cfg: model config of ``params``.
      params: base parameters.
      delta: optional ``{module_name: [d_out, d_in]}`` dense update to merge.
      dtype: storage type of the matrices, one of :data:`GGUF_EXPORT_TYPES`
        (``"f16"``, ``"q8_0"``, ``"bf16"``, ``"f32"``); norm gains stay F32.
      gguf_source: a GGUF file (or folder holding one) whose tokenizer, chat
        template and ``general.*`` metadata are copied; ``None`` writes the
        model only (llama.cpp then cannot tokenise).
      name: ``general.name`` (default: the source's, else ``"fedhl-jax export"``).

    Returns:
      The path of the written file.

    Raises:
      ValueError: an unknown dtype, parameters that do not match ``cfg``, or a
        source vocabulary of a different size.
    """
    if dtype not in GGUF_EXPORT_TYPES:
        raise ValueError(f"unsupported GGUF export dtype {dtype!r}: use one of "
                         f"{sorted(GGUF_EXPORT_TYPES)}")
    qtype, file_type = GGUF_EXPORT_TYPES[dtype]
    merged = merge_delta(params, delta) if delta else params
    flat = flatten_params(merged)
    expected = param_shapes(cfg)
    shapes = {p: tuple(v.shape) for p, v in flat.items()}
    if shapes != expected:
        bad = sorted(set(shapes.items()) ^ set(expected.items()))[:4]
        raise ValueError(f"params do not match the config: first differences {bad}")

    copied = _copyable_metadata(gguf_source) if gguf_source is not None else []
    for key, value, _, _ in copied:
        if key == "tokenizer.ggml.tokens" and len(value) != cfg.vocab_size:
            raise ValueError(f"the source tokenizer has {len(value)} tokens, the model "
                             f"{cfg.vocab_size}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    family = cfg.model_family
    writer = gguf.GGUFWriter(str(out), family.gguf_arch)
    keys = {key for key, *_ in copied}
    if name is not None or "general.name" not in keys:
        writer.add_name(name or "fedhl-jax export")
    for key, value, vtype, sub in copied:
        if key == "general.name" and name is not None:
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if gguf_source is None:
        for key, value in (("tokenizer.ggml.bos_token_id", cfg.bos_token_id),
                           ("tokenizer.ggml.eos_token_id", cfg.eos_token_id),
                           ("tokenizer.ggml.padding_token_id", cfg.pad_token_id)):
            if value is not None:
                writer.add_uint32(key, int(value))
    _add_config(writer, cfg)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    heads = qk_heads(cfg)
    if cfg.rope_type == "llama3":
        writer.add_tensor(ROPE_FREQS, llama3_rope_factors(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_position_embeddings))
    for p in expected:
        w = np.asarray(flat[p], np.float32)
        short = p.rsplit(".", 1)[-1]
        if short in heads:
            w = permute_qk(w, heads[short])
        key = path_to_gguf_key(p, cfg.family)
        data, t = encode_tensor(w, qtype, key)
        writer.add_tensor(key, data, raw_dtype=t if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
