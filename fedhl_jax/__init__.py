"""fedhl-jax: federated fine-tuning of Llama-style models with heterogeneous-rank LoRA.

The stable core contract (one LoRA module, leading client axis):

* ``rank_mask(ranks, r_max) -> [n, r_max]``
* ``truncate(G, mask, scale, ...) -> (B [n, d_out, r_max], A [n, r_max, d_in])``
* ``truncation_error(G, ranks) -> [n]``
* ``fedhl_aggregate(G, B, A, mask, scale, *, eps=1e-2, eps_mode="relative", ...) -> (G_next, p)``
* ``flexlora_aggregate(G, B, A, mask, scale, *, num_examples) -> G_next``
* ``rb_lora_aggregate(G, B, A, mask, scale, *, num_examples) -> G_next``

(each a thin wrapper of the rule's update with given weights, ``fedhl_update``,
``flexlora_update``, ``rb_lora_update``, which the algorithms apply too) and the tree-level
algorithms in the ``fedhl_jax.algorithms`` package.
"""

from fedhl_jax.aggregation import (balanced_weights, factor_average, fedhl_aggregate, fedhl_update, fedhl_weights,
                                   flexlora_aggregate, flexlora_update, flora_stack, rank_rarity, rb_lora_aggregate,
                                   rb_lora_update)
from fedhl_jax.algorithms import (ALGORITHMS, Algorithm, ClientPlan, ClientStart, DenseState, FactorResidualState,
                                  FactorState, FedHLOptions, FloraState, NoOptions, SVDOptions, fedex_lora, fedhl, fedit,
                                  ffa_lora, flexlora, flora, hetlora, make_algorithm, rb_lora, register)
from fedhl_jax.lora import Adapter, check_ranks, lora_scale, rank_mask, ranks_from_mask
from fedhl_jax.truncation import (SVD, TruncationPlan, client_deltas, factors_from_plan, rank_approx, svd,
                                  truncate, truncate_from_svd, truncation_error, truncation_plan, weighted_delta)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Adapter", "Algorithm", "ClientPlan", "ClientStart", "DenseState", "FactorResidualState",
    "FactorState", "FedHLOptions", "FloraState", "NoOptions", "SVD", "SVDOptions", "TruncationPlan",
    "balanced_weights", "check_ranks", "client_deltas", "factor_average", "factors_from_plan", "fedex_lora", "fedhl",
    "fedhl_aggregate", "fedhl_update", "fedhl_weights", "fedit", "ffa_lora", "flexlora", "flexlora_aggregate",
    "flexlora_update", "flora", "flora_stack", "hetlora", "lora_scale", "make_algorithm", "rank_approx", "rank_mask",
    "rank_rarity", "ranks_from_mask", "rb_lora", "rb_lora_aggregate", "rb_lora_update", "register", "svd", "truncate",
    "truncate_from_svd", "truncation_error", "truncation_plan", "weighted_delta",
]
