"""FLoRA: the clients' stacked factors merged into the base every round."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from fedhl_jax import aggregation as agg
from fedhl_jax.algorithms.base import (Algorithm, ClientPlan, NoOptions, check_rmax, check_shapes, guard, module_keys,
                                       register, resolve_options, state_migration, valid_clients, zero_round)
from fedhl_jax.lora import check_ranks as _check_ranks
from fedhl_jax.truncation import lora_init_A


@struct.dataclass
class FloraState:
    """FLoRA's server state.

    Attributes:
      G: ``{module: [d_out, d_in]}`` the delta merged into the base so far.
      round: ``[]`` int32, rounds aggregated so far.
    """

    layout: ClassVar[str] = "flora/2"

    G: dict
    round: jax.Array


@register("flora")
def flora(r_max: int, options: NoOptions | dict | None = None, **overrides) -> Algorithm:
    """FLoRA (Wang et al., 2024): stack the clients' factors, merge ``Σ p_i s_i B_i A_i`` into the base.

    Clients start every round from a fresh LoRA (``B = 0``, ``A`` re-initialised from the round's
    key) on top of the base plus everything merged so far (``base_delta = G``).
    """
    r_max = check_rmax(r_max)
    o = resolve_options(NoOptions, options, overrides)

    def init(shapes, key=None):
        check_shapes(shapes, r_max)
        return FloraState(G={k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}, round=zero_round())

    def plan(state, mask, scale, key):
        keys = module_keys(key, state.G)
        shared = {k: (jnp.zeros((g.shape[0], r_max), g.dtype), lora_init_A(keys[k], r_max, g.shape[1], g.dtype))
                  for k, g in state.G.items()}
        return ClientPlan(shared, {}, dict(state.G))

    def materialize(shared, per_client, mask):
        on = mask > 0
        B = {k: b for k, (b, _) in shared.items()}  # a fresh LoRA: B = 0
        A = {k: jnp.where(on[:, None], a, 0.0) for k, (_, a) in shared.items()}
        return B, A

    def aggregate(state, B, A, mask, scale, num_examples=None, key=None):
        valid = valid_clients(B, A, mask, scale)
        agg.warn_excluded(valid)
        p = agg.data_weights(agg.num_examples_or_ones(num_examples, mask.shape[0]), valid)
        G = {}
        for k, g in state.G.items():
            Bs, As = agg.flora_stack(B[k], A[k], mask, scale, p)  # [d_out, n·r], [n·r, d_in]
            G[k] = g + Bs @ As
        return guard(state.replace(G=G), state, valid, {"p": p, "valid": valid})

    return Algorithm("flora", init, plan, materialize, aggregate, lambda s: dict(s.G),
                     lambda r: _check_ranks(r, r_max), options=o, stacked_down=True,
                     state_layout=FloraState.layout, migrate_state=state_migration(FloraState))
