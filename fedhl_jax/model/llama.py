"""A pure-JAX Llama-2 decoder with rank-masked LoRA on its linear layers.

Parameters are a plain pytree in Hugging Face layout (weights ``[out, in]``),
named like the HF state dict without the ``model.`` prefix and ``.weight``
suffix::

    {
      "embed_tokens": [V, D],
      "layers": [                       # a Python list, one dict per block
        {"input_layernorm": [D],
         "self_attn": {"q_proj": [H*hd, D], "k_proj": [K*hd, D],
                       "v_proj": [K*hd, D], "o_proj": [D, H*hd]},
         "post_attention_layernorm": [D],
         "mlp": {"gate_proj": [I, D], "up_proj": [I, D], "down_proj": [D, I]}},
        ...
      ],
      "norm": [D],
      "lm_head": [V, D],                # absent when tie_word_embeddings
    }

The numerics follow ``transformers``' ``LlamaForCausalLM``: RMSNorm statistics
in float32, rotate-half RoPE (so HF ``q_proj``/``k_proj`` weights are used as
they are), grouped-query attention with a float32 softmax, SwiGLU MLP. Logits
are returned in float32.

A LoRA adapter (:class:`fedhl_jax.lora.Adapter`) is applied inside every linear
layer it names: ``y = x Wᵀ + s · ((x Aᵀ) ⊙ mask) Bᵀ``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax.lora import Adapter
from fedhl_jax.model.config import LlamaConfig

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES

# A KV cache: one ``(k, v)`` pair per layer, each ``[B, S, K, hd]``.
KVCache = list


# --------------------------------------------------------------------------- layout
def module_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``{short_name: (d_out, d_in)}`` of the seven linear layers of one block."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}


def module_name(layer: int, short: str) -> str:
    """Full module name, e.g. ``module_name(0, "q_proj") == "layers.0.self_attn.q_proj"``."""
    parent = "self_attn" if short in ATTN_MODULES else "mlp"
    return f"layers.{layer}.{parent}.{short}"


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``{dotted_path: shape}`` of every base parameter, in state-dict order.

    Paths are HF state-dict keys without ``model.``/``.weight``
    (``"embed_tokens"``, ``"layers.0.self_attn.q_proj"``, ..., ``"lm_head"``).
    """
    d = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (cfg.vocab_size, d)}
    for layer in range(cfg.num_layers):
        shapes[f"layers.{layer}.input_layernorm"] = (d,)
        for short, shape in module_shapes(cfg).items():
            shapes[module_name(layer, short)] = shape
        shapes[f"layers.{layer}.post_attention_layernorm"] = (d,)
    shapes["norm"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    return shapes


def unflatten_params(cfg: LlamaConfig, flat: dict) -> dict:
    """``{dotted_path: array}`` (see :func:`param_shapes`) → nested params."""
    params: dict = {"layers": [{"self_attn": {}, "mlp": {}} for _ in range(cfg.num_layers)]}
    for path, value in flat.items():
        parent, leaf = locate_param(params, path)
        parent[leaf] = value
    return params


def flatten_params(params: dict) -> dict:
    """Nested params → ``{dotted_path: array}`` (inverse of :func:`unflatten_params`)."""
    flat = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)] = leaf
    return flat


def locate_param(params: dict, path: str):
    """Returns ``(container, last_key)`` addressing ``path`` inside nested params."""
    *head, leaf = path.split(".")
    node = params
    for part in head:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, leaf


def init_params(cfg: LlamaConfig, key: jax.Array, *, std: float = 0.02) -> dict:
    """Random base parameters (normal ``std`` weights, unit RMSNorm gains).

    Args:
      cfg: model config; parameters are created in ``cfg.dtype``.
      key: PRNG key.
      std: weight standard deviation (HF ``initializer_range``).

    Returns:
      Nested params (see the module docstring).
    """
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    flat = {}
    for k, (path, shape) in zip(keys, shapes.items()):
        if len(shape) == 1:
            flat[path] = jnp.ones(shape, cfg.jnp_dtype)
        else:
            flat[path] = (std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.jnp_dtype)
    return unflatten_params(cfg, flat)


