"""The factor family: HetLoRA, FedIT, FFA-LoRA and FedEx-LoRA average ``B`` and ``A`` separately.

The global factors are kept in scale-absorbed form ``(√s B, √s A)``, so a rank-``r`` slice means
the same update for every client whatever its own ``s = α/r``.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedhl_jax import aggregation as agg
from fedhl_jax.algorithms.base import (Algorithm, ClientPlan, NoOptions, check_rmax, check_shapes, guard, module_keys,
                                       register, require_key, resolve_options, state_migration, valid_clients,
                                       zero_round)
from fedhl_jax.lora import check_ranks as _check_ranks
from fedhl_jax.truncation import lora_init_A, weighted_product


@struct.dataclass
class FactorState:
    """Server state of the factor-averaging algorithms.

    Attributes:
      B: ``{module: [d_out, r_max]}`` global factors (scale-absorbed).
      A: ``{module: [r_max, d_in]}``.
      round: ``[]`` int32, rounds aggregated so far.
    """

    layout: ClassVar[str] = "factor/2"

    B: dict
    A: dict
    round: jax.Array


@struct.dataclass
class FactorResidualState:
    """``FactorState`` plus the residual merged into the base (FedEx-LoRA).

    Attributes:
      B, A, round: as in ``FactorState``.
      G: ``{module: [d_out, d_in]}`` the residuals folded in so far.
    """

    layout: ClassVar[str] = "factor-residual/2"

    B: dict
    A: dict
    G: dict
    round: jax.Array


def _factor_family(name: str, r_max: int, options, *, weights: Callable, homogeneous: bool, residual: bool,
                   trainable=("A", "B")) -> Algorithm:
    """Algorithms that average the factors ``B`` and ``A`` separately (scale-absorbed form)."""
    r_max = check_rmax(r_max)
    state_type = FactorResidualState if residual else FactorState

    def check(ranks):
        arr = _check_ranks(ranks, r_max)
        if homogeneous and np.unique(arr).size > 1:
            raise ValueError(f"{name} needs the same rank on every client, got ranks {sorted(set(arr.tolist()))}")
        return arr

    def init(shapes, key=None):
        check_shapes(shapes, r_max)
        keys = module_keys(require_key(key, f"{name}.init (A is drawn at random)"), shapes)
        B = {k: jnp.zeros((d_out, r_max), jnp.float32) for k, (d_out, _) in shapes.items()}
        A = {k: lora_init_A(keys[k], r_max, d_in) for k, (_, d_in) in shapes.items()}
        if residual:
            return FactorResidualState(B=B, A=A, G={k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()},
                                       round=zero_round())
        return FactorState(B=B, A=A, round=zero_round())

    def plan(state, mask, scale, key):
        del mask, key
        shared = {k: (state.B[k], state.A[k]) for k in state.B}
        return ClientPlan(shared, jnp.sqrt(jnp.asarray(scale, jnp.float32)), dict(state.G) if residual else None)

    def materialize(shared, root, mask):
        on = mask > 0
        B = {k: jnp.where(on[None, :], b / root, 0.0) for k, (b, _) in shared.items()}
        A = {k: jnp.where(on[:, None], a / root, 0.0) for k, (_, a) in shared.items()}
        return B, A

    def aggregate(state, B, A, mask, scale, num_examples=None, key=None):
        valid = valid_clients(B, A, mask, scale)
        agg.warn_excluded(valid)
        n = mask.shape[0]
        root = jnp.sqrt(jnp.asarray(scale, jnp.float32))[:, None, None]
        p = weights(B, A, mask, scale, agg.num_examples_or_ones(num_examples, n), valid)
        # Columns no valid client holds keep their previous value (zero-padding would erase them).
        covered = jnp.einsum("n,nr->r", valid.astype(mask.dtype), mask) > 0  # [r_max]
        newB, newA, G = {}, {}, {}
        for k in state.B:
            b, a = agg.factor_average(B[k] * root, A[k] * root, mask, p)  # [d_out, r], [r, d_in]
            b = jnp.where(covered[None, :], b, state.B[k])
            a = jnp.where(covered[:, None], a, state.A[k])
            newB[k], newA[k] = b, a
            if residual:
                # FedEx-LoRA: fold avg(s B A) − avg(√s B)·avg(√s A) into the base (exact aggregation).
                G[k] = state.G[k] + weighted_product(B[k], A[k], mask, scale, p) - b @ a
        new = state.replace(B=newB, A=newA, G=G) if residual else state.replace(B=newB, A=newA)
        return guard(new, state, valid, {"p": p, "valid": valid})

    def global_delta(state):
        return {k: state.B[k] @ state.A[k] + (state.G[k] if residual else 0.0) for k in state.B}

    return Algorithm(name, init, plan, materialize, aggregate, global_delta, check, tuple(trainable),
                     options=options, homogeneous=homogeneous, state_layout=state_type.layout,
                     migrate_state=state_migration(state_type))


def _data_size_weights(B, A, mask, scale, num_examples, valid):
    return agg.data_weights(num_examples, valid)


def _hetlora_weights(B, A, mask, scale, num_examples, valid):
    norms = [agg.hetlora_weights(B[k], A[k], mask, scale, valid) for k in B]
    return agg.normalise(jnp.mean(jnp.stack(norms), axis=0), valid)


@register("hetlora")
def hetlora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """HetLoRA (Cho et al., 2024): zero-pad to ``r_max``, average ``B`` and ``A`` separately.

    Weights ``p_i ∝ ‖s_i B_i A_i‖_F`` (averaged over modules); a client of rank
    ``r`` receives the first ``r`` columns (truncation by slicing). Rank columns
    that no valid client of the round holds keep their previous value.
    Self-pruning is not implemented.
    """
    return _factor_family("hetlora", r_max, resolve_options(NoOptions, options, overrides), weights=_hetlora_weights,
                          homogeneous=False, residual=False)


@register("fedit")
def fedit(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FedIT (Zhang et al., 2024): FedAvg of ``A`` and ``B`` separately, data-size weights.

    Homogeneous ranks only: ``check_ranks`` refuses mixed ranks.
    """
    return _factor_family("fedit", r_max, resolve_options(NoOptions, options, overrides), weights=_data_size_weights,
                          homogeneous=True, residual=False)


@register("ffa_lora")
def ffa_lora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FFA-LoRA (Sun et al., 2024): FedIT with ``A`` frozen at its initialisation (only ``B`` trains)."""
    return _factor_family("ffa_lora", r_max, resolve_options(NoOptions, options, overrides),
                          weights=_data_size_weights, homogeneous=True, residual=False, trainable=("B",))


@register("fedex_lora")
def fedex_lora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FedEx-LoRA (Singhal et al., 2025): FedIT plus the residual
    ``Σ p_i s_i B_i A_i − (Σ p_i √s_i B_i)(Σ p_i √s_i A_i)`` folded into the base, so the
    global update is the exact average of the clients' products."""
    return _factor_family("fedex_lora", r_max, resolve_options(NoOptions, options, overrides),
                          weights=_data_size_weights, homogeneous=True, residual=True)
