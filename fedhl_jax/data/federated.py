"""The one data path of a run: a :class:`fedhl_jax.config.DataConfig` → tokenised, labelled, partitioned data.

``load_records`` reads the training rows and the held-out rows (GSM8K's test split, else a seeded
held-out slice of the training file); ``build_federated_dataset`` labels, tokenises and
partitions them. The engine, the CLI, the results suite and the tests all go through these two.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import datasets
import numpy as np

from fedhl_jax.data.batching import RoundBatcher
from fedhl_jax.data.labels import dataset_labels
from fedhl_jax.data.loading import DataError, load_instruction_dataset, resolve_data_files
from fedhl_jax.data.partition import PartitionConfig, PartitionSummary, make_partition, partition_summary
from fedhl_jax.data.prompts import TokenizedDataset, resolve_prompt_format, tokenize_dataset
from fedhl_jax.data.registry import dataset_spec

if TYPE_CHECKING:
    from fedhl_jax.config import DataConfig

__all__ = ["DataConfig", "FederatedDataset", "build_federated_dataset", "load_records"]

def __getattr__(name: str):
    # ``DataConfig`` is defined with the rest of the run's schema in ``fedhl_jax.config`` (which
    # imports this package, so the name is resolved on first use, not at import).
    if name == "DataConfig":
        from fedhl_jax.config import DataConfig

        return DataConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_records(config: DataConfig, seed: int, log: Callable = lambda *_: None):
    """Training and held-out rows of ``config``.

    The files are found by ``loading.resolve_data_files`` (``data.data_dir``, ``$FEDHL_DATA_DIR``,
    the embedded copy for GSM8K, ``../shared/data``; the Hub only with ``data.source=hub``). The
    held-out rows are the dataset's ``eval_split`` (GSM8K: ``test``; ``data.registry``), else (and
    for an explicit file) a seeded held-out slice of the training rows.

    Returns:
      ``(train, eval)`` ``datasets.Dataset``; ``eval`` is None with ``eval_examples=0``.

    Raises:
      DataError: a missing file or folder (naming it and the ways to fix it), or bad rows.
    """
    files = resolve_data_files(config.dataset, config.data_dir, config.source, "train")
    log(f"data: {files.description}")
    train = load_instruction_dataset(files.data_config())
    split = dataset_spec(config.dataset).eval_split
    if split is not None and files.origin != "path":
        test = resolve_data_files(config.dataset, config.data_dir, config.source, split)
        test = load_instruction_dataset(test.data_config())
        test = test.select(range(min(config.eval_examples, len(test)))) if config.eval_examples else None
    else:  # hold out the last eval_examples rows of a seeded shuffle
        order = np.random.default_rng([seed, 0xE7A1]).permutation(len(train))
        n_eval = min(config.eval_examples, max(len(train) // 5, 1)) if config.eval_examples else 0
        test = train.select(order[len(order) - n_eval:]) if n_eval else None
        train = train.select(np.sort(order[: len(order) - n_eval]))
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        train = train.select(range(config.max_train_examples))
    return train, test


@dataclasses.dataclass
class FederatedDataset:
    """A tokenised dataset split across clients.

    Attributes:
      config: the data configuration.
      partition_config: the partition configuration.
      records: training rows (all loaded, before dropping).
      data: tokenised arrays of the kept training rows (``N`` of them).
      labels: ``[N]`` labels of the kept rows.
      partitions: one index array (into ``data``) per client.
      eval: tokenised held-out rows, or None.
      validation: tokenised validation rows (``data.validation_examples`` training rows that no
        client holds), or None.
    """

    config: DataConfig
    partition_config: PartitionConfig
    records: datasets.Dataset
    data: TokenizedDataset
    labels: np.ndarray
    partitions: list[np.ndarray]
    eval: TokenizedDataset | None = None
    validation: TokenizedDataset | None = None

    @property
    def num_clients(self) -> int:
        return len(self.partitions)

    @property
    def num_examples(self) -> np.ndarray:
        """``[num_clients]`` float32 local data sizes."""
        return np.array([len(p) for p in self.partitions], np.float32)

    def summary(self) -> PartitionSummary:
        """Examples and label mix per client."""
        return partition_summary(self.partitions, self.labels, self.partition_config.ranks)

    def batcher(self, *, local_steps: int, batch_size: int, seed: int = 0) -> RoundBatcher:
        """A :class:`RoundBatcher` over this dataset's partitions (static ``[n, K, b, T]`` batches)."""
        return RoundBatcher(self.data.tokens, self.data.loss_mask, self.partitions,
                            local_steps=local_steps, batch_size=batch_size, seed=seed)


