"""A tiny GGUF model written with ``gguf.GGUFWriter``, and float64 NumPy references.

The file mixes tensor types (F32, F16, BF16, Q8_0, Q4_0, Q4_1), stores
``attn_q``/``attn_k`` in llama.cpp's permuted row order, and carries a small
byte-level BPE vocabulary with merges, control and user-defined tokens and a
ChatML template, so tests need nothing outside the repository.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from fedhl_jax.model import LlamaConfig

T = gguf.GGMLQuantizationType
CFG = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "Ġwor l",
          "Ġworl d", "1 2"]
USER_DEFINED = "<think>"
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# GGUF tensor name -> storage type (layer 1 uses other types than layer 0).
TYPES = {
    "token_embd.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q4_0, "blk.1.attn_q.weight": T.Q4_1,
    "blk.0.attn_k.weight": T.F16, "blk.1.attn_k.weight": T.Q8_0,
    "blk.0.attn_v.weight": T.BF16, "blk.1.attn_v.weight": T.F32,
    "blk.0.attn_output.weight": T.Q4_1, "blk.1.attn_output.weight": T.Q4_0,
    "blk.0.ffn_gate.weight": T.Q8_0, "blk.1.ffn_gate.weight": T.F16,
    "blk.0.ffn_up.weight": T.F32, "blk.1.ffn_up.weight": T.Q4_1,
    "blk.0.ffn_down.weight": T.Q4_0, "blk.1.ffn_down.weight": T.BF16,
    "output.weight": T.F16,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Tokens and token types: 3 control tokens, 256 bytes, one token per merge, ``<think>``."""
    tokens = SPECIALS + [bytes_to_unicode()[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES] + [USER_DEFINED]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    assert len(tokens) == CFG.vocab_size
    return tokens, types


def hf_to_gguf_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """``idx`` with ``gguf_rows = hf_rows[idx]``: GGUF row ``j`` of a head is HF row
    ``(j % 2) * hd/2 + j // 2`` (llama.cpp interleaves the rotate-half pairs)."""
    hd = n_rows // n_heads
    j = np.arange(hd)
    within = (j % 2) * (hd // 2) + j // 2
    return (np.arange(n_heads)[:, None] * hd + within[None]).reshape(-1)


def random_hf_weights(seed: int = 0, cfg: LlamaConfig = CFG) -> dict[str, np.ndarray]:
    """``{gguf_name: float32 [d_out, d_in] (HF row order)}`` random weights; norms around 1."""
    rng = np.random.default_rng(seed)
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for b in range(cfg.num_layers):
        shapes.update({f"blk.{b}.attn_norm.weight": (d,), f"blk.{b}.ffn_norm.weight": (d,),
                       f"blk.{b}.attn_q.weight": (q, d), f"blk.{b}.attn_k.weight": (kv, d),
                       f"blk.{b}.attn_v.weight": (kv, d), f"blk.{b}.attn_output.weight": (d, q),
                       f"blk.{b}.ffn_gate.weight": (i, d), f"blk.{b}.ffn_up.weight": (i, d),
                       f"blk.{b}.ffn_down.weight": (d, i)})
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return out


def encode(w: np.ndarray, qtype) -> np.ndarray:
    """Stores a float32 array as ``qtype`` with the gguf package's own encoders."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def _f16(b: bytes) -> float:
    return float(struct.unpack("<e", b)[0])


def ref_decode(data: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """float64 reference decoder, block by block (slow, plain, independent of the library)."""
    raw = np.ascontiguousarray(data).tobytes()
    n = int(np.prod(shape))
    if qtype == T.F32:
        return np.frombuffer(raw, "<f4").astype(np.float64).reshape(shape)
    if qtype == T.F16:
        return np.frombuffer(raw, "<f2").astype(np.float64).reshape(shape)
    if qtype == T.BF16:
        u16 = np.frombuffer(raw, "<u2")
        return np.array([struct.unpack("<f", struct.pack("<I", int(u) << 16))[0] for u in u16],
                        np.float64).reshape(shape)
    out = np.empty(n, np.float64)
    size = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20}[qtype]
    for k in range(n // 32):
        blk = raw[k * size:(k + 1) * size]
        if qtype == T.Q8_0:
            d = _f16(blk[:2])
            vals = [d * q for q in struct.unpack("<32b", blk[2:])]
        else:
            d = _f16(blk[:2])
            m, qs = (_f16(blk[2:4]), blk[4:]) if qtype == T.Q4_1 else (None, blk[2:])
            q = [qs[j] & 0x0F for j in range(16)] + [qs[j] >> 4 for j in range(16)]
            vals = [d * x + m for x in q] if qtype == T.Q4_1 else [d * (x - 8) for x in q]
        out[k * 32:(k + 1) * 32] = vals
    return out.reshape(shape)


def write_tiny_gguf(path: Path, *, cfg: LlamaConfig = CFG, types: dict | None = None,
                    pre: str = "smollm", add_bos: bool = False, extra: dict | None = None,
                    seed: int = 0, meta: dict | None = None) -> dict[str, np.ndarray]:
    """Writes the tiny model; returns the float64 reference ``{gguf_name: HF-layout array}``.

    Args:
      path: the ``.gguf`` file to write.
      cfg: model shape (``tie_word_embeddings`` drops ``output.weight``).
      types: overrides of :data:`TYPES`; tensors not named are F32.
      pre: ``tokenizer.ggml.pre``.
      add_bos: ``tokenizer.ggml.add_bos_token``.
      extra: extra tensors ``{name: (array, qtype)}`` written as they are.
      seed: weight seed.
      meta: metadata written as given, over the values ``cfg`` implies: ``{key: value}``
        (int → INT64, float → FLOAT32, str → STRING, list → ARRAY; ``None`` drops the key).
    """
    types = {**TYPES, **(types or {})}
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    tokens, token_types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (meta or {}).items():
        w.kv_data[0].pop(key, None)
        if value is not None:
            vtype = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.INT64,
                     float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING,
                     list: gguf.GGUFValueType.ARRAY}[type(value)]
            w.add_key_value(key, value, vtype)

    reference = {}
    for name, hf in random_hf_weights(seed, cfg).items():
        kind = name.split(".")[-2]
        stored = hf[hf_to_gguf_rows(hf.shape[0], heads[kind])] if kind in heads else hf
        qtype = types.get(name, T.F32) if hf.ndim == 2 else T.F32
        data = encode(stored, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        if qtype not in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1):
            continue  # a type the loader must refuse: no reference
        decoded = ref_decode(data, qtype, stored.shape)  # GGUF row order
        if kind in heads:
            decoded = decoded[np.argsort(hf_to_gguf_rows(hf.shape[0], heads[kind]))]
        reference[name] = decoded
    for name, (arr, qtype) in (extra or {}).items():
        data = encode(arr, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference
