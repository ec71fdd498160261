"""Federated instruction data: loading, prompts, labels, partitions, batches.

Typical use::

    from fedhl_jax.config import DataConfig
    from fedhl_jax.data import build_federated_dataset

    fed = build_federated_dataset(
        DataConfig("gsm8k", seq_len=512, partition="dirichlet", dirichlet_alpha=0.3), tokenizer,
        num_clients=10, seed=0,
    )
    print(fed.summary())
    batcher = fed.batcher(local_steps=4, batch_size=8, seed=0)
    tokens, loss_mask = batcher(round_idx, client_ids)  # [C, 4, 8, 512] each
"""

from fedhl_jax.data import catalog  # noqa: F401  (registers the shipped datasets)
from fedhl_jax.data.batching import RoundBatcher, make_round_batch, sample_clients
from fedhl_jax.data.federated import FederatedDataset, build_federated_dataset, load_records
from fedhl_jax.data.labels import (
    CODE_LANGUAGES,
    code_language,
    dataset_labels,
    dolly_derived_label,
    gsm8k_answer_size,
    gsm8k_num_steps,
    gsm8k_steps_label,
    label_counts,
)
from fedhl_jax.data.loading import (
    DATA_DIR_ENV,
    DataError,
    DataFiles,
    DataSource,
    default_data_dir,
    load_instruction_dataset,
    resolve_data_dir,
    resolve_data_files,
    validate_json_file,
)
from fedhl_jax.data.partition import (
    PARTITION_KINDS,
    PartitionConfig,
    PartitionSummary,
    dirichlet_partition,
    format_partition_summary,
    iid_partition,
    label_skew,
    make_partition,
    meta_partition,
    partition_summary,
    plot_partition_summary,
    quantity_skew_partition,
    rank_correlated_partition,
    validate_partition,
)
from fedhl_jax.data.prompts import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    TokenizedDataset,
    build_prompt,
    pad_prompts,
    tokenize_dataset,
)
from fedhl_jax.data.registry import DatasetSpec, dataset_names, dataset_spec, register_dataset, unregister_dataset
from fedhl_jax.data.toy_tokenizer import word_level_tokenizer


def __getattr__(name: str):
    # ``DataConfig`` lives with the run's schema in ``fedhl_jax.config``, which imports this package.
    if name == "DataConfig":
        from fedhl_jax.config import DataConfig

        return DataConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CODE_LANGUAGES",
    "DATA_DIR_ENV",
    "DataConfig",
    "DataError",
    "DataFiles",
    "DataSource",
    "DatasetSpec",
    "FederatedDataset",
    "PARTITION_KINDS",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "PartitionConfig",
    "PartitionSummary",
    "RoundBatcher",
    "TokenizedDataset",
    "build_federated_dataset",
    "build_prompt",
    "code_language",
    "dataset_names",
    "dataset_spec",
    "dataset_labels",
    "default_data_dir",
    "dirichlet_partition",
    "dolly_derived_label",
    "format_partition_summary",
    "gsm8k_answer_size",
    "gsm8k_num_steps",
    "gsm8k_steps_label",
    "iid_partition",
    "label_counts",
    "label_skew",
    "load_instruction_dataset",
    "load_records",
    "make_partition",
    "make_round_batch",
    "meta_partition",
    "pad_prompts",
    "partition_summary",
    "plot_partition_summary",
    "quantity_skew_partition",
    "rank_correlated_partition",
    "register_dataset",
    "resolve_data_dir",
    "resolve_data_files",
    "sample_clients",
    "tokenize_dataset",
    "unregister_dataset",
    "validate_json_file",
    "validate_partition",
    "word_level_tokenizer",
]
