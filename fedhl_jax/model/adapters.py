"""LoRA targets, adapter initialisation and dense deltas for the Llama model."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax.lora import Adapter, lora_scale, rank_mask
from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.llama import (LORA_MODULES, locate_param, module_name, module_shapes,
                                   split_layer_path)


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Normalises LoRA targets to short module names in canonical order.

    Args:
      targets: ``"all-linear"``, one short name, or a sequence of short names
        from ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.

    Returns:
      The de-duplicated short names, in the order above.

    Raises:
      ValueError: naming an unknown target.
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if "all-linear" in targets:  # also as a list entry, as configs write it
        targets = LORA_MODULES
    if not targets:
        raise ValueError("no LoRA targets given")
    for t in targets:
        if t not in LORA_MODULES:
            raise ValueError(f"unknown LoRA target {t!r}: valid targets are "
                             f"{list(LORA_MODULES)} or 'all-linear'")
    return tuple(m for m in LORA_MODULES if m in targets)


def lora_targets(cfg: LlamaConfig, targets: str | Sequence[str] = ("q_proj", "v_proj")
                 ) -> dict[str, tuple[int, int]]:
    """Module names and ``(d_out, d_in)`` shapes that a LoRA on ``targets`` covers.

    Args:
      cfg: model config.
      targets: see :func:`resolve_targets`.

    Returns:
      ``{"layers.{i}.self_attn.q_proj": (d_out, d_in), ...}`` ordered by layer,
      then module.
    """
    shapes = module_shapes(cfg)
    shorts = resolve_targets(targets)
    return {module_name(layer, s): shapes[s] for layer in range(cfg.num_layers) for s in shorts}


def init_adapter(cfg: LlamaConfig, targets: str | Sequence[str], r_max: int, key: jax.Array, *,
                 rank=None, alpha: float = 16.0, rslora: bool = False,
                 dtype=jnp.float32) -> Adapter:
    """A fresh adapter: PEFT's init (``A ~ U(±1/sqrt(d_in))``, ``B = 0``).

    ``rank`` may be a traced scalar, so ``jax.vmap(lambda k, r: init_adapter(...,
    key=k, rank=r))(keys, ranks)`` builds a stacked adapter for many clients.

    Args:
      cfg: model config.
      targets: LoRA targets (see :func:`resolve_targets`).
      r_max: padded rank (static).
      key: PRNG key.
      rank: active rank ``<= r_max`` (default ``r_max``).
      alpha: LoRA alpha; ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
      rslora: rank-stabilised scaling.
      dtype: dtype of the factors, mask and scale.

    Returns:
      :class:`Adapter` with ``B [d_out, r_max]``, ``A [r_max, d_in]``,
      ``mask [r_max]``, ``scale []``.
    """
    shapes = lora_targets(cfg, targets)
    rank = r_max if rank is None else rank
    keys = jax.random.split(key, len(shapes))
    a, b = {}, {}
    for k, (name, (d_out, d_in)) in zip(keys, shapes.items()):
        bound = 1.0 / d_in ** 0.5
        a[name] = jax.random.uniform(k, (r_max, d_in), dtype, -bound, bound)
        b[name] = jnp.zeros((d_out, r_max), dtype)
    mask = rank_mask(jnp.reshape(jnp.asarray(rank), (1,)), r_max, dtype)[0]
    scale = lora_scale(rank, alpha, rslora=rslora, dtype=dtype)
    return Adapter(B=b, A=a, mask=mask, scale=jnp.asarray(scale, dtype).reshape(()))


def adapter_delta(adapter: Adapter) -> dict[str, jax.Array]:
    """Dense update of every module: ``{name: scale · B · diag(mask) · A}``.

    Args:
      adapter: a single adapter (``vmap`` it for a client axis).

    Returns:
      ``{name: [d_out, d_in]}`` float32.
    """
    gate = (adapter.mask * adapter.scale).astype(jnp.float32)  # [r]
    return {name: (adapter.B[name].astype(jnp.float32) * gate) @ adapter.A[name].astype(jnp.float32)
            for name in adapter.A}


def stacked_adapter(cfg: LlamaConfig, adapter: Adapter) -> Adapter:
    """Per-layer adapter → the same factors stacked along the layer axis.

    ``{"layers.{i}.self_attn.q_proj": [r, d_in]}`` becomes ``{"q_proj": [L, r,
    d_in]}`` (``B`` likewise ``[L, d_out, r]``; a leading client axis is kept
    in front: ``[n, L, r, d_in]``). :func:`fedhl_jax.model.forward` accepts
    either form and gives the same values. An optimizer over the stacked form
    has a few leaves whatever the depth, so a client's training step compiles
    in a time independent of the number of layers; the server math stays per
    module (:func:`per_layer_adapter` converts back).

    Raises:
      ValueError: a module type covered in some layers only (it cannot be stacked).
    """
    a, b = {}, {}
    for short in LORA_MODULES:
        names = [module_name(layer, short) for layer in range(cfg.num_layers)]
        present = [n in adapter.A for n in names]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"{short} is adapted in some layers only; the stacked form needs "
                             f"every layer (missing {names[present.index(False)]!r})")
        a[short] = jnp.stack([adapter.A[n] for n in names], axis=-3)
        b[short] = jnp.stack([adapter.B[n] for n in names], axis=-3)
    return adapter._replace(A=a, B=b)


def per_layer_adapter(cfg: LlamaConfig, adapter: Adapter) -> Adapter:
    """Inverse of :func:`stacked_adapter`: ``{"q_proj": [..., L, r, d_in]}`` → per-layer names."""
    a, b = {}, {}
    for short in LORA_MODULES:
        if short not in adapter.A:
            continue
        for layer in range(cfg.num_layers):
            a[module_name(layer, short)] = adapter.A[short][..., layer, :, :]
            b[module_name(layer, short)] = adapter.B[short][..., layer, :, :]
    order = list(lora_targets(cfg, "all-linear"))
    return adapter._replace(A={n: a[n] for n in order if n in a}, B={n: b[n] for n in order if n in b})


def merge_delta(params: dict, delta: dict[str, jax.Array]) -> dict:
    """Returns new params with ``W + delta[name]`` for every named module.

    ``delta`` is keyed by flat per-layer names (``"layers.3.self_attn.q_proj"``);
    the deltas of one stacked leaf are applied together (one update of the
    ``[L, d_out, d_in]`` array, not one per layer). The sum is formed in
    float32 and cast back to each weight's dtype; the input ``params`` is not
    modified. Works under ``jax.jit``.

    Args:
      params: base parameters (stacked layout).
      delta: ``{module_name: [d_out, d_in]}``.

    Returns:
      Merged parameters with the same structure and dtypes.

    Raises:
      KeyError / ValueError: naming an unknown module or a shape mismatch.
    """
    merged = jax.tree.map(lambda x: x, params)  # fresh containers, shared leaves
    groups: dict[tuple[int, str], tuple[dict, str, dict[int, jax.Array]]] = {}
    for name, d in delta.items():
        layer, _ = split_layer_path(name)
        try:
            parent, leaf = locate_param(merged, name)
            w = parent[leaf]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(f"delta names unknown module {name!r}") from None
        if tuple(w.shape) != tuple(d.shape):
            raise ValueError(f"delta for {name!r} has shape {tuple(d.shape)}, "
                             f"weight has {tuple(w.shape)}")
        if layer is None:
            parent[leaf] = (w.astype(jnp.float32) + jnp.asarray(d, jnp.float32)).astype(w.dtype)
            continue
        container = parent.parent  # the dict holding the stacked leaf
        groups.setdefault((id(container), leaf), (container, leaf, {}))[2][layer] = d
    for container, leaf, by_layer in groups.values():
        w = container[leaf]  # [L, d_out, d_in]
        idx = sorted(by_layer)
        d = jnp.stack([jnp.asarray(by_layer[i], jnp.float32) for i in idx])
        if idx == list(range(w.shape[0])):
            container[leaf] = (w.astype(jnp.float32) + d).astype(w.dtype)
        else:
            rows = np.asarray(idx)
            container[leaf] = w.at[rows].set((w[rows].astype(jnp.float32) + d).astype(w.dtype))
    return merged
