"""Federated LoRA algorithms as optax-style factories of pure functions.

Each factory closes over its hyperparameters and returns an ``Algorithm``, a NamedTuple of pure,
jit-able functions over the algorithm's own server-state pytree:

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
* ``comm_bytes(shapes, ranks) -> (down, up)``: bytes sent in a round (float32 factors);
* ``state_layout`` and ``migrate_state(layout, flat) -> flat``: the name and version of the
  state's tree, recorded in checkpoints, and the reader of older checkpoints (``base``).

An algorithm also states the facts the engine needs (``homogeneous``: one rank for every client;
``per_rank_eval``: a client of rank ``r`` starts from the rank-``r`` truncation of one global
adapter, so evaluating that truncation per rank means something) and carries its frozen
options dataclass (``FedHLOptions``, ``SVDOptions``, ``NoOptions``), validated when it is built.
The engine, evaluation and checkpoints read only ``state.round`` of a state, and never tell algorithms
apart by name.

Everything is vectorised over the leading client axis; no Python loop runs over
clients. Python loops run over modules only (a fixed set, unrolled once at trace time).

One module per family: ``dense`` (FedHL, FlexLoRA, RB-LoRA: ``DenseState``), ``factor``
(HetLoRA, FedIT, FFA-LoRA, FedEx-LoRA: ``FactorState``, ``FactorResidualState``), ``stacking``
(FLoRA: ``FloraState``), ``fedhl_momentum`` (``MomentumState``). Every module of this package is imported
here, and its factories register themselves (``base.register``), so a new algorithm is one new
module and one test file (docs/engine.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from fedhl_jax.algorithms.base import (ALGORITHMS, LEGACY_LAYOUT, Algorithm, ClientPlan, ClientStart, NoOptions,
                                       comm_bytes, make_algorithm, register)
from fedhl_jax.algorithms.dense import DenseState, FedHLOptions, SVDOptions, fedhl, flexlora, rb_lora
from fedhl_jax.algorithms.factor import FactorResidualState, FactorState, fedex_lora, fedit, ffa_lora, hetlora
from fedhl_jax.algorithms.stacking import FloraState, flora

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "ALGORITHMS", "LEGACY_LAYOUT", "Algorithm", "ClientPlan", "ClientStart", "DenseState", "FactorResidualState",
    "FactorState", "FedHLOptions", "FloraState", "NoOptions", "SVDOptions", "comm_bytes", "fedex_lora", "fedhl",
    "fedit", "ffa_lora", "flexlora", "flora", "hetlora", "make_algorithm", "rb_lora", "register",
]
