"""raFLoRA: rank-partitioned aggregation with SVD-based allocation.

Wu, Hu, Min and Wang, *Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
Heterogeneity* (arXiv 2602.13486, Section 5; Algorithm 1 and Eq. 8 as a public reimplementation cites
them, the section's text not having been consulted). The server holds a dense adapter
``G`` and hands a client of rank ``r_k`` its rank-``r_k`` SVD truncation (FlexLoRA's allocation, this
package's dense-``G`` family). Rank-agnostic aggregation ``G ← Σ_k p_k s_k B_k A_k`` gives the
components past the smallest rank only the weight ``Σ_{k: r_k > j} p_k < 1`` of the clients that
hold them, so they shrink geometrically over rounds (the paper's rank collapse). raFLoRA cuts the
rank axis into partitions between consecutive distinct client ranks ``r_(1) < … < r_(P)``,

``P_q = [r_(q-1), r_(q))`` (0-based columns, ``r_(0) = 0``),

and averages each partition over the clients that hold it, its effective contributors
``C_q = {k : r_k ≥ r_(q)}``, with the aggregation weights renormalised within ``C_q``:

``G ← Σ_q Σ_{k ∈ C_q} (p_k / Σ_{l ∈ C_q} p_l) · s_k B_k[:, P_q] A_k[P_q, :]``  (Eq. 8),

``p_k ∝ n_k`` (``weighting="data_size"``, the default) or ``p_k = 1`` (``"uniform"``). The sum over
partitions is then redistributed by SVD as FlexLoRA.

Choices where the method's text was not available (docs/algorithms.md, "raFLoRA"):

* the partitions are cut at the distinct ranks of the round's kept clients. Any finer cut (for
  example at every configured rank) gives the same aggregate, since every column of a partition has
  the same contributors;
* the partitions are of the clients' trained factors ``s_k B_k A_k`` (the local adapters, started
  from ``G``'s truncations), not of their changes, and the aggregate replaces ``G`` as in FlexLoRA;
  columns that no kept client holds get no weight;
* the server keeps the aggregate dense (as ``flexlora`` and ``rb_lora`` here): the global model is
  ``G`` itself, and the clients' truncations come from its rank-``r_max`` SVD.

Read this way the weight of client ``k`` on column ``j`` is ``n_k / Σ_{l: r_l > j} n_l``, which is
RB-LoRA's ``α_k β_j`` with ``β`` uncapped (tested): on the rule, the two papers agree. An untrained
round (every client returns the factors it was handed) gives ``G`` truncated to the largest rank held.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedhl_jax import aggregation as agg
from fedhl_jax.algorithms.base import Algorithm, register, resolve_options
from fedhl_jax.algorithms.dense import SVDOptions, dense_family
from fedhl_jax.truncation import masked_factors

#: The base weights ``p_k`` that each partition renormalises over its contributors.
RAFLORA_WEIGHTINGS = ("data_size", "uniform")


@dataclasses.dataclass(frozen=True)
class RaFLoRAOptions(SVDOptions):
    """raFLoRA's options.

    Attributes:
      weighting: the base weights ``p_k`` renormalised within each partition: ``data_size``
        (``p_k ∝ n_k``, default) or ``uniform`` (``p_k = 1``: each partition is the plain mean over
        its contributors).
      split, svd_method: see ``SVDOptions``.
    """

    weighting: str = "data_size"

    def __post_init__(self):
        super().__post_init__()
        if self.weighting not in RAFLORA_WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; expected one of {RAFLORA_WEIGHTINGS}")


def partition_bounds(ranks: jax.Array, valid: jax.Array, r_max: int) -> jax.Array:
    """The end of the partition of every rank column: ``h_j = min {r_k : k kept, r_k > j}``.

    Column ``j`` (0-based) lies in the partition ``[r_(q-1), r_(q))`` with ``r_(q) = h_j``; its
    effective contributors are the kept clients with ``r_k ≥ h_j``. Static shapes: no cut is
    materialised, so the round's ranks never change what is compiled.

    Args:
      ranks: ``[n]`` int client ranks.
      valid: ``[n]`` bool, the clients kept in the round.
      r_max: padded rank.

    Returns:
      ``[r_max]`` int32; 0 for the columns past every kept client's rank (no partition).
    """
    j = jnp.arange(r_max)
    above = valid[:, None] & (ranks[:, None] > j[None, :])  # [n, r_max]
    h = jnp.min(jnp.where(above, ranks[:, None], r_max + 1), axis=0)
    return jnp.where(h <= r_max, h, 0).astype(jnp.int32)


def partition_weights(ranks: jax.Array, base: jax.Array, valid: jax.Array, r_max: int) -> jax.Array:
    """Eq. 8's weights: ``w_kj = p_k [r_k ≥ h_j] / Σ_l p_l [r_l ≥ h_j]`` over the kept clients.

    Args:
      ranks: ``[n]`` int client ranks.
      base: ``[n]`` base weights ``p_k ≥ 0`` (data sizes, or ones).
      valid: ``[n]`` bool, the clients kept.
      r_max: padded rank.

    Returns:
      ``[n, r_max]`` float32: each column with a contributor sums to 1 over the clients; a column
      that no kept client holds is all 0.
    """
    h = partition_bounds(ranks, valid, r_max)  # [r_max]
    base = jnp.where(valid, jnp.asarray(base, jnp.float32), 0.0)
    holds = valid[:, None] & (h[None, :] > 0) & (ranks[:, None] >= h[None, :])  # [n, r_max]
    w = jnp.where(holds, base[:, None], 0.0)
    total = jnp.sum(w, axis=0)  # [r_max]
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def raflora_update(G: jax.Array, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, w: jax.Array,
                   keep: jax.Array) -> jax.Array:
    """raFLoRA's aggregate on one module (Eq. 8): ``Σ_k Σ_j w_kj s_k b_j^(k) a_j^(k)ᵀ``, or ``G`` when
    ``keep`` is false.

    Args:
      G: ``[d_out, d_in]`` the current adapter (kept when no client is).
      B, A, mask, scale: the clients' trained factors ``[n, d_out, r_max]``, ``[n, r_max, d_in]``,
        masks ``[n, r_max]`` and scales ``[n]``; columns past a client's rank are ignored.
      w: ``[n, r_max]`` partition weights (:func:`partition_weights`).
      keep: ``[]`` bool, some client is kept.

    Returns:
      ``[d_out, d_in]`` as one ``[d_out, n·r] @ [n·r, d_in]`` contraction (no per-client dense matrix).
    """
    Bm, Am = masked_factors(B, A, mask * (w != 0))
    return jnp.where(keep, jnp.einsum("n,nr,nor,nri->oi", scale, w, Bm, Am), G)


@register("raflora")
def raflora(r_max: int, options: RaFLoRAOptions | dict | None = None, **overrides) -> Algorithm:
    """raFLoRA (arXiv 2602.13486): rank partitions averaged over their effective contributors,
    then SVD redistribution (module docstring).

    Args:
      r_max: padded rank.
      options: ``RaFLoRAOptions`` (or a dict of its fields: ``weighting``, ``split``, ``svd_method``);
        keyword overrides replace single fields.

    Raises:
      ValueError: an invalid option value; TypeError: an unknown option.
    """
    o = resolve_options(RaFLoRAOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        base = num_examples if o.weighting == "data_size" else jnp.ones_like(num_examples)
        ranks = jnp.sum(mask > 0, axis=1)
        w = partition_weights(ranks, base, valid, mask.shape[1])  # [n, r_max]
        keep = jnp.any(valid)
        G = {k: raflora_update(g, B[k], A[k], mask, scale, w, keep) for k, g in state.G.items()}
        # p: the weights of the first partition, which every kept client holds (the rank-agnostic ones).
        return {"G": G}, {"p": agg.normalise(base, valid), "w": w}

    return dense_family("raflora", r_max, o, combine)
