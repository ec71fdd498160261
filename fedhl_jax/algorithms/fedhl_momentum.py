"""FedHL with server momentum (FedAvgM, Hsu, Qi and Brown, 2019, applied to FedHL's update).

The server keeps a velocity ``v`` beside FedHL's ``G`` and moves ``G`` by it:
``v ← β v + Σ_i p_i (s_i B_i A_i − G_{r_i})`` (FedHL's Eq. 6 update, Eq. 12 weights),
``G ← G + v``. With ``β = 0`` this is FedHL; an untrained round (the clients send back the
truncations they were handed) with ``v = 0`` leaves ``G`` and ``v`` unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from fedhl_jax.algorithms.base import Algorithm, register, resolve_options
from fedhl_jax.algorithms.dense import FedHLOptions, dense_family, fedhl_module_weights, mean_weights
from fedhl_jax.truncation import weighted_delta


@struct.dataclass
class MomentumState:
    """Server state of FedHL with momentum.

    Attributes:
      G: ``{module: [d_out, d_in]}`` dense global adapter.
      dec: ``{module: SVD}`` of ``G``.
      v: ``{module: [d_out, d_in]}`` the server's velocity.
      round: ``[]`` int32, rounds aggregated so far.
    """

    layout: ClassVar[str] = "fedhl-momentum/1"

    G: dict
    dec: dict
    v: dict
    round: jax.Array


@dataclasses.dataclass(frozen=True)
class FedHLMomentumOptions(FedHLOptions):
    """FedHL's options plus the momentum ``beta`` in ``[0, 1)``."""

    beta: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got beta={self.beta!r}")


@register("fedhl_momentum")
def fedhl_momentum(r_max: int, options: FedHLMomentumOptions | dict | None = None, **overrides) -> Algorithm:
    """FedHL with server momentum: ``v ← β v + Σ p_i ΔW_i``, ``G ← G + v``.

    Args:
      r_max: padded rank.
      options: ``FedHLMomentumOptions`` (or a dict of its fields); keyword overrides replace fields.

    Raises:
      ValueError: an invalid option value; TypeError: an unknown option.
    """
    o = resolve_options(FedHLMomentumOptions, options, overrides)

    def combine(state, B, A, mask, scale, num_examples, valid, errors):
        p = fedhl_module_weights(o, errors, num_examples, valid)
        v = {k: o.beta * state.v[k] + weighted_delta(state.dec[k], B[k], A[k], mask, scale, p[k]) for k in state.G}
        return {"G": {k: g + v[k] for k, g in state.G.items()}, "v": v}, {"p": mean_weights(p)}

    return dense_family("fedhl_momentum", r_max, o, combine, state_type=MomentumState, from_legacy=False,
                        init_extra=lambda G: {"v": {k: jnp.zeros_like(g) for k, g in G.items()}})
