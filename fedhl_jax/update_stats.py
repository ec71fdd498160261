"""How far, and in how many directions, the global adapter moved in a round.

The step-size question of a comparison (does a method lead because it aggregates better, or
because it moves further per round?) needs, per round, the global update ``ΔG = G_t − G_{t−1}``
of every LoRA module (``Algorithm.global_delta`` before and after the round):

* the update norm ``‖ΔG‖_F = (Σ_modules ‖ΔG_m‖²_F)^½``;
* its energy beyond rank ``k``: ``Σ_modules Σ_{i>k} σ_i(ΔG_m)²``, the part of ``‖ΔG‖²_F`` that no
  rank-``k`` adapter can hold (Eckart–Young), as a fraction of ``‖ΔG‖²_F``.

Singular values are computed once per module shape, all modules of that shape stacked, in
float32 on the default device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _singular_values(stack: jax.Array) -> jax.Array:
    """``[M, d_out, d_in]`` → ``[M, min(d_out, d_in)]`` singular values (descending)."""
    return jnp.linalg.svd(stack, compute_uv=False)


def spectrum(delta: Mapping[str, jax.Array]) -> np.ndarray:
    """The squared singular values of every module of ``delta``, ``[M, k]`` (zero-padded to the
    largest ``min(d_out, d_in)``), float64."""
    by_shape: dict[tuple, list] = {}
    for v in delta.values():
        by_shape.setdefault(tuple(v.shape), []).append(v)
    rows = []
    for vs in by_shape.values():
        sv = np.asarray(_singular_values(jnp.stack([jnp.asarray(v, jnp.float32) for v in vs])), np.float64)
        rows.append(sv ** 2)
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows])


def update_stats(before: Mapping[str, jax.Array], after: Mapping[str, jax.Array],
                 ranks: Sequence[int] = (2, 8, 16)) -> dict:
    """Norm and spectrum of one round's global update ``after − before``.

    Args:
      before, after: module name → ``[d_out, d_in]`` global adapter (``Algorithm.global_delta``)
        before and after the round; the same modules and shapes.
      ranks: the ``k`` of the energies beyond rank ``k``.

    Returns:
      ``{"update_norm": ‖ΔG‖_F, "global_norm": ‖G_after‖_F,
      "energy_beyond": {k: Σ_{i>k} σ_i² / ‖ΔG‖²_F}}`` (0 for an update of norm 0), floats.

    Raises:
      ValueError: the two adapters have different modules or shapes.
    """
    if set(before) != set(after) or any(np.shape(before[k]) != np.shape(after[k]) for k in after):
        raise ValueError("update_stats needs two adapters with the same modules and shapes")
    delta = {k: jnp.asarray(after[k], jnp.float32) - jnp.asarray(before[k], jnp.float32) for k in after}
    s2 = spectrum(delta)  # [M, k]
    total = float(s2.sum())
    sq = lambda tree: float(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in tree.values()))
    beyond = {int(k): (float(s2[:, int(k):].sum()) / total if total > 0 else 0.0) for k in ranks}
    return {"update_norm": sq(delta) ** 0.5, "global_norm": sq(after) ** 0.5, "energy_beyond": beyond}
