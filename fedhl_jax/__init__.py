"""fedhl-jax: federated fine-tuning of Llama-style models with heterogeneous-rank LoRA.

The stable core contract (one LoRA module, leading client axis):

* ``rank_mask(ranks, r_max) -> [n, r_max]``
* ``truncate(G, mask, scale, ...) -> (B [n, d_out, r_max], A [n, r_max, d_in])``
* ``truncation_error(G, ranks) -> [n]``
* ``fedhl_aggregate(G, B, A, mask, scale, *, eps=1e-2, eps_mode="relative", ...) -> (G_next, p)``
* ``flexlora_aggregate(G, B, A, mask, scale, *, num_examples) -> G_next``

and the tree-level algorithms in ``fedhl_jax.algorithms``.
"""

from fedhl_jax.aggregation import (balanced_weights, factor_average, fedhl_aggregate, fedhl_weights,
                                   flexlora_aggregate, flora_stack, rank_rarity, rb_lora_aggregate)
from fedhl_jax.algorithms import (ALGORITHMS, Algorithm, ClientPlan, ClientStart, FedHLOptions, NoOptions,
                                  ServerState, SVDOptions, fedex_lora, fedhl, fedit, ffa_lora, flexlora, flora, hetlora,
                                  make_algorithm, rb_lora)
from fedhl_jax.lora import Adapter, check_ranks, lora_scale, rank_mask, ranks_from_mask
from fedhl_jax.truncation import (SVD, TruncationPlan, client_deltas, factors_from_plan, rank_approx, svd,
                                  truncate, truncate_from_svd, truncation_error, truncation_plan, weighted_delta)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Adapter", "Algorithm", "ClientPlan", "ClientStart", "FedHLOptions", "NoOptions", "SVDOptions", "TruncationPlan", "factors_from_plan",
    "truncation_plan", "SVD", "ServerState", "check_ranks",
    "balanced_weights", "client_deltas", "factor_average", "fedex_lora", "fedhl", "fedhl_aggregate", "fedhl_weights",
    "fedit", "ffa_lora", "flexlora", "flexlora_aggregate", "flora", "flora_stack", "hetlora",
    "lora_scale", "make_algorithm", "rank_approx", "rank_rarity", "rb_lora", "rb_lora_aggregate", "rank_mask", "ranks_from_mask", "svd", "truncate",
    "truncate_from_svd", "truncation_error", "weighted_delta",
]
