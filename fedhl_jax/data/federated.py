"""One call from a :class:`DataConfig` to tokenised, labelled, partitioned data."""

from __future__ import annotations

import dataclasses
from typing import Any

import datasets
import numpy as np

from fedhl_jax.data.batching import RoundBatcher
from fedhl_jax.data.labels import dataset_labels
from fedhl_jax.data.loading import DataConfig, DataError, load_instruction_dataset
from fedhl_jax.data.partition import (
    PartitionConfig,
    PartitionSummary,
    make_partition,
    partition_summary,
)
from fedhl_jax.data.prompts import TokenizedDataset, tokenize_dataset

__all__ = ["FederatedDataset", "build_federated_dataset"]


@dataclasses.dataclass
class FederatedDataset:
    """A tokenised dataset split across clients.

    Attributes:
        config: The data configuration.
        partition_config: The partition configuration.
        records: Normalised records (all loaded rows, before dropping).
        data: Tokenised arrays for the kept rows (``N`` of them).
        labels: ``[N]`` labels of the kept rows.
        partitions: One index array (into ``data``) per client.
    """

    config: DataConfig
    partition_config: PartitionConfig
    records: datasets.Dataset
    data: TokenizedDataset
    labels: np.ndarray
    partitions: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.partitions)

    def summary(self) -> PartitionSummary:
        """Examples and label mix per client."""
        return partition_summary(self.partitions, self.labels, self.partition_config.ranks)

    def batcher(self, *, local_steps: int, batch_size: int, seed: int = 0) -> RoundBatcher:
        """Returns a :class:`RoundBatcher` over this dataset's partitions."""
        return RoundBatcher(
            self.data.tokens, self.data.loss_mask, self.partitions,
            local_steps=local_steps, batch_size=batch_size, seed=seed,
        )


def build_federated_dataset(
    config: DataConfig,
    tokenizer: Any,
    partition: PartitionConfig,
    *,
    seq_len: int = 512,
    pad_id: int | None = None,
) -> FederatedDataset:
    """Loads, labels, tokenises and partitions a dataset.

    The client count and the label kind are checked right after loading,
    before tokenisation. Labels are computed on all rows and then restricted
    to the rows kept by :func:`tokenize_dataset`.

    Args:
        config: What to load.
        tokenizer: Hugging Face tokenizer.
        partition: How to split it.
        seq_len: Sequence length ``T``.
        pad_id: Optional padding id (see :func:`tokenize_dataset`).

    Returns:
        A :class:`FederatedDataset`.

    Raises:
        DataError: Any loading, label or partition error.
    """
    records = load_instruction_dataset(config)
    if partition.num_clients > len(records):
        raise DataError(
            f"more clients than examples: {partition.num_clients} clients but only "
            f"{len(records)} examples in {config.name}"
        )
    labels_all = dataset_labels(config.name, records, partition.label_kind)
    data = tokenize_dataset(records, tokenizer, seq_len, pad_id=pad_id)
    labels = labels_all[data.source_index]
    parts = make_partition(partition, len(data), labels)
    return FederatedDataset(config, partition, records, data, labels, parts)
