"""The dense-``G`` family: FedHL, FlexLoRA and RB-LoRA.

The server keeps a dense global adapter ``G`` per module and its SVD (computed once per round in
``aggregate``, or in ``init``); a client of rank ``r`` starts from the rank-``r`` truncation of
``G``, split into factors (``truncation.truncation_plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedhl_jax import aggregation as agg
from fedhl_jax.algorithms.base import (Algorithm, ClientPlan, check_rmax, check_shapes, guard, module_keys, register,
                                       require_key, resolve_options, state_migration, valid_clients, zero_round)
from fedhl_jax.lora import check_ranks as _check_ranks
from fedhl_jax.truncation import SPLITS, SVD_METHODS, factors_from_plan, svd, svd_all, truncation_plan


@struct.dataclass
class DenseState:
    """Server state of the dense-``G`` family.

    Attributes:
      G: ``{module: [d_out, d_in]}`` dense global adapter.
      dec: ``{module: SVD}`` of ``G`` (rank ``r_max``), sliced by ``plan``.
      round: ``[]`` int32, rounds aggregated so far.
    """

    layout: ClassVar[str] = "dense/2"

    G: dict
    dec: dict
    round: jax.Array


@dataclasses.dataclass(frozen=True)
class SVDOptions:
    """Options of the SVD-redistributing algorithms (FlexLoRA; FedHL extends them).

    Attributes:
      split: how ``s·B·A = G_r`` is split into factors (``truncate_from_svd``): ``balanced``
        (√Σ on both sides), ``left`` (``A = Vᵀ``) or ``right``.
      svd_method: ``exact`` or ``randomized`` (seeded by the round's key).
    """

    split: str = "balanced"
    svd_method: str = "exact"

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"unknown svd_method {self.svd_method!r}; expected one of {SVD_METHODS}")


@dataclasses.dataclass(frozen=True)
class FedHLOptions(SVDOptions):
    """FedHL's options (docs/algorithms.md).

    Attributes:
      eps: ε > 0 of the weights ``p_i ∝ 1/(r̂_i^power + ε)``.
      eps_mode: ``relative`` (default, ``ε · mean(r̂^power)``) or ``absolute``
        (``aggregation.DEFAULT_EPS_MODE``, the same default as ``fedhl_aggregate``).
      power: exponent on ``r̂`` (2 follows the paper's formula as written).
      weighting: ``optimal`` | ``uniform`` | ``data_size`` | ``optimal_data_size`` | ``balanced`` |
        ``drift_sampling`` (``aggregation.WEIGHTINGS``).
      per_module: one weight per client and module instead of one per client.
      split, svd_method: see ``SVDOptions``.
    """

    eps: float = agg.DEFAULT_EPS
    eps_mode: str = agg.DEFAULT_EPS_MODE
    power: float = 2.0
    weighting: str = "optimal"
    per_module: bool = False

    def __post_init__(self):
        super().__post_init__()
        agg.check_eps(self.eps)
        agg.check_weighting(self.weighting, num_examples=0)
        if self.eps_mode not in agg.EPS_MODES:
            raise ValueError(f"unknown eps_mode {self.eps_mode!r}; expected one of {agg.EPS_MODES}")
        if not (isinstance(self.power, (int, float)) and np.isfinite(self.power) and self.power > 0):
            raise ValueError(f"power must be > 0, got power={self.power!r}")


@dataclasses.dataclass(frozen=True)
class RBLoRAOptions(SVDOptions):
    """Options of the rank-balanced algorithms (RB-LoRA, FedHL-RB).

    Attributes:
      beta_cap: ``None`` (RB-LoRA's rule as published: ``β_r`` unbounded) or the largest rank
        rarity ``β_r`` used (a number ``≥ 1``, ``aggregation.rank_rarity``).
      split, svd_method: see ``SVDOptions``.
    """

    beta_cap: float | None = None

    def __post_init__(self):
        super().__post_init__()
        agg.check_beta_cap(self.beta_cap)


def dense_family(name: str, r_max: int, options: SVDOptions, combine: Callable, *, state_type=DenseState,
                 init_extra: Callable | None = None, from_legacy: bool = True) -> Algorithm:
    """An algorithm with a dense ``G``, one SVD per module per round and slicing per client.

    Args:
      name: the algorithm's name.
      r_max: padded rank.
      options: its ``SVDOptions`` (or a subclass).
      combine: ``combine(state, B, A, mask, scale, num_examples, valid, errors) -> (fields, info)``:
        the new values of the state's fields (``fields["G"]`` at least; ``dec`` and ``round`` are
        set here) and the round's ``info`` (``p [n]``). ``errors = {module: [n]}`` are the
        clients' truncation errors ``r̂_i = ‖G − G_{r_i}‖²_F``, ``num_examples [n]`` float32.
      state_type: a ``flax.struct`` dataclass with fields ``G``, ``dec``, ``round`` and any others.
      init_extra: ``init_extra(G) -> {field: value}`` the initial values of the other fields.
      from_legacy: checkpoints of ``base.LEGACY_LAYOUT`` can be read into ``state_type``.

    Returns:
      The ``Algorithm``. A round that keeps no client, or makes a field non-finite, leaves the
      state as it was (``info["applied"]``).
    """
    r_max = check_rmax(r_max)
    split, svd_method = options.split, options.svd_method

    def decompose(G: dict, key) -> dict:
        keys = module_keys(key, G) if svd_method == "randomized" else None
        return svd_all(G, r_max, method=svd_method, keys=keys)

    def init(shapes, key=None):
        check_shapes(shapes, r_max)
        G = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
        extra = init_extra(G) if init_extra is not None else {}
        # The SVD of G₀ = 0 is exact whatever the method (no key needed).
        return state_type(G=G, dec={k: svd(g, r_max) for k, g in G.items()}, round=zero_round(), **extra)

    def plan(state, mask, scale, key):
        keys = module_keys(key, state.G)
        plans = {k: truncation_plan(state.dec[k], scale, key=keys[k], split=split) for k in state.G}
        shared = {k: (p.U, p.Vt, p.a_init, p.zero) for k, p in plans.items()}
        return ClientPlan(shared, {k: (p.b, p.a) for k, p in plans.items()}, None)

    def materialize(shared, per_client, mask):
        B, A = {}, {}
        for k, (U, Vt, a_init, zero) in shared.items():
            B[k], A[k] = factors_from_plan(U, Vt, a_init, zero, *per_client[k], mask)
        return B, A

    def aggregate(state, B, A, mask, scale, num_examples=None, key=None):
        if svd_method == "randomized":
            require_key(key, f"{name} with svd_method='randomized'")
        ranks = jnp.sum(mask > 0, axis=1)
        errors = {k: state.dec[k].tail[ranks] for k in state.G}  # r̂_i per module
        total = sum(errors.values())
        valid = valid_clients(B, A, mask, scale) & jnp.isfinite(total)
        agg.warn_excluded(valid)
        fields, info = combine(state, B, A, mask, scale, agg.num_examples_or_ones(num_examples, mask.shape[0]), valid,
                               errors)
        state, info = guard(state.replace(**fields), state, valid, dict(info, valid=valid, errors=total))
        return state.replace(dec=decompose(state.G, key)), info

    return Algorithm(name, init, plan, materialize, aggregate, lambda s: dict(s.G), lambda r: _check_ranks(r, r_max),
                     options=options, per_rank_eval=True, state_layout=state_type.layout,
                     migrate_state=state_migration(state_type, from_legacy=from_legacy))


def fedhl_module_weights(o: FedHLOptions, errors: dict, num_examples: jax.Array, valid: jax.Array) -> dict:
    """FedHL's weights (Eq. 12) per module: ``{module: [n]}``, one weight per client and module
    (``o.per_module``) or the weight of ``r̂_i`` summed over modules for every module."""
    def weights(err):
        return agg.fedhl_weights(err, eps=o.eps, eps_mode=o.eps_mode, power=o.power, weighting=o.weighting,
                                 num_examples=num_examples, valid=valid)

    if o.per_module:
        return {k: weights(e) for k, e in errors.items()}
    shared = weights(sum(errors.values()))
    return {k: shared for k in errors}


def mean_weights(p: dict) -> jax.Array:
    """``[n]``: the clients' weights averaged over modules (``info["p"]``)."""
    return jnp.mean(jnp.stack(list(p.values())), axis=0)


@register("fedhl")
def fedhl(r_max: int, options: FedHLOptions | dict | None = None, **overrides) -> Algorithm:
    """FedHL (arXiv 2505.18494): unbiased aggregation into a full-rank ``G``.

    ``G ← G + Σ_i p_i (s_i B_i A_i − G_{r_i})`` (Eq. 6) with ``p_i ∝ 1/(r̂_i^power + ε)`` (Eq. 12),
    ``r̂_i = ‖G − G_{r_i}‖²_F`` summed over modules (one weight per client), or one
    weight per client and module with ``per_module=True``.

    Args:
      r_max: padded rank.
      options: ``FedHLOptions`` (or a dict of its fields); keyword overrides, e.g. ``eps=0.1``,
        replace single fields.

    Raises:
      ValueError: an invalid option value; TypeError: an unknown option.
    """
    o = resolve_options(FedHLOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = fedhl_module_weights(o, errors, num_examples, valid)
        G = {k: agg.fedhl_update(g, state.dec[k], B[k], A[k], mask, scale, p[k]) for k, g in state.G.items()}
        return {"G": G}, {"p": mean_weights(p)}

    return dense_family("fedhl", r_max, o, combine)


@register("flexlora")
def flexlora(r_max: int, options: SVDOptions | dict | None = None, **overrides) -> Algorithm:
    """FlexLoRA (Bai et al., 2024): ``G ← Σ p_i s_i B_i A_i``, ``p_i ∝ n_i``, then SVD redistribution."""
    o = resolve_options(SVDOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = agg.data_weights(num_examples, valid)
        keep = jnp.any(valid)
        return {"G": {k: agg.flexlora_update(g, B[k], A[k], mask, scale, p, keep) for k, g in state.G.items()}}, {"p": p}

    return dense_family("flexlora", r_max, o, combine)


@register("rb_lora")
def rb_lora(r_max: int, options: RBLoRAOptions | dict | None = None, **overrides) -> Algorithm:
    """RB-LoRA (Ha, Oh and Jeon, "RB-LoRA: Rank-Balanced Aggregation for Low-Rank Adaptation with
    Federated Fine-Tuning", Findings of EACL 2026).

    Each client's update is split into rank-one components ``b_r a_rᵀ``; component ``r`` gets
    the weight ``γ_r^(k) = α_k β_r`` with data shares ``α_k = n_k / Σ n`` and rank rarity
    ``β_r = Σ_k n_k / Σ_{k: r_k > r} n_k`` (the authors' ``compute_column_weights_from_ranks``), so
    each component is the data-weighted average over the clients that hold it:
    ``G ← Σ_k Σ_{r < r_k} α_k β_r s_k b_r^(k) a_r^(k)ᵀ``. The aggregate is then projected onto each
    client's rank by SVD, as FlexLoRA (this module's dense-G family). Clients that were handed
    ``G``'s truncations and did not move give back ``G`` truncated to the largest rank held (no
    shrinkage of the components only high-rank clients hold), unlike FlexLoRA; the tail past that
    rank is dropped, unlike FedHL. ``beta_cap`` (``RBLoRAOptions``) bounds ``β_r``.
    """
    o = resolve_options(RBLoRAOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = agg.data_weights(num_examples, valid)
        beta = agg.rank_rarity(mask, num_examples, valid, o.beta_cap)  # [r_max]
        keep = jnp.any(valid)
        G = {k: agg.rb_lora_update(g, B[k], A[k], mask, scale, p, beta, keep) for k, g in state.G.items()}
        return {"G": G}, {"p": p}

    return dense_family("rb_lora", r_max, o, combine)