# --------------------------------------------------------------------------- blocks
def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics, like HF ``LlamaRMSNorm``. ``x [..., D]``."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """``[hd/2]`` float32 RoPE inverse frequencies (linear scaling applied)."""
    exponent = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** exponent)
    return (inv / np.float32(cfg.rope_scaling_factor)).astype(np.float32)


def _rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T]`` → ``cos, sin [B, T, 1, hd]`` in ``dtype`` (computed in float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B, T, heads, hd]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(x: jax.Array, w: jax.Array, adapter: Adapter | None, name: str) -> jax.Array:
    """``x Wᵀ`` plus the LoRA term when ``adapter`` covers ``name``.

    Args:
      x: ``[..., d_in]`` in the compute dtype.
      w: ``[d_out, d_in]``.
      adapter: optional adapter; used when ``name in adapter.A``.
      name: module name, e.g. ``"layers.0.self_attn.q_proj"``.

    Returns:
      ``[..., d_out]`` in the compute dtype.
    """
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if adapter is None or name not in adapter.A:
        return y
    a = adapter.A[name].astype(x.dtype)  # [r, d_in]
    b = adapter.B[name].astype(x.dtype)  # [d_out, r]
    gate = (adapter.mask * adapter.scale).astype(x.dtype)  # [r]
    h = jnp.einsum("...i,ri->...r", x, a) * gate  # [..., r]
    return y + jnp.einsum("...r,or->...o", h, b)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: ``[B, T, H, hd]``.
      k: ``[B, S, K, hd]``.
      v: ``[B, S, K, hd]``.
      mask: ``[B, T, S]`` bool, True where query ``t`` may attend key ``s``.

    Returns:
      ``[B, T, H*hd]``.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)  # [B, T, K, G, hd]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        preferred_element_type=jnp.float32) / math.sqrt(hd)  # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, K, G, hd]
    return out.reshape(b, t, h * hd)


def _block(cfg: LlamaConfig, lp: dict, layer: int, x: jax.Array, cos: jax.Array, sin: jax.Array,
           mask: jax.Array, adapter: Adapter | None, cache_kv=None, cache_index=0):
    """One decoder block on ``x [B, T, D]``; returns ``(x, new_cache_kv)``."""
    b, t, _ = x.shape
    hd, name = cfg.head_dim, lambda short: module_name(layer, short)
    attn_p, mlp_p = lp["self_attn"], lp["mlp"]

    h = _rms_norm(x, lp["input_layernorm"], cfg.rms_norm_eps)
    q = _linear(h, attn_p["q_proj"], adapter, name("q_proj")).reshape(b, t, cfg.num_heads, hd)
    k = _linear(h, attn_p["k_proj"], adapter, name("k_proj")).reshape(b, t, cfg.num_kv_heads, hd)
    v = _linear(h, attn_p["v_proj"], adapter, name("v_proj")).reshape(b, t, cfg.num_kv_heads, hd)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)  # [B, T, H|K, hd]
    if cache_kv is not None:  # write the new keys/values at slots cache_index.. and read all S
        ck, cv = cache_kv  # [B, S, K, hd]
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        cache_kv = (k, v)
    attn = _attention(q, k, v, mask)  # [B, T, H*hd]
    x = x + _linear(attn, attn_p["o_proj"], adapter, name("o_proj"))

    h = _rms_norm(x, lp["post_attention_layernorm"], cfg.rms_norm_eps)
    gate = _linear(h, mlp_p["gate_proj"], adapter, name("gate_proj"))  # [B, T, I]
    up = _linear(h, mlp_p["up_proj"], adapter, name("up_proj"))  # [B, T, I]
    x = x + _linear(jax.nn.silu(gate) * up, mlp_p["down_proj"], adapter, name("down_proj"))
    return x, cache_kv


def _decoder(cfg: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array,
             kv_valid: jax.Array, adapter: Adapter | None, cache: KVCache | None, cache_index):
    """Shared body of :func:`forward` and :func:`forward_cached`.

    Tokens occupy key slots ``cache_index .. cache_index+T-1`` of ``S`` slots
    (``S = T`` without a cache); a query attends to earlier-or-equal slots whose
    ``kv_valid`` is True.

    Returns:
      ``(logits [B, T, V] float32, new_cache)``.
    """
    dtype = cfg.jnp_dtype
    t, s = tokens.shape[1], kv_valid.shape[1]
    q_slot = cache_index + jnp.arange(t)  # [T]
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    mask = causal[None] & kv_valid[:, None, :].astype(bool)  # [B, T, S]

    x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype)  # [B, T, D]
    cos, sin = _rope_cos_sin(cfg, positions, dtype)
    new_cache = [] if cache is not None else None
    for layer, lp in enumerate(params["layers"]):
        x, kv = _block(cfg, lp, layer, x, cos, sin, mask, adapter,
                       None if cache is None else cache[layer], cache_index)
        if cache is not None:
            new_cache.append(kv)
    x = _rms_norm(x, params["norm"], cfg.rms_norm_eps)
    head = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]  # [V, D]
    logits = jnp.einsum("btd,vd->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32), new_cache


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B, T]`` 0/1 mask → ``[B, T]`` positions counting real tokens only (as HF generate)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(cfg: LlamaConfig, params: dict, tokens: jax.Array, *, adapter: Adapter | None = None,
            positions: jax.Array | None = None, attention_mask: jax.Array | None = None) -> jax.Array:
    """Causal LM forward pass.

    Pure; works under ``jax.jit`` (``cfg`` static), ``jax.grad`` w.r.t. the
    adapter, and ``jax.vmap`` over a leading client axis of the adapter only.

    Args:
      cfg: model config (static).
      params: base parameters (see the module docstring).
      tokens: ``[B, T]`` int token ids.
      adapter: optional LoRA adapter; modules it does not name are plain.
      positions: ``[B, T]`` RoPE positions. Default: ``0..T-1``, or, when
        ``attention_mask`` is given, the running count of real tokens (so a
        left-padded row starts at position 0).
      attention_mask: ``[B, T]`` 0/1, 0 marks padding keys to ignore.

    Returns:
      ``[B, T, V]`` float32 logits.
    """
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    if attention_mask is None:
        kv_valid = jnp.ones((b, t), bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    else:
        kv_valid = jnp.asarray(attention_mask).astype(bool)
        if positions is None:
            positions = positions_from_mask(kv_valid)
    logits, _ = _decoder(cfg, params, tokens, jnp.asarray(positions), kv_valid, adapter, None, 0)
    return logits


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> KVCache:
    """Zero KV cache: a list of ``num_layers`` pairs ``(k, v)``, each ``[B, S, K, hd]``."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))
            for _ in range(cfg.num_layers)]


