"""Loading models of the registered families from GGUF files (llama.cpp's format), NumPy only.

A GGUF file holds metadata (hyper-parameters, tokenizer, chat template) and
tensors, some of them block-quantised. The file is read with the ``gguf``
package's :class:`gguf.GGUFReader` (a memory map); the tensors are
dequantised here, in vectorised NumPy, and mapped to parameter paths through
the family's name map (``ModelFamily.gguf_names``, :mod:`fedhl_jax.model.families`;
the family comes from the file's ``general.architecture``).

Two layout details differ from Hugging Face checkpoints:

* GGUF lists a tensor's dimensions fastest-first (``ne0`` = the input width of
  a linear layer); the bytes are the same row-major ``[d_out, d_in]`` matrix
  that NumPy sees after reversing the shape.
* For the ``llama`` architecture, llama.cpp's converter permutes the rows of
  ``attn_q``/``attn_k`` within each head, from Hugging Face's rotate-half RoPE
  layout to its interleaved one (:func:`permute_qk`); :func:`unpermute_qk`
  undoes it on load. ``qwen2`` and ``qwen3`` keep Hugging Face's row order
  (``ModelFamily.gguf_permute_qk``).
* Llama-3.x's ``llama3`` RoPE scaling is not in the metadata: the converter
  stores the per-frequency divisors as a tensor, ``rope_freqs.weight``
  (:data:`ROPE_FREQS`), from which :func:`llama3_rope_from_factors` recovers the
  scaling parameters.

Supported tensor types are listed in :data:`SUPPORTED_TYPES`; any other raises
a ``ValueError`` naming the type and the tensor.

A model file is untrusted input. Before any tensor is decoded,
:func:`check_gguf_metadata` checks the hyper-parameters against each other and
against the tensors the file holds (a ``block_count`` of 10⁸ in a two-block
file is refused at once, not allocated), and :func:`check_gguf_tensors` checks
every tensor's name, type and shape against the config; each decoded tensor is
checked for NaN/Inf once. Every refusal is a :class:`GGUFError` (a
``ValueError``) whose one-line message names the file and the key, tensor or
value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fedhl_jax.model.checkpoint import check_finite_weight
from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.families import family_for_gguf_arch, get_family
from fedhl_jax.model.llama import param_shapes, unflatten_params

GGUF_MAGIC = b"GGUF"
QK = 32  # elements per block of the Q4_0, Q4_1 and Q8_0 formats

_T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE divisors [hd/2] (llama.cpp's MODEL_TENSOR.ROPE_FREQS)
LLAMA3_ORIGINAL_CONTEXT = 8192  # llama.cpp's converter assumes it when the config does not say
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class GGUFError(ValueError):
    """A GGUF file is refused: unreadable, inconsistent metadata, or tensors that do not match it.

    The message is one line naming the file and the offending key, tensor or value.
    """


# --------------------------------------------------------------------------- names
def gguf_key_to_path(name: str, family: str = "llama") -> str | None:
    """Maps a GGUF tensor name to a parameter path (the family's ``gguf_names``), or ``None`` if it
    matches no rule.

    ``"blk.3.attn_q.weight"`` → ``"layers.3.self_attn.q_proj"``.
    """
    return get_family(family).gguf_names.to_path(name)


def path_to_gguf_key(path: str, family: str = "llama") -> str:
    """Inverse of :func:`gguf_key_to_path` (``"norm"`` → ``"output_norm.weight"``)."""
    key = get_family(family).gguf_names.to_name(path)
    if key is None:
        raise ValueError(f"no GGUF tensor name for parameter path {path!r}")
    return key


# --------------------------------------------------------------------------- q/k rows
def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face → llama.cpp row order of ``q_proj``/``k_proj`` (as its converter does).

    Within each head, rows ``[x_0 .. x_{hd/2-1}, y_0 .. y_{hd/2-1}]`` (rotate-half
    pairs ``(x_i, y_i)``) become interleaved ``[x_0, y_0, x_1, y_1, ...]``.

    Args:
      w: ``[n_heads*hd, d_in]`` weight (or ``[n_heads*hd]`` bias).
      n_heads: query heads for ``q_proj``, key/value heads for ``k_proj``.

    Returns:
      The permuted array, same shape.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: llama.cpp → Hugging Face row order."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def qk_heads(cfg: LlamaConfig) -> dict[str, int]:
    """``{leaf: heads}`` of the q/k weights (and biases) whose rows llama.cpp permutes for this family
    (:func:`permute_qk`); empty for a family that keeps Hugging Face's order."""
    if not cfg.model_family.gguf_permute_qk:
        return {}
    return {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads,
            "q_proj_bias": cfg.num_heads, "k_proj_bias": cfg.num_kv_heads}


# --------------------------------------------------------------------------- dequantisation
def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """``raw`` bytes → ``[n_blocks, block_bytes]`` uint8."""
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """``[n, 2]`` uint8 → ``[n, 1]`` float32 (little-endian half floats)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 16]`` packed 4-bit values → ``[n, 32]`` uint8.

    Byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in
    its high nibble.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (``f16 d`` + 32 ``int8 q``) → ``d * q``, flat float32."""
    b = _blocks(raw, 2 + QK)
    d = _f16(b[:, :2])  # [n, 1]
    q = b[:, 2:].view(np.int8).astype(np.float32)  # [n, 32]
    return (d * q).reshape(-1)


def dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (``f16 d`` + 16 bytes of nibbles ``q``) → ``d * (q - 8)``, flat float32."""
    b = _blocks(raw, 2 + QK // 2)
    d = _f16(b[:, :2])  # [n, 1]
    q = _nibbles(b[:, 2:]).astype(np.float32) - 8.0  # [n, 32]
    return (d * q).reshape(-1)


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 blocks (``f16 d``, ``f16 m`` + 16 bytes of nibbles ``q``) → ``d * q + m``."""
    b = _blocks(raw, 4 + QK // 2)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])  # [n, 1] each
    q = _nibbles(b[:, 4:]).astype(np.float32)  # [n, 32]
    return (d * q + m).reshape(-1)


def _dequant_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").reshape(-1)


def _dequant_f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32).reshape(-1)


def _dequant_bf16(raw: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(-1)


_DEQUANT = {_T.F32: _dequant_f32, _T.F16: _dequant_f16, _T.BF16: _dequant_bf16,
            _T.Q8_0: dequant_q8_0, _T.Q4_0: dequant_q4_0, _T.Q4_1: dequant_q4_1}


def dequantize(raw: np.ndarray, qtype, shape: tuple[int, ...], name: str = "?") -> np.ndarray:
    """Decodes one tensor's data to float32.

    Args:
      raw: the tensor's bytes (any dtype/shape; ``GGUFReader`` tensor ``.data``).
      qtype: ``gguf.GGMLQuantizationType`` (or its int value).
      shape: NumPy shape, slowest dimension first (the GGUF shape reversed).
      name: tensor name, for error messages.

    Returns:
      ``shape`` float32 array.

    Raises:
      ValueError: an unsupported type or a size that does not match ``shape``.
    """
    qtype = _T(int(qtype))
    fn = _DEQUANT.get(qtype)
    if fn is None:
        raise ValueError(f"tensor {name!r} has GGML type {qtype.name}, which is not supported: "
                         f"supported are {list(SUPPORTED_TYPES)}")
    n = int(np.prod(shape))
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    expected = n // block * type_bytes
    if n % block or np.asarray(raw).nbytes != expected:
        raise ValueError(f"tensor {name!r} ({qtype.name}, shape {shape}) has "
                         f"{np.asarray(raw).nbytes} bytes, expected {expected}")
    return fn(raw).reshape(shape)


# --------------------------------------------------------------------------- llama3 RoPE
def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original: int) -> np.ndarray:
    """``[hd/2]`` float32 divisors of the RoPE inverse frequencies under ``llama3`` scaling.

    As llama.cpp's converter writes ``rope_freqs.weight`` (in float64): 1 for wavelengths below
    ``original / high_freq_factor``, ``factor`` above ``original / low_freq_factor``, and
    ``1 / ((1 - s) / factor + s)``, ``s = (original / λ - low) / (high - low)``, between.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    out = np.where(wavelen < original / high_freq_factor, 1.0,
                   np.where(wavelen > original / low_freq_factor, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def llama3_rope_from_factors(factors: np.ndarray, *, head_dim: int, theta: float,
                             original: int = LLAMA3_ORIGINAL_CONTEXT) -> dict:
    """The ``LlamaConfig`` RoPE fields whose :func:`llama3_rope_factors` are ``factors``.

    The divisors fix the factor (the largest) and the two wavelength thresholds
    ``original / low_freq_factor`` and ``original / high_freq_factor`` (from the interpolated
    entries, or between the kept and the divided ones), so ``original`` only scales the two
    frequency factors; values that round to 4 decimals and still reproduce the divisors are
    rounded (Llama-3.1's 8, 1, 4 read back exactly).

    Args:
      factors: ``[hd/2]`` divisors (``rope_freqs.weight``).
      head_dim: per-head width ``hd``.
      theta: RoPE base.
      original: ``original_max_position_embeddings`` to express the thresholds in.

    Returns:
      ``{"rope_type": "default"}`` when every divisor is 1, else the ``llama3`` fields
      (``rope_type``, ``rope_scaling_factor``, ``rope_low_freq_factor``, ``rope_high_freq_factor``,
      ``rope_original_max_position_embeddings``).

    Raises:
      ValueError: divisors of another shape, not finite and >= 1, or not of the ``llama3`` form
        (naming what differs).
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.shape != (head_dim // 2,):
        raise ValueError(f"{ROPE_FREQS} has {f.size} values, head_dim={head_dim} needs {head_dim // 2}")
    if not (np.all(np.isfinite(f)) and np.all(f >= 1 - 1e-6)):
        raise ValueError(f"{ROPE_FREQS} must hold finite divisors >= 1, got {f.tolist()}")
    if np.all(np.abs(f - 1) <= 1e-6):
        return {"rope_type": "default"}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv  # increasing
    factor = float(f.max())
    kept, low = np.abs(f - 1) <= 1e-6, np.abs(f - factor) <= 1e-6 * factor
    medium = ~kept & ~low
    w_kept = wavelen[kept].max() if kept.any() else wavelen.min() / 2
    w_low = wavelen[low].min()
    if medium.sum() >= 2:  # s = (1/λ - 1/λ_lo) / (1/λ_hi - 1/λ_lo) is linear in 1/λ
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        slope, icept = np.polyfit(1 / wavelen[medium], s, 1)
        inv_lo = -icept / slope
        inv_hi = inv_lo + 1 / slope
    elif medium.sum() == 1:
        w_m = wavelen[medium][0]
        s = (1 / f[medium][0] - 1 / factor) / (1 - 1 / factor)
        inv_lo = 1 / math.sqrt(w_m * w_low)
        inv_hi = inv_lo + (1 / w_m - inv_lo) / s
    else:  # thresholds anywhere between the kept and the divided wavelengths
        inv_hi, inv_lo = 1 / (w_kept ** (2 / 3) * w_low ** (1 / 3)), 1 / (w_kept ** (1 / 3) * w_low ** (2 / 3))
    exact = (factor, original * inv_lo, original * inv_hi)
    for candidate in (tuple(round(x, 4) for x in exact), exact):
        fac, lo, hi = candidate
        if 0 < lo < hi and np.allclose(llama3_rope_factors(head_dim, theta, fac, lo, hi, original), f,
                                       rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "rope_scaling_factor": float(fac), "rope_low_freq_factor": float(lo),
                    "rope_high_freq_factor": float(hi), "rope_original_max_position_embeddings": int(original)}
    raise ValueError(f"{ROPE_FREQS} does not follow Llama-3's RoPE scaling (head_dim={head_dim}, "
                     f"rope.freq_base={theta}): {f.tolist()}")


def read_rope_freqs(reader: gguf.GGUFReader, file) -> np.ndarray | None:
    """The decoded ``rope_freqs.weight`` of a file (``None`` without one)."""
    t = {tensor.name: tensor for tensor in reader.tensors}.get(ROPE_FREQS)
    if t is None:
        return None
    if _T(int(t.tensor_type)) not in (_T.F32, _T.F16):
        raise GGUFError(f"tensor {ROPE_FREQS!r} in {file} has GGML type {t.tensor_type.name}, "
                        f"expected F32")
    return np.asarray(t.data, np.float32).reshape(-1)


# --------------------------------------------------------------------------- metadata
def find_gguf(path: str | os.PathLike) -> str | None:
    """The GGUF file that ``path`` names, or ``None`` if it is not a GGUF model.

    ``path`` may be a ``.gguf`` file (recognised by its magic bytes) or a folder
    that holds one ``*.gguf`` file and no ``config.json`` (a folder with a
    ``config.json`` is a Hugging Face checkpoint).

    Raises:
      ValueError: a folder holding several GGUF files (naming them).
    """
    p = Path(os.fspath(path)).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            return str(p) if f.read(4) == GGUF_MAGIC else None
    if p.is_dir() and not (p / "config.json").is_file():
        files = sorted(p.glob("*.gguf"))
        if len(files) > 1:
            raise ValueError(f"{p} holds several GGUF files, pass one of them: "
                             f"{[f.name for f in files]}")
        if files:
            return str(files[0])
    return None


def open_gguf(file: str | os.PathLike) -> gguf.GGUFReader:
    """``gguf.GGUFReader(file)``; unreadable files raise ``ValueError`` naming the file."""
    try:
        return gguf.GGUFReader(os.fspath(file))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise GGUFError(f"cannot read GGUF file {file} (truncated or corrupt?): "
                        f"{_one_line(e)}") from e


def field_value(field: gguf.ReaderField):
    """A metadata field as a Python value (float32 values rounded to their shortest repr)."""
    value = field.contents()
    if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
        value = ([float(str(np.float32(v))) for v in value] if isinstance(value, list)
                 else float(str(np.float32(value))))
    return value


def read_metadata(reader: gguf.GGUFReader) -> dict:
    """All metadata key/values of a GGUF file (the ``GGUF.*`` header fields excluded).

    Raises:
      GGUFError: a value that cannot be decoded (e.g. a string that is not UTF-8), naming the key.
    """
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field_value(field)
        except (ValueError, IndexError) as e:
            raise GGUFError(f"{getattr(reader.data, 'filename', 'GGUF file')}: GGUF metadata {key!r} cannot be "
                            f"read: {_one_line(e)}") from e
    return meta


# Hyper-parameters (``<arch>.<key>``) that must be positive integers, and positive finite numbers.
_POSITIVE_INTS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                  "attention.head_count_kv", "attention.key_length", "attention.value_length",
                  "rope.dimension_count", "context_length", "vocab_size")
_POSITIVE_FLOATS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor")
_BLOCK_INDEX = re.compile(r"blk\.(\d+)\.")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def check_gguf_metadata(meta: dict, tensor_names: Sequence[str], file: str | os.PathLike) -> None:
    """Checks a GGUF file's hyper-parameters before anything is built from them.

    Integers (layer, head and dimension counts, context length, vocabulary size)
    must be positive integers, ``head_count`` must divide ``embedding_length``
    (when ``key_length`` is absent) and ``head_count_kv`` must divide
    ``head_count``; epsilon, RoPE base and scaling factor must be finite and
    positive; ``block_count`` must equal the number of ``blk.<i>.*`` blocks the
    file holds (``blk.0`` to ``blk.<block_count - 1>``). Nothing is allocated in
    proportion to the values checked.

    Args:
      meta: from :func:`read_metadata`.
      tensor_names: the names of the tensors in the file.
      file: the file, for messages.

    Raises:
      GGUFError: naming the file, the key and its value.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{file}: GGUF metadata general.architecture={arch!r} is not a name")

    def refuse(key: str, why: str) -> GGUFError:
        return GGUFError(f"{file}: GGUF metadata {key}={meta[key]!r} {why}")

    def present(key: str) -> bool:
        return f"{arch}.{key}" in meta

    for key in _POSITIVE_INTS:
        value = meta.get(full := f"{arch}.{key}")
        if present(key) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise refuse(full, "must be a positive integer")
    value = meta.get(full := f"{arch}.expert_count")
    if present("expert_count") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise refuse(full, "must be a non-negative integer")
    for key in _POSITIVE_FLOATS:
        value = meta.get(full := f"{arch}.{key}")
        if present(key) and (isinstance(value, bool) or not isinstance(value, (int, float))
                             or not math.isfinite(value) or value <= 0):
            raise refuse(full, "must be a finite positive number")
    heads, hidden = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.embedding_length")
    if heads and hidden and not present("attention.key_length") and hidden % heads:
        raise refuse(f"{arch}.attention.head_count", f"does not divide {arch}.embedding_length={hidden} "
                     f"(and {arch}.attention.key_length is absent)")
    kv = meta.get(f"{arch}.attention.head_count_kv")
    if heads and kv and heads % kv:
        raise refuse(f"{arch}.attention.head_count_kv", f"does not divide {arch}.attention.head_count={heads}")
    if present("block_count"):
        n = meta[f"{arch}.block_count"]
        blocks = sorted({int(m.group(1)) for name in tensor_names if (m := _BLOCK_INDEX.match(name))})
        if len(blocks) != n or blocks[-1] != n - 1:
            held = f"{len(blocks)} block(s)" + (f" (blk.{blocks[0]} .. blk.{blocks[-1]})" if blocks else "")
            raise refuse(f"{arch}.block_count", f"but the file holds the tensors of {held}")


def check_gguf_tensors(reader: gguf.GGUFReader, cfg: LlamaConfig, file: str | os.PathLike
                       ) -> list[tuple[object, str, tuple[int, ...]]]:
    """Checks every tensor of a GGUF file against the config before any is decoded.

    Args:
      reader: the open file.
      cfg: the config its metadata gives (:func:`config_from_gguf`).
      file: the file, for messages.

    Returns:
      ``[(reader_tensor, parameter_path, numpy_shape)]`` in file order.

    Raises:
      GGUFError: a tensor that maps to no parameter, a shape other than the
        config's, an unsupported type, or a parameter with no tensor (naming the
        tensor, the shapes, the type and the file).
    """
    expected = param_shapes(cfg)
    names = cfg.model_family.gguf_names
    plan = []
    for t in reader.tensors:
        if names.is_ignored(t.name):
            continue  # not a parameter (rope_freqs: read by config_from_gguf)
        path = gguf_key_to_path(t.name, cfg.family)
        if path is None or path not in expected:
            raise GGUFError(f"unexpected tensor {t.name!r} in {file} (config has "
                            f"{cfg.num_layers} layers)")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if shape != expected[path]:
            raise GGUFError(f"shape mismatch for {t.name!r} in {file}: file has {shape}, "
                            f"metadata implies {expected[path]}")
        if _T(int(t.tensor_type)) not in _DEQUANT:
            raise GGUFError(f"tensor {t.name!r} in {file} has GGML type {t.tensor_type.name}, which is not "
                            f"supported: supported are {list(SUPPORTED_TYPES)}")
        plan.append((t, path, shape))
    found = {path for _, path, _ in plan}
    missing = [path_to_gguf_key(p, cfg.family) for p in expected if p not in found]
    if missing:
        raise GGUFError(f"missing tensor(s) in {file}: {missing[:8]}"
                        + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return plan


def config_from_gguf(meta: dict, *, tensor_names=(), dtype: str = "float32",
                     rope_freqs: np.ndarray | None = None) -> LlamaConfig:
    """Builds a :class:`LlamaConfig` from GGUF metadata.

    Args:
      meta: from :func:`read_metadata`.
      tensor_names: the file's tensor names; without the family's head (``output.weight``) the
        embeddings are tied.
      dtype: parameter/compute dtype (``"float32"`` or ``"bfloat16"``).
      rope_freqs: the file's ``rope_freqs.weight`` (Llama-3.x's ``llama3`` RoPE scaling), if any.

    Returns:
      The config.

    Raises:
      ValueError: an architecture of no registered family, mixture of experts, partial
        rotary embeddings or an unsupported RoPE scaling (naming the value).
    """
    arch = meta.get("general.architecture")
    family = family_for_gguf_arch(arch)  # raises naming an unsupported architecture

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    if int(get("expert_count", 0)):
        raise ValueError(f"unsupported mixture of experts ({arch}.expert_count="
                         f"{get('expert_count')})")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"unsupported {arch}.attention.value_length != key_length")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"unsupported partial rotary embedding: {arch}.rope.dimension_count="
                         f"{rope_dims}, head_dim={head_dim}")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"unsupported RoPE scaling {arch}.rope.scaling.type={scaling!r}: "
                         f"supported are 'none' and 'linear'")
    rope = {"rope_scaling_factor": float(get("rope.scaling.factor", 1.0))} if scaling == "linear" else {}
    theta = float(get("rope.freq_base", 10000.0))
    if rope_freqs is not None:
        if scaling != "none":
            raise ValueError(f"{ROPE_FREQS} together with {arch}.rope.scaling.type={scaling!r} is not supported")
        rope = llama3_rope_from_factors(rope_freqs, head_dim=head_dim, theta=theta, original=int(
            get("rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT)))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        **rope,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=family.gguf_names.to_name("lm_head") not in set(tensor_names),
        dtype=dtype,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        family=family.name,
    )


def gguf_config(file: str | os.PathLike, *, dtype: str = "float32") -> LlamaConfig:
    """The :class:`LlamaConfig` of a GGUF file (or a folder holding one)."""
    file = find_gguf(file) or file
    reader = open_gguf(file)
    meta, names = read_metadata(reader), [t.name for t in reader.tensors]
    check_gguf_metadata(meta, names, file)
    return config_from_gguf(meta, tensor_names=names, dtype=dtype, rope_freqs=read_rope_freqs(reader, file))


# --------------------------------------------------------------------------- tensors
def read_tensors(file: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a GGUF file's metadata and all its tensors as float32, in file layout.

    Tensors keep the GGUF names and llama.cpp's q/k row order; shapes are NumPy
    order (``[d_out, d_in]``).

    Returns:
      ``(metadata, {gguf_name: float32 array})``.
    """
    reader = open_gguf(file)
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors[t.name] = dequantize(t.data, t.tensor_type, shape, t.name)
    return read_metadata(reader), tensors


