"""A pure-JAX Llama-style decoder (Llama-2/3, Qwen2/2.5, Qwen3) with rank-masked LoRA on its linear layers.

Parameters are a plain pytree in Hugging Face layout (weights ``[out, in]``),
named like the HF state dict without the ``model.`` prefix and ``.weight``
suffix. The decoder blocks are stacked along a leading layer axis ``L`` and
the forward pass runs them under ``jax.lax.scan``, so compile time does not
grow with depth::

    {
      "embed_tokens": [V, D],
      "layers": {                       # every leaf has a leading layer axis L
        "input_layernorm": [L, D],
        "self_attn": {"q_proj": [L, H*hd, D], "k_proj": [L, K*hd, D],
                      "v_proj": [L, K*hd, D], "o_proj": [L, D, H*hd]},
        "post_attention_layernorm": [L, D],
        "mlp": {"gate_proj": [L, I, D], "up_proj": [L, I, D], "down_proj": [L, D, I]},
      },
      "norm": [D],
      "lm_head": [V, D],                # absent when tie_word_embeddings
    }

Families with block details (:mod:`fedhl_jax.model.families`, switched by the static config, so
the Llama layout pays nothing for them) have more leaves in ``self_attn``:

* ``qkv_bias`` (Qwen2): ``q_proj_bias [L, H*hd]``, ``k_proj_bias`` and ``v_proj_bias [L, K*hd]``
  (HF ``q_proj.bias``, ...), added after the projection; they are frozen base weights, LoRA adapts the
  linear part only.
* ``qk_norm`` (Qwen3): ``q_norm`` and ``k_norm [L, hd]``, RMSNorm gains applied per head to q and k
  before RoPE.

The *flat* form ``{dotted_path: array}`` with one entry per layer
(``"layers.3.self_attn.q_proj": [H*hd, D]``, see :func:`param_shapes`) is the
external format of loaders and exporters: :func:`unflatten_params` stacks it,
:func:`flatten_params` unstacks it.

The numerics follow ``transformers``' ``LlamaForCausalLM`` (and ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``): RMSNorm statistics in float32, rotate-half RoPE with default, linear or
``llama3`` frequencies (so HF ``q_proj``/``k_proj`` weights are used as they are), grouped-query attention with a float32 softmax, SwiGLU MLP. Logits
are returned in float32. Weights are stored in ``cfg.dtype`` and activations
computed in ``cfg.compute_dtype``.

A LoRA adapter (:class:`fedhl_jax.lora.Adapter`) is applied inside every linear
layer it names: ``y = x Wᵀ + s · ((x Aᵀ) ⊙ mask) Bᵀ``. Adapters stay keyed per
layer (``"layers.3.self_attn.q_proj"``); the forward pass stacks their factors
along the layer axis to feed the scan (layers an adapter does not cover get
zero factors).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax.lora import Adapter
from fedhl_jax.model.architecture import LlamaConfig

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES
QKV_BIASES = ("q_proj_bias", "k_proj_bias", "v_proj_bias")  # self_attn leaves of qkv_bias families
QK_NORMS = ("q_norm", "k_norm")  # self_attn leaves of qk_norm families

# A KV cache: ``(k, v)``, each ``[L, B, S, K, hd]`` (all layers stacked).
KVCache = tuple

# Rematerialisation policies of one scanned block (``LlamaConfig.remat``).
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: the backward pass keeps every residual
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}

_LAYER_PATH = re.compile(r"layers\.(\d+)\.(.+)")


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


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{path_inside_a_block: shape}`` of one decoder block, in :func:`param_shapes` order.

    E.g. ``{"input_layernorm": (D,), "self_attn.q_proj": (H*hd, D), ...}``; the
    stacked leaf ``params["layers"]["self_attn"]["q_proj"]`` is ``[L, H*hd, D]``.
    A ``qkv_bias`` family adds ``self_attn.{q,k,v}_proj_bias`` (``[H*hd]``, ``[K*hd]``), a
    ``qk_norm`` family ``self_attn.{q,k}_norm`` (``[hd]``).
    """
    d = cfg.hidden_size
    family = cfg.model_family
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm": (d,)}
    for short, shape in module_shapes(cfg).items():
        shapes[module_name(0, short).split(".", 2)[2]] = shape
        if family.qkv_bias and f"{short}_bias" in QKV_BIASES:
            shapes[f"self_attn.{short}_bias"] = (shape[0],)
    if family.qk_norm:
        shapes.update({f"self_attn.{n}": (cfg.head_dim,) for n in QK_NORMS})
    shapes["post_attention_layernorm"] = (d,)
    return shapes


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``{dotted_path: shape}`` of every base parameter, in state-dict order.

    Paths are HF state-dict keys without ``model.``/``.weight``
    (``"embed_tokens"``, ``"layers.0.self_attn.q_proj"``, ..., ``"lm_head"``),
    one entry per layer: this is the external (loader/exporter) format.
    """
    d = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (cfg.vocab_size, d)}
    block = layer_shapes(cfg)
    for layer in range(cfg.num_layers):
        for sub, shape in block.items():
            shapes[f"layers.{layer}.{sub}"] = shape
    shapes["norm"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    return shapes


def split_layer_path(path: str) -> tuple[int | None, str]:
    """``"layers.3.self_attn.q_proj"`` → ``(3, "self_attn.q_proj")``; ``"norm"`` → ``(None, "norm")``."""
    m = _LAYER_PATH.fullmatch(path)
    return (int(m.group(1)), m.group(2)) if m else (None, path)


def _set_nested(tree: dict, dotted: str, value) -> None:
    *head, leaf = dotted.split(".")
    for part in head:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _get_nested(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _stack(values: list):
    """Stacks per-layer arrays: on the host when they are all NumPy (one device transfer)."""
    if all(isinstance(v, np.ndarray) for v in values):
        return jnp.asarray(np.stack(values))
    return jnp.stack(values)


def unflatten_params(cfg: LlamaConfig, flat: dict) -> dict:
    """``{dotted_path: array}`` (see :func:`param_shapes`) → nested params, blocks stacked.

    Every per-layer entry ``layers.{i}.<sub>`` must be present for all
    ``i < cfg.num_layers``; they are stacked into ``params["layers"][<sub>]``
    of shape ``[L, ...]``. NumPy inputs are stacked on the host and moved to
    the device once.

    Raises:
      KeyError: a layer index out of range or a per-layer entry missing for
        some layers (naming the paths).
    """
    params: dict = {}
    per_layer: dict[str, dict[int, object]] = {}
    for path, value in flat.items():
        layer, sub = split_layer_path(path)
        if layer is None:
            params[path] = jnp.asarray(value) if isinstance(value, np.ndarray) else value
            continue
        if layer >= cfg.num_layers:
            raise KeyError(f"{path!r}: layer {layer} is out of range for {cfg.num_layers} layers")
        per_layer.setdefault(sub, {})[layer] = value
    layers: dict = {}
    for sub, by_layer in per_layer.items():
        missing = [f"layers.{i}.{sub}" for i in range(cfg.num_layers) if i not in by_layer]
        if missing:
            raise KeyError(f"missing per-layer parameter(s) {missing[:4]}"
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
        _set_nested(layers, sub, _stack([by_layer[i] for i in range(cfg.num_layers)]))
    params["layers"] = layers
    return params


def _block_items(layers: dict) -> list[tuple[str, jax.Array]]:
    """``[(path_inside_a_block, stacked leaf)]`` of ``params["layers"]`` in state-dict order."""
    items = {".".join(str(k.key) for k in kp): leaf
             for kp, leaf in jax.tree_util.tree_leaves_with_path(layers)}
    order = ["input_layernorm", *(f"self_attn.{m}" for m in ATTN_MODULES + QKV_BIASES + QK_NORMS),
             *(f"mlp.{m}" for m in MLP_MODULES), "post_attention_layernorm"]
    return [(p, items[p]) for p in order if p in items] + [(p, v) for p, v in items.items()
                                                            if p not in order]


def flatten_params(params: dict) -> dict:
    """Nested params → ``{dotted_path: array}``, one entry per layer (inverse of :func:`unflatten_params`)."""
    flat = {}
    for key, value in params.items():
        if key != "layers":
            flat[key] = value
            continue
        items = _block_items(value)
        n_layers = items[0][1].shape[0] if items else 0
        for layer in range(n_layers):
            for sub, leaf in items:
                flat[f"layers.{layer}.{sub}"] = leaf[layer]
    return {k: flat[k] for k in sorted(flat, key=lambda k: ({"embed_tokens": 0, "norm": 2,
                                                             "lm_head": 3}.get(k, 1)))}


class _LayerSlot:
    """One layer of a stacked leaf, addressed like a container (see :func:`locate_param`)."""

    def __init__(self, parent: dict, key: str, layer: int):
        self.parent, self.key, self.layer = parent, key, layer

    def __getitem__(self, leaf):
        return self.parent[leaf][self.layer]

    def __setitem__(self, leaf, value):
        w = self.parent[leaf]
        self.parent[leaf] = w.at[self.layer].set(jnp.asarray(value, w.dtype))


def locate_param(params: dict, path: str):
    """Returns ``(container, last_key)`` addressing a flat ``path`` inside nested params.

    ``container[last_key]`` reads the parameter; ``container[last_key] = value``
    replaces it in ``params`` (for a layer path, one slice of the stacked leaf).

    Raises:
      KeyError / IndexError: an unknown path or a layer out of range.
    """
    layer, sub = split_layer_path(path)
    if layer is None:
        *head, leaf = path.split(".")
        return (_get_nested(params, ".".join(head)) if head else params), leaf
    *head, leaf = sub.split(".")
    parent = _get_nested(params["layers"], ".".join(head)) if head else params["layers"]
    n_layers = parent[leaf].shape[0]
    if not 0 <= layer < n_layers:
        raise IndexError(f"{path!r}: layer {layer} is out of range for {n_layers} layers")
    return _LayerSlot(parent, leaf, layer), leaf


def init_params(cfg: LlamaConfig, key: jax.Array, *, std: float = 0.02) -> dict:
    """Random base parameters (normal ``std`` weights, unit RMSNorm gains, zero biases).

    Every flat path draws from its own key (``jax.random.split(key,
    len(param_shapes(cfg)))`` in state-dict order); the per-layer draws are
    made directly in the stacked layout.

    Args:
      cfg: model config; parameters are created in ``cfg.dtype``.
      key: PRNG key.
      std: weight standard deviation (HF ``initializer_range``).

    Returns:
      Nested params (see the module docstring).
    """
    shapes = param_shapes(cfg)
    all_keys = jax.random.split(key, len(shapes))
    index = {p: i for i, p in enumerate(shapes)}
    dtype = cfg.jnp_dtype

    def draw(k, shape, bias=False):
        if len(shape) == 1:
            return (jnp.zeros if bias else jnp.ones)(shape, dtype)
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    params: dict = {p: draw(all_keys[index[p]], s) for p, s in shapes.items()
                    if not p.startswith("layers.")}
    layers: dict = {}
    for sub, shape in layer_shapes(cfg).items():
        layer_keys = all_keys[np.array([index[f"layers.{i}.{sub}"] for i in range(cfg.num_layers)])]
        bias = sub.endswith("_bias")
        _set_nested(layers, sub, jax.vmap(lambda k, s=shape, b=bias: draw(k, s, b))(layer_keys))
    params["layers"] = layers
    return {k: params[k] for k in ("embed_tokens", "layers", "norm", "lm_head") if k in params}


# --------------------------------------------------------------------------- blocks
def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics, like HF ``LlamaRMSNorm``. ``x [..., D]``."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """``[hd/2]`` float32 RoPE inverse frequencies, scaled per ``cfg.rope_type``.

    ``default``: ``θ^(-2i/hd)``. ``linear``: divided by the factor. ``llama3`` (Llama-3.1, as
    transformers' ``_compute_llama3_parameters``, in float32 like it): with wavelengths ``λ = 2π/f``,
    ``λ_lo = original / low_freq_factor`` and ``λ_hi = original / high_freq_factor``, frequencies with
    ``λ < λ_hi`` are kept, those with ``λ > λ_lo`` divided by the factor, and those between
    interpolated: ``((1 - s) / factor + s) · f`` with ``s = (original / λ - low) / (high - low)``.
    """
    exponent = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    if cfg.rope_type != "llama3":
        return (inv / np.float32(cfg.rope_scaling_factor)).astype(np.float32)
    f32 = np.float32
    factor, low, high = f32(cfg.rope_scaling_factor), f32(cfg.rope_low_freq_factor), f32(cfg.rope_high_freq_factor)
    original = f32(cfg.rope_original_max_position_embeddings)
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


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


def _linear(x: jax.Array, w: jax.Array, lora, gate) -> jax.Array:
    """``x Wᵀ`` plus the LoRA term when ``lora`` is given.

    Args:
      x: ``[..., d_in]`` in the compute dtype.
      w: ``[d_out, d_in]`` (one layer's slice).
      lora: ``(A [r, d_in], B [d_out, r])`` of this layer, or ``None``.
      gate: ``[r]`` ``mask · scale`` of the adapter.

    Returns:
      ``[..., d_out]`` in the compute dtype.
    """
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if lora is None:
        return y
    a, b = lora[0].astype(x.dtype), lora[1].astype(x.dtype)  # [r, d_in], [d_out, r]
    h = jnp.einsum("...i,ri->...r", x, a) * gate.astype(x.dtype)  # [..., r]
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


def _block(cfg: LlamaConfig, lp: dict, x: jax.Array, cos: jax.Array, sin: jax.Array,
           mask: jax.Array, lora: dict, gate, kv_fn=None):
    """One decoder block on ``x [B, T, D]``.

    Args:
      lp: this layer's slice of ``params["layers"]``.
      lora: ``{short_name: (A, B)}`` of this layer (modules without LoRA absent).
      gate: ``[r]`` adapter gate (unused when ``lora`` is empty).
      kv_fn: optional ``(k, v) -> (k_all, v_all)`` that writes the new keys and
        values into a cache and returns the keys/values to attend to.
    """
    b, t, _ = x.shape
    hd = cfg.head_dim
    attn_p, mlp_p = lp["self_attn"], lp["mlp"]
    lin = lambda h, w, short: _linear(h, w, lora.get(short), gate)  # noqa: E731

    family = cfg.model_family
    if family.qkv_bias:  # frozen biases after the (LoRA-adapted) linear part
        lin_qkv = lambda h, short: lin(h, attn_p[short], short) + attn_p[f"{short}_bias"].astype(h.dtype)  # noqa: E731
    else:
        lin_qkv = lambda h, short: lin(h, attn_p[short], short)  # noqa: E731

    h = _rms_norm(x, lp["input_layernorm"], cfg.rms_norm_eps)
    q = lin_qkv(h, "q_proj").reshape(b, t, cfg.num_heads, hd)
    k = lin_qkv(h, "k_proj").reshape(b, t, cfg.num_kv_heads, hd)
    v = lin_qkv(h, "v_proj").reshape(b, t, cfg.num_kv_heads, hd)
    if family.qk_norm:  # per-head RMSNorm over hd, before RoPE
        q = _rms_norm(q, attn_p["q_norm"], cfg.rms_norm_eps)
        k = _rms_norm(k, attn_p["k_norm"], cfg.rms_norm_eps)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)  # [B, T, H|K, hd]
    if kv_fn is not None:
        k, v = kv_fn(k, v)
    attn = _attention(q, k, v, mask)  # [B, T, H*hd]
    x = x + lin(attn, attn_p["o_proj"], "o_proj")

    h = _rms_norm(x, lp["post_attention_layernorm"], cfg.rms_norm_eps)
    gate_act = lin(h, mlp_p["gate_proj"], "gate_proj")  # [B, T, I]
    up = lin(h, mlp_p["up_proj"], "up_proj")  # [B, T, I]
    return x + lin(jax.nn.silu(gate_act) * up, mlp_p["down_proj"], "down_proj")


def scan_lora(cfg: LlamaConfig, adapter: Adapter | None) -> tuple[dict, jax.Array | None]:
    """An adapter's factors stacked along the layer axis, to feed the scanned blocks.

    Args:
      cfg: model config.
      adapter: adapter keyed by module name (``"layers.3.self_attn.q_proj"``),
        or already in the stacked form of :func:`fedhl_jax.model.stacked_adapter`
        (keyed by short name, ``"q_proj": [L, r, d_in]``), or ``None``.

    Returns:
      ``({short_name: (A [L, r, d_in], B [L, d_out, r])}, gate [r])`` for every
      module type the adapter covers in at least one layer; layers it does not
      cover get zero factors (so they add exactly nothing). ``({}, None)``
      without an adapter.
    """
    if adapter is None:
        return {}, None
    stacked = {}
    for short in LORA_MODULES:
        if short in adapter.A:  # already stacked
            stacked[short] = (adapter.A[short], adapter.B[short])
            continue
        names = [module_name(layer, short) for layer in range(cfg.num_layers)]
        present = [n for n in names if n in adapter.A]
        if not present:
            continue
        a0, b0 = adapter.A[present[0]], adapter.B[present[0]]
        stacked[short] = (jnp.stack([adapter.A[n] if n in adapter.A else jnp.zeros_like(a0)
                                     for n in names]),
                          jnp.stack([adapter.B[n] if n in adapter.B else jnp.zeros_like(b0)
                                     for n in names]))
    return stacked, adapter.mask * adapter.scale


def _decoder(cfg: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array,
             kv_valid: jax.Array, adapter: Adapter | None, cache: KVCache | None, cache_index,
             last_only: bool = False):
    """Shared body of :func:`forward` and :func:`forward_cached`.

    Tokens occupy key slots ``cache_index .. cache_index+T-1`` of ``S`` slots
    (``S = T`` without a cache); a query attends to earlier-or-equal slots whose
    ``kv_valid`` is True. The blocks run under ``jax.lax.scan`` over the layer
    axis (unrolled for models of at most ``cfg.unroll_layers`` layers when no remat
    policy is asked for); without a
    cache, the scan body is rematerialised per ``cfg.remat``.

    With ``last_only`` the LM head runs on the last position only (a prefill needs nothing else).

    Returns:
      ``(logits [B, T, V] float32, new_cache)``; ``T = 1`` with ``last_only``.
    """
    dtype = cfg.jnp_compute_dtype
    t, s = tokens.shape[1], kv_valid.shape[1]
    q_slot = cache_index + jnp.arange(t)  # [T]
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    mask = causal[None] & kv_valid[:, None, :].astype(bool)  # [B, T, S]

    x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype)  # [B, T, D]
    cos, sin = _rope_cos_sin(cfg, positions, dtype)
    lora, gate = scan_lora(cfg, adapter)
    layers = params["layers"]
    # Shallow models without remat: no loop overhead. (Unrolled, XLA would common-subexpression away
    # the recomputation a remat policy asks for, so remat keeps the scan.)
    unroll = cfg.num_layers if cfg.num_layers <= cfg.unroll_layers and (cfg.remat == "none" or cache is not None) else 1

    if cache is None:
        def body(x, xs):
            lp, lora_l = xs
            return _block(cfg, lp, x, cos, sin, mask, lora_l, gate), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (layers, lora), unroll=unroll)
        new_cache = None
    else:
        def body(carry, xs):
            x, ck, cv = carry  # [L, B, S, K, hd]
            lp, lora_l, layer = xs

            def kv_fn(k, v):  # write slots cache_index.. of this layer, read all S
                nonlocal ck, cv
                ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None],
                                                  (layer, 0, cache_index, 0, 0))
                cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None],
                                                  (layer, 0, cache_index, 0, 0))
                return ck[layer], cv[layer]

            x = _block(cfg, lp, x, cos, sin, mask, lora_l, gate, kv_fn)
            return (x, ck, cv), None

        (x, ck, cv), _ = jax.lax.scan(body, (x, *cache),
                                      (layers, lora, jnp.arange(cfg.num_layers)), unroll=unroll)
        new_cache = (ck, cv)
    if last_only:
        x = x[:, -1:]  # [B, 1, D]
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
    """Zero KV cache ``(k, v)``, each ``[L, B, S, K, hd]`` in the compute dtype."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return (jnp.zeros(shape, cfg.jnp_compute_dtype), jnp.zeros(shape, cfg.jnp_compute_dtype))


def forward_cached(cfg: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array,
                   kv_valid: jax.Array, cache: KVCache, cache_index, *,
                   adapter: Adapter | None = None, last_only: bool = False) -> tuple[jax.Array, KVCache]:
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
      last_only: logits of the last position only (``T = 1``): a prefill needs no more, and
        skips a ``[B, T, V]`` buffer and the LM head's FLOPs on the other positions.

    Returns:
      ``(logits [B, T, V] float32, updated cache)``.
    """
    return _decoder(cfg, params, tokens, positions, kv_valid, adapter, cache, cache_index, last_only)


# --------------------------------------------------------------------------- losses
def token_losses(cfg: LlamaConfig, params: dict, adapter: Adapter | None, tokens: jax.Array,
                 loss_mask: jax.Array, *, attention_mask: jax.Array | None = None, per_example: bool = False
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
      per_example: sum over each row only.

    Returns:
      ``(sum_loss [], n_tokens [])``, both float32 (``[B]`` each with ``per_example``).
    """
    tokens = jnp.asarray(tokens)
    am = None if attention_mask is None else jnp.asarray(attention_mask)[:, :-1]
    logits = forward(cfg, params, tokens[:, :-1], adapter=adapter, attention_mask=am)  # [B, T-1, V]
    targets = tokens[:, 1:]  # [B, T-1]
    weights = jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32)  # [B, T-1]
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T-1]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if per_example:
        return jnp.sum((logz - target_logit) * weights, axis=-1), jnp.sum(weights, axis=-1)  # [B], [B]
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
