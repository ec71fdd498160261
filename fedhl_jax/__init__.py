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

import importlib

#: Each public name and its module, imported on first use (``import fedhl_jax`` alone imports no JAX).
_EXPORTS = {
    "fedhl_jax.aggregation": ("balanced_weights", "factor_average", "fedhl_aggregate", "fedhl_update", "fedhl_weights",
                              "flexlora_aggregate", "flexlora_update", "flora_stack", "rank_rarity",
                              "rb_lora_aggregate", "rb_lora_update"),
    "fedhl_jax.algorithms": ("ALGORITHMS", "Algorithm", "ClientPlan", "ClientStart", "DenseState",
                             "FactorResidualState", "FactorState", "FedHLOptions", "FloraState", "NoOptions",
                             "SVDOptions", "fedex_lora", "fedhl", "fedit", "ffa_lora", "flexlora", "flora", "hetlora",
                             "make_algorithm", "rb_lora", "register"),
    "fedhl_jax.lora": ("Adapter", "check_ranks", "lora_scale", "rank_mask", "ranks_from_mask"),
    "fedhl_jax.truncation": ("SVD", "TruncationPlan", "client_deltas", "factors_from_plan", "rank_approx", "svd",
                             "svd_all", "truncate", "truncate_from_svd", "truncation_error", "truncation_plan",
                             "weighted_delta"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'fedhl_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))


__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Adapter", "Algorithm", "ClientPlan", "ClientStart", "DenseState", "FactorResidualState",
    "FactorState", "FedHLOptions", "FloraState", "NoOptions", "SVD", "SVDOptions", "TruncationPlan",
    "balanced_weights", "check_ranks", "client_deltas", "factor_average", "factors_from_plan", "fedex_lora", "fedhl",
    "fedhl_aggregate", "fedhl_update", "fedhl_weights", "fedit", "ffa_lora", "flexlora", "flexlora_aggregate",
    "flexlora_update", "flora", "flora_stack", "hetlora", "lora_scale", "make_algorithm", "rank_approx", "rank_mask",
    "rank_rarity", "ranks_from_mask", "rb_lora", "rb_lora_aggregate", "rb_lora_update", "register", "svd", "svd_all", "truncate",
    "truncate_from_svd", "truncation_error", "truncation_plan", "weighted_delta",
]
