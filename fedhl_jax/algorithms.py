"""Federated LoRA algorithms as optax-style factories of pure functions.

Each factory closes over its hyperparameters and returns an ``Algorithm``, a
NamedTuple of pure, jit-able functions over a ``ServerState`` pytree:

* ``init(shapes, key) -> state`` with ``shapes = {module: (d_out, d_in)}``;
* ``plan(state, mask, scale, key) -> ClientPlan``: the server's per-round work for the ``n``
  sampled clients (``mask [n, r_max]``, ``scale [n]``): arrays shared by all clients plus
  ``O(r_max)`` numbers per client; ``materialize(shared, per_client_i, mask_i) -> (B_i, A_i)``
  builds one client's starting factors from them (client-side work, run inside the vmapped
  client step); ``broadcast(state, mask, scale, key) -> ClientStart`` does both for every client;
* ``aggregate(state, B, A, mask, scale, num_examples, key) -> (state, info)`` with the
  clients' trained factors ``B = {module: [n, d_out, r_max]}``,
  ``A = {module: [n, r_max, d_in]}``, ``num_examples [n]`` and a PRNG key (the randomized SVD
  of the next round's ``G`` draws from it);
* ``global_delta(state) -> {module: [d_out, d_in]}``: the dense update of the
  base weights that the global model uses (evaluation and export);
* ``check_ranks(ranks)``: host-side validation before any compile;
* ``comm_bytes(shapes, ranks) -> (down, up)``: bytes sent in a round (float32 factors).

An algorithm also states the facts the engine needs (``homogeneous``: one rank for every client;
``per_rank_eval``: a client of rank ``r`` starts from the rank-``r`` truncation of one global
adapter, so evaluating that truncation per rank means something) and carries its frozen
options dataclass (``FedHLOptions``, ``SVDOptions``, ``NoOptions``), validated when it is built.
Nothing outside this module tells algorithms apart by name.

Everything is vectorised over the leading client axis; no Python loop runs over
clients. Python loops run over modules only (a fixed set, unrolled once at trace
time).

Factor-form algorithms (``hetlora``, ``fedit``, ``ffa_lora``, ``fedex_lora``)
keep the global factors in scale-absorbed form ``(√s B, √s A)``, so a rank-``r``
slice means the same update for every client whatever its own ``s = α/r``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedhl_jax import aggregation as agg
from fedhl_jax.lora import check_ranks as _check_ranks
from fedhl_jax.truncation import (SPLITS, SVD_METHODS, factors_from_plan, lora_init_A, svd, truncation_plan,
                                  weighted_delta, weighted_product)


@struct.dataclass
class ServerState:
    """Server state pytree (unused fields are empty dicts).

    Attributes:
      G: ``{module: [d_out, d_in]}`` dense global adapter (FedHL, FlexLoRA) or the
        delta merged into the base so far (FLoRA, FedEx-LoRA's residual).
      dec: ``{module: SVD}`` of ``G``, computed once per round in ``aggregate``
        (or ``init``) and sliced by ``broadcast``.
      B: ``{module: [d_out, r_max]}`` global factors (factor-form algorithms).
      A: ``{module: [r_max, d_in]}``.
      round: ``[]`` int32, rounds aggregated so far.
    """

    G: dict
    dec: dict
    B: dict
    A: dict
    round: jax.Array


class ClientStart(NamedTuple):
    """What the sampled clients start a round from.

    Attributes:
      B: ``{module: [n, d_out, r_max]}``.
      A: ``{module: [n, r_max, d_in]}``.
      base_delta: ``{module: [d_out, d_in]}`` added to the frozen base weights of
        every client (shared, not per client), or ``None``.
    """

    B: dict
    A: dict
    base_delta: dict | None


class ClientPlan(NamedTuple):
    """The server's broadcast of a round, before any per-client factor is built.

    Attributes:
      shared: pytree without a client axis (e.g. the SVD's ``U`` and ``Vᵀ``).
      per_client: pytree with a leading client axis ``n`` (``O(r_max)`` per client).
      base_delta: ``{module: [d_out, d_in]}`` shared base update, or ``None``.
    """

    shared: Any
    per_client: Any
    base_delta: dict | None


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of an algorithm that has none."""


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
      weighting: ``optimal`` | ``uniform`` | ``data_size`` | ``optimal_data_size``.
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


def _options(cls, options, overrides: dict):
    """``options`` (an instance of ``cls``, a dict or None) with keyword ``overrides``, validated."""
    if options is None:
        options = {}
    if isinstance(options, dict):
        options = {**options, **overrides}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; valid options: {', '.join(names) or 'none'}")
        return cls(**options)
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__} or a dict, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options


def comm_bytes(shapes: dict, ranks, trainable=("A", "B"), *, stacked_down: bool = False) -> tuple[int, int]:
    """Bytes sent down and up in a round: float32 factors of the clients' active ranks.

    Args:
      shapes: ``{module: (d_out, d_in)}``.
      ranks: ``[n]`` ranks of the round's clients.
      trainable: factors the clients send back (FFA-LoRA: ``B`` only).
      stacked_down: every client also receives the round's stacked factors of all clients (FLoRA).

    Returns:
      ``(down, up)`` in bytes.
    """
    ranks = np.asarray(ranks)
    per_rank = sum(d_out + d_in for d_out, d_in in shapes.values()) * 4
    up_rank = per_rank if "A" in trainable else sum(d for d, _ in shapes.values()) * 4
    down = int(per_rank * ranks.sum())
    if stacked_down:
        down += int(per_rank * ranks.sum() * len(ranks))
    return down, int(up_rank * ranks.sum())


class Algorithm(NamedTuple):
    """A federated LoRA algorithm (see the module docstring)."""

    name: str
    init: Callable
    plan: Callable
    materialize: Callable
    aggregate: Callable
    global_delta: Callable
    check_ranks: Callable
    trainable: tuple = ("A", "B")
    options: Any = NoOptions()
    homogeneous: bool = False
    per_rank_eval: bool = False
    stacked_down: bool = False

    def comm_bytes(self, shapes: dict, ranks) -> tuple[int, int]:
        """``(down, up)`` bytes of a round whose clients have ``ranks`` (see ``comm_bytes``)."""
        return comm_bytes(shapes, ranks, self.trainable, stacked_down=self.stacked_down)

    def broadcast(self, state, mask, scale, key) -> ClientStart:
        """Every sampled client's starting factors: ``plan`` then ``materialize`` for each client."""
        plan = self.plan(state, mask, scale, key)
        B, A = jax.vmap(self.materialize, in_axes=(None, 0, 0))(plan.shared, plan.per_client, mask)
        return ClientStart(B, A, plan.base_delta)


def _check_shapes(shapes: dict, r_max: int) -> None:
    if not shapes:
        raise ValueError("no LoRA modules given")
    for name, (d_out, d_in) in shapes.items():
        if r_max > min(d_out, d_in):
            raise ValueError(f"r_max={r_max} exceeds min(d_out, d_in)={min(d_out, d_in)} of module {name!r}")


def _check_rmax(r_max) -> int:
    if not isinstance(r_max, (int, np.integer)) or r_max < 1:
        raise ValueError(f"r_max must be a positive integer, got {r_max!r}")
    return int(r_max)


def _valid(B: dict, A: dict, mask: jax.Array, scale: jax.Array) -> jax.Array:
    """``[n]``: a client is valid when every module's update is finite and does not overflow."""
    ok = [agg.finite_clients(B[k], A[k], mask, scale) for k in B]
    return jnp.all(jnp.stack(ok), axis=0)


def _finite(tree) -> jax.Array:
    """``[]`` bool: every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.bool_(True)]))


def _guard(new_state: ServerState, old_state: ServerState, valid: jax.Array, info: dict):
    """Keeps ``old_state`` (and says so in ``info["applied"]``) when no client was kept or the new
    state is not finite, so a diverging round never reaches the server state."""
    applied = jnp.any(valid) & _finite((new_state.G, new_state.B, new_state.A))
    state = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new_state, old_state)
    return state.replace(round=old_state.round + 1), dict(info, applied=applied)


def _module_keys(key, names):
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def _empty_state(G=None, dec=None, B=None, A=None) -> ServerState:
    return ServerState(G=G or {}, dec=dec or {}, B=B or {}, A=A or {}, round=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- dense-G family


def _require_key(key, what: str):
    if key is None:
        raise ValueError(f"{what} needs a PRNG key (every random choice follows from the run's seed)")
    return key


def _dense_family(name: str, r_max: int, options: SVDOptions, combine: Callable) -> Algorithm:
    """FedHL and FlexLoRA: a dense ``G``, one SVD per module per round, slicing per client."""
    r_max = _check_rmax(r_max)
    split, svd_method = options.split, options.svd_method

    def decompose(G: dict, key) -> dict:
        keys = _module_keys(key, G) if svd_method == "randomized" else {k: None for k in G}
        return {k: svd(g, r_max, method=svd_method, key=keys[k]) for k, g in G.items()}

    def init(shapes, key=None):
        _check_shapes(shapes, r_max)
        G = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
        # The SVD of G₀ = 0 is exact whatever the method (no key needed).
        return _empty_state(G=G, dec={k: svd(g, r_max) for k, g in G.items()})

    def plan(state, mask, scale, key):
        keys = _module_keys(key, state.G)
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
            _require_key(key, f"{name} with svd_method='randomized'")
        ranks = jnp.sum(mask > 0, axis=1)
        errors = {k: state.dec[k].tail[ranks] for k in state.G}  # r̂_i per module
        total = sum(errors.values())
        valid = _valid(B, A, mask, scale) & jnp.isfinite(total)
        agg.warn_excluded(valid)
        G, info = combine(state, B, A, mask, scale, agg.num_examples_or_ones(num_examples, mask.shape[0]), valid, errors)
        # A round that keeps no client, or would make G non-finite, leaves G (and its SVD) as it was.
        applied = jnp.any(valid) & _finite(G)
        G = jax.tree.map(lambda a, b: jnp.where(applied, a, b), G, state.G)
        info = dict(info, valid=valid, errors=total, applied=applied)
        return state.replace(G=G, dec=decompose(G, key), round=state.round + 1), info

    return Algorithm(name, init, plan, materialize, aggregate, lambda s: dict(s.G), lambda r: _check_ranks(r, r_max),
                     options=options, per_rank_eval=True)


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
    o = _options(FedHLOptions, options, overrides)

    def weights(err, num_examples, valid):
        return agg.fedhl_weights(err, eps=o.eps, eps_mode=o.eps_mode, power=o.power, weighting=o.weighting,
                                 num_examples=num_examples, valid=valid)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        if o.per_module:
            p = {k: weights(errors[k], num_examples, valid) for k in state.G}
        else:
            shared = weights(sum(errors.values()), num_examples, valid)
            p = {k: shared for k in state.G}
        G = {k: g + weighted_delta(state.dec[k], B[k], A[k], mask, scale, p[k]) for k, g in state.G.items()}
        return G, {"p": jnp.mean(jnp.stack(list(p.values())), axis=0)}

    return _dense_family("fedhl", r_max, o, combine)


def flexlora(r_max: int, options: SVDOptions | dict | None = None, **overrides) -> Algorithm:
    """FlexLoRA (Bai et al., 2024): ``G ← Σ p_i s_i B_i A_i``, ``p_i ∝ n_i``, then SVD redistribution."""
    o = _options(SVDOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = agg.data_weights(num_examples, valid)
        keep = jnp.any(valid)
        G = {k: jnp.where(keep, weighted_product(B[k], A[k], mask, scale, p), g) for k, g in state.G.items()}
        return G, {"p": p}

    return _dense_family("flexlora", r_max, o, combine)


def rb_lora(r_max: int, options: SVDOptions | dict | None = None, **overrides) -> Algorithm:
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
    rank is dropped, unlike FedHL.
    """
    o = _options(SVDOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = agg.data_weights(num_examples, valid)
        beta = agg.rank_rarity(mask, num_examples, valid)  # [r_max]
        keep = jnp.any(valid)
        G = {k: jnp.where(keep, weighted_product(B[k] * beta[None, None, :], A[k], mask, scale, p), g)
             for k, g in state.G.items()}
        return G, {"p": p}

    return _dense_family("rb_lora", r_max, o, combine)


def flora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FLoRA (Wang et al., 2024): stack the clients' factors, merge ``Σ p_i s_i B_i A_i`` into the base.

    Clients start every round from a fresh LoRA (``B = 0``, ``A`` re-initialised from the round's
    key) on top of the base plus everything merged so far (``base_delta = G``).
    """
    r_max = _check_rmax(r_max)
    o = _options(NoOptions, options, overrides)

    def init(shapes, key=None):
        _check_shapes(shapes, r_max)
        return _empty_state(G={k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()})

    def plan(state, mask, scale, key):
        keys = _module_keys(key, state.G)
        shared = {k: (jnp.zeros((g.shape[0], r_max), g.dtype), lora_init_A(keys[k], r_max, g.shape[1], g.dtype))
                  for k, g in state.G.items()}
        return ClientPlan(shared, {}, dict(state.G))

    def materialize(shared, per_client, mask):
        on = mask > 0
        B = {k: b for k, (b, _) in shared.items()}  # a fresh LoRA: B = 0
        A = {k: jnp.where(on[:, None], a, 0.0) for k, (_, a) in shared.items()}
        return B, A

    def aggregate(state, B, A, mask, scale, num_examples=None, key=None):
        valid = _valid(B, A, mask, scale)
        agg.warn_excluded(valid)
        p = agg.data_weights(agg.num_examples_or_ones(num_examples, mask.shape[0]), valid)
        G = {}
        for k, g in state.G.items():
            Bs, As = agg.flora_stack(B[k], A[k], mask, scale, p)  # [d_out, n·r], [n·r, d_in]
            G[k] = g + Bs @ As
        return _guard(state.replace(G=G), state, valid, {"p": p, "valid": valid})

    return Algorithm("flora", init, plan, materialize, aggregate, lambda s: dict(s.G),
                     lambda r: _check_ranks(r, r_max), options=o, stacked_down=True)


# --------------------------------------------------------------------------- factor family


def _factor_family(name: str, r_max: int, options, *, weights: Callable, homogeneous: bool, residual: bool,
                   trainable=("A", "B")) -> Algorithm:
    """Algorithms that average the factors ``B`` and ``A`` separately (scale-absorbed form)."""
    r_max = _check_rmax(r_max)

    def check(ranks):
        arr = _check_ranks(ranks, r_max)
        if homogeneous and np.unique(arr).size > 1:
            raise ValueError(f"{name} needs the same rank on every client, got ranks {sorted(set(arr.tolist()))}")
        return arr

    def init(shapes, key=None):
        _check_shapes(shapes, r_max)
        keys = _module_keys(_require_key(key, f"{name}.init (A is drawn at random)"), shapes)
        B = {k: jnp.zeros((d_out, r_max), jnp.float32) for k, (d_out, _) in shapes.items()}
        A = {k: lora_init_A(keys[k], r_max, d_in) for k, (_, d_in) in shapes.items()}
        G = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()} if residual else {}
        return _empty_state(G=G, B=B, A=A)

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
        valid = _valid(B, A, mask, scale)
        agg.warn_excluded(valid)
        n = mask.shape[0]
        root = jnp.sqrt(jnp.asarray(scale, jnp.float32))[:, None, None]
        p = weights(B, A, mask, scale, agg.num_examples_or_ones(num_examples, n), valid)
        # Columns no valid client holds keep their previous value (zero-padding would erase them).
        covered = jnp.einsum("n,nr->r", valid.astype(mask.dtype), mask) > 0  # [r_max]
        newB, newA, G = {}, {}, dict(state.G)
        for k in state.B:
            b, a = agg.factor_average(B[k] * root, A[k] * root, mask, p)  # [d_out, r], [r, d_in]
            b = jnp.where(covered[None, :], b, state.B[k])
            a = jnp.where(covered[:, None], a, state.A[k])
            newB[k], newA[k] = b, a
            if residual:
                # FedEx-LoRA: fold avg(s B A) − avg(√s B)·avg(√s A) into the base (exact aggregation).
                G[k] = state.G[k] + weighted_product(B[k], A[k], mask, scale, p) - b @ a
        return _guard(state.replace(B=newB, A=newA, G=G), state, valid, {"p": p, "valid": valid})

    def global_delta(state):
        return {k: state.B[k] @ state.A[k] + (state.G[k] if residual else 0.0) for k in state.B}

    return Algorithm(name, init, plan, materialize, aggregate, global_delta, check, tuple(trainable),
                     options=options, homogeneous=homogeneous)


def _data_size_weights(B, A, mask, scale, num_examples, valid):
    return agg.data_weights(num_examples, valid)


def _hetlora_weights(B, A, mask, scale, num_examples, valid):
    norms = [agg.hetlora_weights(B[k], A[k], mask, scale, valid) for k in B]
    return agg.normalise(jnp.mean(jnp.stack(norms), axis=0), valid)


def hetlora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """HetLoRA (Cho et al., 2024): zero-pad to ``r_max``, average ``B`` and ``A`` separately.

    Weights ``p_i ∝ ‖s_i B_i A_i‖_F`` (averaged over modules); a client of rank
    ``r`` receives the first ``r`` columns (truncation by slicing). Rank columns
    that no valid client of the round holds keep their previous value.
    Self-pruning is not implemented.
    """
    return _factor_family("hetlora", r_max, _options(NoOptions, options, overrides), weights=_hetlora_weights, homogeneous=False, residual=False)


def fedit(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FedIT (Zhang et al., 2024): FedAvg of ``A`` and ``B`` separately, data-size weights.

    Homogeneous ranks only: ``check_ranks`` refuses mixed ranks.
    """
    return _factor_family("fedit", r_max, _options(NoOptions, options, overrides), weights=_data_size_weights, homogeneous=True, residual=False)


def ffa_lora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FFA-LoRA (Sun et al., 2024): FedIT with ``A`` frozen at its initialisation (only ``B`` trains)."""
    return _factor_family("ffa_lora", r_max, _options(NoOptions, options, overrides), weights=_data_size_weights, homogeneous=True, residual=False,
                          trainable=("B",))


def fedex_lora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FedEx-LoRA (Singhal et al., 2025): FedIT plus the residual
    ``Σ p_i s_i B_i A_i − (Σ p_i √s_i B_i)(Σ p_i √s_i A_i)`` folded into the base, so the
    global update is the exact average of the clients' products."""
    return _factor_family("fedex_lora", r_max, _options(NoOptions, options, overrides), weights=_data_size_weights, homogeneous=True, residual=True)


#: Name → factory. A new algorithm is one factory in this module plus one line here (docs/engine.md).
ALGORITHMS = {
    "fedhl": fedhl,
    "flexlora": flexlora,
    "rb_lora": rb_lora,
    "flora": flora,
    "hetlora": hetlora,
    "fedit": fedit,
    "ffa_lora": ffa_lora,
    "fedex_lora": fedex_lora,
}


def make_algorithm(name: str, r_max: int, options: dict | Any | None = None, **overrides) -> Algorithm:
    """Builds an algorithm by name (``ALGORITHMS``) with its options.

    Args:
      name: a key of ``ALGORITHMS``.
      r_max: padded rank.
      options: the algorithm's options dataclass, or a dict of its fields (e.g. from YAML).
      **overrides: single option fields.

    Raises:
      ValueError: unknown algorithm, or an option that this algorithm does not have (the message
        names the option, the algorithm and its valid options), or an invalid value.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    try:
        return ALGORITHMS[name](r_max, options, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"algorithm {name!r}: {e}") from None