def forward_cached(cfg: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array,
                   kv_valid: jax.Array, cache: KVCache, cache_index, *,
                   adapter: Adapter | None = None) -> tuple[jax.Array, KVCache]:
    """Forward pass that writes keys/values into a KV cache (for decoding).

    Args:
      cfg: model config (static).
      params: base parameters.
      tokens: ``[B, T]`` new tokens, stored at slots ``cache_index .. cache_index+T-1``.
      positions: ``[B, T]`` their RoPE positions.
      kv_valid: ``[B, S]`` bool, True for slots holding real tokens (including
        the new ones).
      cache: from :func:`init_cache` (``S`` slots).
      cache_index: scalar int slot of ``tokens[:, 0]`` (may be traced).
      adapter: optional LoRA adapter.

    Returns:
      ``(logits [B, T, V] float32, updated cache)``.
    """
    return _decoder(cfg, params, tokens, positions, kv_valid, adapter, cache, cache_index)


# --------------------------------------------------------------------------- losses
def token_losses(cfg: LlamaConfig, params: dict, adapter: Adapter | None, tokens: jax.Array,
                 loss_mask: jax.Array, *, attention_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of target tokens.

    Position ``t``'s logits predict ``tokens[:, t+1]``, weighted by
    ``loss_mask[:, t+1]`` (the mask marks *target* tokens).

    Args:
      cfg: model config (static).
      params: base parameters.
      adapter: LoRA adapter or ``None``.
      tokens: ``[B, T]`` token ids.
      loss_mask: ``[B, T]`` 0/1 (or float weights) over target tokens.
      attention_mask: optional ``[B, T]`` padding mask (needed for left padding only).

    Returns:
      ``(sum_loss [], n_tokens [])``, both float32.
    """
    tokens = jnp.asarray(tokens)
    am = None if attention_mask is None else jnp.asarray(attention_mask)[:, :-1]
    logits = forward(cfg, params, tokens[:, :-1], adapter=adapter, attention_mask=am)  # [B, T-1, V]
    targets = tokens[:, 1:]  # [B, T-1]
    weights = jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32)  # [B, T-1]
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T-1]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - target_logit) * weights), jnp.sum(weights)


def loss_fn(cfg: LlamaConfig, params: dict, adapter: Adapter | None, tokens: jax.Array,
            loss_mask: jax.Array, *, attention_mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over target tokens (0 when there are none).

    Args: as :func:`token_losses`.

    Returns:
      ``[]`` float32 mean loss.
    """
    total, n = token_losses(cfg, params, adapter, tokens, loss_mask, attention_mask=attention_mask)
    return total / jnp.maximum(n, 1.0)
