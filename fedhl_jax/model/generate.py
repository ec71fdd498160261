"""Batched autoregressive generation with a KV cache.

Prompts of different lengths are left-padded; each row's RoPE positions count
its real tokens only and padding slots are masked out of attention, so a row's
continuation does not depend on the other rows. The prompt is processed in one
pass (prefill) and the decode loop runs under ``jax.jit`` as a
``lax.while_loop`` that stops early once every row has produced EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax import runtime
from fedhl_jax.lora import Adapter
from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.llama import forward_cached, init_cache, positions_from_mask


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray, lengths=None, *, pad_id: int = 0,
             pad_to_multiple: int = 1, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts into one array.

    Args:
      prompts: a list of token-id lists, or a right-padded ``[B, P]`` int array
        whose row ``i`` holds its prompt in ``[:lengths[i]]``.
      lengths: ``[B]`` prompt lengths; required with an array, ignored with lists.
      pad_id: id written into padding slots.
      pad_to_multiple: round the padded length up to a multiple of this (fewer
        recompilations across batches).
      pad_to: pad to exactly this length (one shape for every batch of a run: one compile);
        a longer prompt is an error.

    Returns:
      ``(tokens [B, P'], mask [B, P'])`` int32, prompts right-aligned, ``mask``
      1 on real tokens.

    Raises:
      ValueError: an empty prompt, a prompt longer than ``pad_to``, or an array without
        ``lengths``.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if lengths is None:
            raise ValueError("lengths is required when prompts is a padded array")
        rows = [arr[i, : int(n)].tolist() for i, n in enumerate(np.asarray(lengths))]
    else:
        rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token (e.g. BOS)")
    width = max(map(len, rows))
    if pad_to is not None:
        if width > pad_to:
            raise ValueError(f"a prompt of {width} tokens is longer than pad_to={pad_to}")
        width = pad_to
    width = -(-width // pad_to_multiple) * pad_to_multiple
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return tokens, mask


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Picks the next token from ``logits [B, V]``.

    Args:
      logits: ``[B, V]`` float32.
      key: PRNG key (unused when greedy).
      temperature: 0 for greedy (argmax), else the softmax temperature.
      top_k: keep only the ``top_k`` most likely tokens.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability
        reaches ``top_p``.

    Returns:
      ``[B]`` int32 token ids.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the top token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@runtime.jit(static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id"))
def _generate_padded(cfg: LlamaConfig, params: dict, tokens: jax.Array, prompt_mask: jax.Array,
                     adapter: Adapter | None, key: jax.Array, *, max_new_tokens: int,
                     temperature: float, top_k: int | None, top_p: float | None,
                     eos_id: int | None, pad_id: int) -> jax.Array:
    """Jitted prefill + decode loop on left-padded prompts; returns ``[B, N]`` new tokens."""
    b, p = tokens.shape
    n = max_new_tokens
    sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    is_eos = (lambda t: t == eos_id) if eos_id is not None else (lambda t: jnp.zeros_like(t, bool))

    kv_valid = jnp.zeros((b, p + n), bool).at[:, :p].set(prompt_mask.astype(bool))  # [B, S]
    positions = positions_from_mask(prompt_mask)  # [B, P]
    logits, cache = forward_cached(cfg, params, tokens, positions, kv_valid,
                                   init_cache(cfg, b, p + n), 0, adapter=adapter, last_only=True)
    key, sub = jax.random.split(key)
    tok = sample(logits[:, -1], sub)  # [B]
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        i, done = state[0], state[5]
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, tok, cache, kv_valid, pos, done, out, key = state
        slot = p + i - 1  # cache slot of the previous token
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((b, 1), bool), (0, slot))
        logits, cache = forward_cached(cfg, params, tok[:, None], pos[:, None], kv_valid, cache,
                                       slot, adapter=adapter)
        key, sub = jax.random.split(key)
        new = jnp.where(done, pad_id, sample(logits[:, 0], sub))  # [B]
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, new, cache, kv_valid, pos + 1, done | is_eos(new), out, key

    state = (jnp.int32(1), tok, cache, kv_valid, positions[:, -1] + 1, is_eos(tok), out, key)
    return jax.lax.while_loop(cond, body, state)[6]


def generate(cfg: LlamaConfig, params: dict, prompts, *, max_new_tokens: int, lengths=None,
             adapter: Adapter | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, key: jax.Array | None = None,
             eos_id: int | None | str = "config", pad_id: int | None = None,
             pad_to_multiple: int = 8, pad_to: int | None = None) -> jax.Array:
    """Generates continuations for a batch of prompts.

    Args:
      cfg: model config.
      params: base parameters.
      prompts: list of token-id lists, or a right-padded ``[B, P]`` array with
        ``lengths`` (see :func:`left_pad`).
      max_new_tokens: number of tokens to generate per row (``N``).
      lengths: ``[B]`` prompt lengths when ``prompts`` is an array.
      adapter: optional LoRA adapter applied during generation.
      temperature: 0 for greedy decoding, otherwise sampling temperature.
      top_k: optional top-k filter for sampling.
      top_p: optional nucleus filter for sampling.
      key: PRNG key, required when sampling.
      eos_id: stop token; ``"config"`` (default) uses ``cfg.eos_token_id``;
        ``None`` never stops early.
      pad_id: written after a row's EOS and into prompt padding; default
        ``cfg.pad_token_id`` or 0.
      pad_to_multiple: bucket the prompt length (see :func:`left_pad`).
      pad_to: fixed prompt width (see :func:`left_pad`); with a fixed batch size, every call
        reuses one compiled program.

    Returns:
      ``[B, N]`` int32 new tokens; a row that emitted EOS keeps it and is
      ``pad_id`` afterwards.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if isinstance(eos_id, str):
        if eos_id != "config":
            raise ValueError(f"eos_id must be an int, None or 'config', got {eos_id!r}")
        eos_id = cfg.eos_token_id
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens, mask = left_pad(prompts, lengths, pad_id=pad_id, pad_to_multiple=pad_to_multiple, pad_to=pad_to)
    key = jax.random.key(0) if key is None else key
    return _generate_padded(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), adapter, key,
                            max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                            top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=int(pad_id))


def strip_after_eos(tokens, eos_id: int | None, *, keep_eos: bool = False) -> list[list[int]]:
    """``[B, N]`` generated tokens → per-row lists cut at the first EOS.

    Args:
      tokens: output of :func:`generate`.
      eos_id: end-of-sequence id (``None``: nothing is cut).
      keep_eos: keep the EOS token itself.

    Returns:
      One list of ints per row.
    """
    rows = []
    for row in np.asarray(tokens).tolist():
        if eos_id is not None and eos_id in row:
            cut = row.index(eos_id)
            row = row[: cut + 1] if keep_eos else row[:cut]
        rows.append(row)
    return rows
