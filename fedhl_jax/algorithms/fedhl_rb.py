"""FedHL-RB: RB-LoRA's rank-wise balance applied to the change of each component, on FedHL's full-rank ``G``.

A client of rank ``r_i`` starts from ``G``'s truncation, so its starting rank-one components are
``G``'s own: ``s_i b_j a_jᵀ = g_j = σ_j u_j v_jᵀ`` for ``j < r_i``. After training, component ``j``
of client ``i`` is ``C_j^(i) = s_i b_j^(i) a_j^(i)ᵀ`` (column ``j`` of ``B_i`` times row ``j`` of
``A_i``) and its change is ``D_j^(i) = C_j^(i) − g_j``. FedHL (Eq. 6) adds
``Σ_i p_i Σ_{j < r_i} D_j^(i) = Σ_i p_i (s_i B_i A_i − G_{r_i})``: a component that only the few
high-rank clients hold gets only their share of the weight. FedHL-RB averages each component's
change over the clients that hold it, with RB-LoRA's weights ``α_i β_j`` (data shares
``α_i = n_i/Σ n``, rank rarity ``β_j = Σ n / Σ_{k: r_k > j} n_k``):

``G ← G + Σ_j β_j Σ_{i: r_i > j} α_i D_j^(i)
    = G + Σ_i α_i (s_i B̃_i A_i − G̃_{r_i})``,

with ``B̃_i = B_i diag(β)`` and ``G̃_{r_i} = Σ_{j < r_i} β_j g_j``. Properties (tested):

* an untrained round (every client returns the factors it was handed) is a fixed point: every
  ``D_j^(i) = 0``, so ``G`` is unchanged, its tail past ``r_max`` included;
* with one rank for every client, ``β_j = 1`` on the columns held and this is FedHL with data-size
  weights;
* unlike RB-LoRA, the tail ``G − G_{r_max}`` is never dropped, and unlike FedHL a component held by
  a small share ``q_j`` of the round's data moves by the holders' average change, not ``q_j`` times it.

``beta_cap`` (``RBLoRAOptions``) bounds ``β_j`` as for RB-LoRA; a capped component moves by
``cap · q_j < 1`` times its holders' average change.
"""

from __future__ import annotations

import jax

from fedhl_jax import aggregation as agg
from fedhl_jax.algorithms.base import Algorithm, register, resolve_options
from fedhl_jax.algorithms.dense import RBLoRAOptions, dense_family
from fedhl_jax.truncation import SVD, weighted_delta


def fedhl_rb_update(G: jax.Array, dec: SVD, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array,
                    p: jax.Array, beta: jax.Array) -> jax.Array:
    """FedHL-RB's update on one module: ``G + Σ_i p_i Σ_{j < r_i} β_j (s_i b_j^(i) a_j^(i)ᵀ − σ_j u_j v_jᵀ)``.

    Both the trained component and the starting component ``g_j`` are scaled by ``β_j``, so the
    balance applies to the change only: FedHL's :func:`~fedhl_jax.truncation.weighted_delta` of
    the factors with column ``j`` of ``B`` scaled by ``β_j`` and the singular values of ``G``
    scaled by ``β_j`` (no ``[n, d_out, d_in]`` tensor is built).

    Args:
      G: ``[d_out, d_in]``; dec: its SVD (rank ``r_max``), whose truncations the clients received.
      B, A, mask, scale: the clients' trained factors ``[n, d_out, r_max]``, ``[n, r_max, d_in]``,
        masks ``[n, r_max]`` and scales ``[n]``.
      p: ``[n]`` data shares (0 for the clients left out).
      beta: ``[r_max]`` rank rarities (``aggregation.rank_rarity``).

    Returns:
      ``[d_out, d_in]``.
    """
    return G + weighted_delta(dec._replace(S=dec.S * beta), B * beta[None, None, :], A, mask, scale, p)


@register("fedhl_rb")
def fedhl_rb(r_max: int, options: RBLoRAOptions | dict | None = None, **overrides) -> Algorithm:
    """FedHL-RB: rank-balanced changes of the components added to the full-rank ``G`` (module docstring).

    Args:
      r_max: padded rank.
      options: ``RBLoRAOptions`` (or a dict of its fields: ``beta_cap``, ``split``, ``svd_method``);
        keyword overrides replace single fields.

    Raises:
      ValueError: an invalid option value; TypeError: an unknown option.
    """
    o = resolve_options(RBLoRAOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = agg.data_weights(num_examples, valid)
        beta = agg.rank_rarity(mask, num_examples, valid, o.beta_cap)  # [r_max]
        G = {k: fedhl_rb_update(g, state.dec[k], B[k], A[k], mask, scale, p, beta) for k, g in state.G.items()}
        return {"G": G}, {"p": p, "beta": beta}

    return dense_family("fedhl_rb", r_max, o, combine)