#: The stream of the validation split's shuffle (independent of the run's seed).
VALIDATION_STREAM = 0x7A11D


def split_validation(train, n: int):
    """Sets ``n`` training rows aside as a validation split.

    The rows are the last ``n`` of a fixed shuffle of the training rows (the same for every seed,
    so every run of a comparison is tuned on the same rows); the rest keep their order.

    Args:
      train: the training rows (``datasets.Dataset``).
      n: validation rows (0: none).

    Returns:
      ``(train, validation)``; ``validation`` is None when ``n`` is 0.

    Raises:
      DataError: ``n`` leaves no training row.
    """
    if n == 0:
        return train, None
    if n >= len(train):
        raise DataError(f"data.validation_examples={n} leaves no training rows: the training split has {len(train)}")
    order = np.random.default_rng(VALIDATION_STREAM).permutation(len(train))
    return train.select(np.sort(order[: len(train) - n])), train.select(order[len(train) - n:])


def build_federated_dataset(config: DataConfig, tokenizer: Any, *, num_clients: int, seed: int = 0,
                            ranks=None, records=None, pad_id: int | None = None,
                            log: Callable = lambda *_: None) -> FederatedDataset:
    """Loads, labels, tokenises and partitions a dataset.

    The client count is checked right after loading and again after tokenisation (rows whose
    response does not fit ``seq_len`` are dropped). Labels are computed on all rows and then
    restricted to the kept ones.

    Args:
      config: what to load and how to split it.
      tokenizer: Hugging Face tokenizer.
      num_clients: ``C``.
      seed: the run's seed (held-out slice, partition).
      ranks: ``[C]`` client ranks (needed by ``rank_correlated``; shown in the summary).
      records: ``(train, eval)`` from ``load_records`` if already loaded.
      pad_id: optional padding id (see :func:`tokenize_dataset`).
      log: where progress messages go.

    Returns:
      A :class:`FederatedDataset`.

    Raises:
      DataError: any loading, label or partition error, or more clients than examples.
    """
    train, test = load_records(config, seed, log) if records is None else records
    train, val = split_validation(train, config.validation_examples)
    if num_clients > len(train):
        raise DataError(f"fed.num_clients={num_clients} is more than the {len(train)} training examples of "
                        f"{config.dataset}")
    labels_all = dataset_labels(config.dataset, train, config.label_kind)
    try:
        fmt = resolve_prompt_format(config.prompt_format, tokenizer)
    except ValueError as e:
        raise DataError(str(e)) from None
    described = "the model's chat template" if fmt == "chat" else "the Alpaca template"
    log(f"prompts: {described} (data.prompt_format={config.prompt_format}); loss on the response tokens only")
    data = tokenize_dataset(train, tokenizer, config.seq_len, pad_id=pad_id, prompt_format=fmt, warn=False)
    log(f"train: {data.truncation_report()}")
    if num_clients > len(data):
        raise DataError(f"fed.num_clients={num_clients} is more than the {len(data)} training examples of "
                        f"{config.dataset} that fit data.seq_len={config.seq_len}")
    labels = labels_all[data.source_index]
    ranks = None if ranks is None else tuple(int(r) for r in ranks)
    pcfg = PartitionConfig(kind=config.partition, num_clients=num_clients, seed=seed, alpha=config.dirichlet_alpha,
                           ranks=ranks if config.partition == "rank_correlated" else None,
                           label_kind=config.label_kind)
    parts = make_partition(pcfg, len(data), labels)
    pcfg = dataclasses.replace(pcfg, ranks=ranks) if config.partition != "rank_correlated" and ranks else pcfg
    ev = (tokenize_dataset(test, tokenizer, config.seq_len, pad_id=pad_id, prompt_format=fmt, warn=False)
          if test is not None and len(test) else None)
    if ev is not None:
        log(f"held-out: {ev.truncation_report()}")
    va = tokenize_dataset(val, tokenizer, config.seq_len, pad_id=pad_id, prompt_format=fmt, warn=False) if val else None
    if va is not None:
        log(f"validation: {va.truncation_report()}")
    return FederatedDataset(config, pcfg, train, data, labels, parts, ev, va)