def tensor_types(file: str | os.PathLike) -> dict[str, str]:
    """``{gguf_name: type name}`` of a GGUF file's tensors (e.g. ``"Q4_1"``)."""
    return {t.name: t.tensor_type.name for t in open_gguf(file).tensors}


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32") -> tuple[LlamaConfig, dict]:
    """Loads a model of a registered family (``llama``, ``qwen2``, ``qwen3``) from a GGUF file.

    Quantised weights are dequantised to float32 (exactly: every Q4/Q8 value is
    a float32 number), the q/k rows are restored to Hugging Face order, and the
    result is cast to ``dtype``.

    Args:
      path: a ``.gguf`` file or a folder holding one (see :func:`find_gguf`).
      dtype: ``"float32"`` or ``"bfloat16"``: parameter and compute dtype.

    Returns:
      ``(cfg, params)`` with params as described in :mod:`fedhl_jax.model.llama`.

    Raises:
      FileNotFoundError: no GGUF file at ``path``.
      GGUFError: unreadable file, inconsistent metadata (:func:`check_gguf_metadata`),
        unsupported architecture or tensor type, unexpected or missing tensor,
        or a shape mismatch with the metadata (:func:`check_gguf_tensors`); each
        message names the file, tensor, type or value, and nothing is decoded
        before these checks pass.
      NonFiniteWeightError: a tensor holding NaN or Inf (naming it and the file).
    """
    file = find_gguf(path)
    if file is None:
        raise FileNotFoundError(f"no GGUF file at {os.fspath(path)}")
    reader = open_gguf(file)
    meta, names = read_metadata(reader), [t.name for t in reader.tensors]
    check_gguf_metadata(meta, names, file)
    try:
        cfg = config_from_gguf(meta, tensor_names=names, dtype=dtype, rope_freqs=read_rope_freqs(reader, file))
    except ValueError as e:  # an unsupported architecture or setting: name the file
        raise GGUFError(f"{file}: {_one_line(e)}") from e
    plan = check_gguf_tensors(reader, cfg, file)
    np_dtype = _NP_DTYPES[cfg.dtype]
    heads = qk_heads(cfg)
    flat = {}
    for t, path_, shape in plan:
        w = dequantize(t.data, t.tensor_type, shape, t.name)
        check_finite_weight(w, t.name, file)
        short = path_.rsplit(".", 1)[-1]
        if short in heads:
            w = unpermute_qk(w, heads[short])
        flat[path_] = jnp.asarray(w.astype(np_dtype))
    return cfg, unflatten_params(cfg, flat)
