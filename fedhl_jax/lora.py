"""LoRA conventions shared by the server math, the model and the engine.

Every client holds factors of the *maximum* rank ``r_max`` plus a 0/1 mask over
rank columns, so all clients have the same shapes and can be ``jax.vmap``-ed
together without recompiling when their ranks change.

Conventions (one LoRA module, Hugging Face ``[out, in]`` weight layout):

* ``B``: ``[d_out, r_max]``, ``A``: ``[r_max, d_in]``.
* ``mask``: ``[r_max]`` 0/1, a prefix of ones of length ``rank``.
* ``scale``: scalar ``s = alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
* The adapter's dense update is ``ΔW = s · B · diag(mask) · A``; a layer computes
  ``y = x Wᵀ + s · ((x Aᵀ) ⊙ mask) Bᵀ``. Because the mask multiplies the rank
  axis in the middle, a masked column contributes nothing and receives a zero
  gradient in both ``A`` and ``B``.

Module names follow Hugging Face without the ``model.`` prefix, for example
``"layers.0.self_attn.q_proj"`` or ``"layers.3.mlp.down_proj"``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Adapter(NamedTuple):
    """One client's rank-masked LoRA adapter (a pytree).

    With a leading client axis on every leaf it describes ``n`` clients at once.

    Attributes:
      B: ``{module_name: [d_out, r_max]}``.
      A: ``{module_name: [r_max, d_in]}``.
      mask: ``[r_max]`` 0/1 rank mask (same rank for every module of a client).
      scale: ``[]`` LoRA scale ``s``.
    """

    B: dict
    A: dict
    mask: jax.Array
    scale: jax.Array


def check_ranks(ranks, r_max: int | None = None, *, dims: tuple[int, int] | None = None) -> np.ndarray:
    """Validates integer ranks on the host and returns them as an int array.

    Args:
      ranks: ``[n]`` positive integers.
      r_max: optional upper bound (the padded rank).
      dims: optional ``(d_out, d_in)`` of the smallest module; ranks may not exceed
        ``min(d_out, d_in)``.

    Returns:
      ``np.ndarray`` of shape ``[n]`` and dtype int32.

    Raises:
      ValueError: naming the offending value.
    """
    arr = np.asarray(ranks)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"ranks must be integers, got {arr.tolist()}")
        arr = arr.astype(np.int64)
    bad = arr[arr <= 0]
    if bad.size:
        raise ValueError(f"every rank must be >= 1, got rank {int(bad[0])} in {arr.tolist()}")
    if r_max is not None:
        if r_max <= 0:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        over = arr[arr > r_max]
        if over.size:
            raise ValueError(f"rank {int(over[0])} exceeds r_max={r_max}")
    if dims is not None:
        limit = min(dims)
        over = arr[arr > limit]
        if over.size:
            raise ValueError(
                f"rank {int(over[0])} exceeds min(d_out, d_in) = min{tuple(dims)} = {limit}")
    return arr.astype(np.int32)


def rank_mask(ranks, r_max: int, dtype=jnp.float32) -> jax.Array:
    """Integer ranks → 0/1 prefix masks over rank columns.

    Args:
      ranks: ``[n]`` integer ranks, ``1 <= rank <= r_max`` (checked when concrete).
      r_max: the padded rank (static).
      dtype: mask dtype.

    Returns:
      ``[n, r_max]`` with ``mask[i, j] = 1`` iff ``j < ranks[i]``.
    """
    if not isinstance(ranks, jax.core.Tracer):
        check_ranks(np.asarray(ranks).reshape(-1), r_max)
    ranks = jnp.asarray(ranks)
    return (jnp.arange(r_max)[None, :] < ranks.reshape(-1, 1)).astype(dtype)


def lora_scale(ranks, alpha: float, *, rslora: bool = False, dtype=jnp.float32) -> jax.Array:
    """LoRA scale per client: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).

    Args:
      ranks: ``[n]`` ranks (or anything broadcastable).
      alpha: LoRA alpha.
      rslora: use rank-stabilised scaling (Kalajdzievski, 2023).

    Returns:
      ``[n]`` scales.
    """
    r = jnp.asarray(ranks, dtype)
    return alpha / (jnp.sqrt(r) if rslora else r)


def ranks_from_mask(mask: jax.Array) -> jax.Array:
    """``[n, r_max]`` mask → ``[n]`` integer ranks."""
    return jnp.sum(mask > 0, axis=-1).astype(jnp.int32)
