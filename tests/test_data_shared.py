"""Integration test on the real data and tokenizer in ../shared (skipped when absent).

Run with ``-s`` to see the partition summaries and truncation counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedhl_jax.data import (
    DataConfig,
    DataError,
    DataSource,
    build_federated_dataset,
    default_data_dir,
    label_counts,
    load_instruction_dataset,
    plot_partition_summary,
    resolve_data_dir,
    sample_clients,
    tokenize_dataset,
    validate_partition,
)

pytestmark = pytest.mark.shared

try:
    DATA_DIR = resolve_data_dir()
except DataError:
    DATA_DIR = None
SHARED_DIR = Path(os.environ.get("FEDHL_SHARED_DIR", default_data_dir().parent))
MODEL_DIR = SHARED_DIR / "models" / "stories260K-hf"

needs_data = pytest.mark.skipif(
    DATA_DIR is None or not (DATA_DIR / "gsm8k" / "train.jsonl").is_file(),
    reason="real data not found (../shared/data or $FEDHL_DATA_DIR)",
)
needs_model = pytest.mark.skipif(
    not (MODEL_DIR / "tokenizer.json").is_file(),
    reason="stories260K tokenizer not found in ../shared/models",
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@needs_data
@pytest.mark.parametrize(
    "name, split, rows",
    [
        ("gsm8k", "train", 7473),
        ("gsm8k", "test", 1319),
        ("codealpaca", "train", 2017),
        ("codealpaca", "new", 4535),
        ("codealpaca", "all", 2017 + 4535),
        ("dolly", "train", 151),
    ],
)
def test_real_counts(name, split, rows):
    ds = load_instruction_dataset(DataSource(name, split=split))
    assert len(ds) == rows
    assert ds.column_names == ["instruction", "input", "output"]  # the Dolly subset has no category
    if name == "gsm8k":
        assert all("####" in o for o in ds["output"][:])
    if name == "dolly":
        assert sum(1 for x in ds["input"][:] if x) == 47


CASES = [
    (DataSource("gsm8k"), DataConfig("gsm8k", seq_len=512, partition="dirichlet", dirichlet_alpha=0.5), 10, None),
    (DataSource("codealpaca", split="all"), DataConfig("codealpaca", seq_len=512, partition="meta"), 10, None),
    (DataSource("dolly"), DataConfig("dolly", seq_len=512, partition="rank_correlated"), 6, (2, 2, 4, 8, 8, 16)),
]


@needs_data
@needs_model
@pytest.mark.parametrize("source, data_cfg, clients, ranks", CASES, ids=[c[0].name for c in CASES])
def test_real_federated_dataset(tokenizer, source, data_cfg, clients, ranks, tmp_path):
    records = (load_instruction_dataset(source), None)
    fed = build_federated_dataset(data_cfg, tokenizer, num_clients=clients, seed=0, ranks=ranks, records=records)
    part_cfg = fed.partition_config
    d = fed.data
    print(f"\n== {source.name} ({source.split}), {part_cfg.kind} partition ==")
    print(d.truncation_report())
    print("labels:", label_counts(fed.labels))
    print(fed.summary())

    assert len(d) + d.n_dropped == len(fed.records)
    assert d.tokens.shape == d.loss_mask.shape == (len(d), 512)
    assert d.n_boundary_mismatch == 0
    assert (d.tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (d.loss_mask.sum(axis=1) > 0).all()
    validate_partition(fed.partitions, len(d))
    assert len(fed.labels) == len(d)

    # Targets of a non-truncated example decode to the reference followed by EOS.
    i = int(np.nonzero(~d.truncated)[0][0])
    target = d.tokens[i][d.loss_mask[i] > 0]
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]).strip() == d.references[i].strip()
    # The prompt ids are the tokens before the first target.
    first = int(np.argmax(d.loss_mask[i] > 0))
    assert d.prompt_ids[i].tolist() == d.tokens[i, :first].tolist()

    batcher = fed.batcher(local_steps=2, batch_size=4, seed=0)
    tk, mk = batcher(0, sample_clients(fed.num_clients, 3, 0))
    assert tk.shape == mk.shape == (3, 2, 4, 512)

    if part_cfg.kind == "rank_correlated":  # private labels only on the two rank-2 clients
        per_client = [set(fed.labels[p]) for p in fed.partitions]
        private = per_client[0] | per_client[1]
        assert private and not private & set().union(*per_client[2:])

    png = plot_partition_summary(fed.partitions, fed.labels, tmp_path / "p.png", ranks=part_cfg.ranks)
    assert png.stat().st_size > 0


@needs_data
@needs_model
@pytest.mark.parametrize(
    "name, split", [("gsm8k", "train"), ("gsm8k", "test"), ("codealpaca", "train"),
                    ("codealpaca", "new"), ("dolly", "train")],
)
def test_real_truncation_counts(tokenizer, name, split):
    ds = load_instruction_dataset(DataSource(name, split=split))
    reports = {}
    for seq in (256, 512):
        d = tokenize_dataset(ds, tokenizer, seq)
        assert len(d) + d.n_dropped == len(ds)
        assert d.n_truncated == int((d.full_lengths > seq).sum())
        reports[seq] = (d.n_truncated, d.n_dropped)
        print(f"\n{name}/{split}: {d.truncation_report()}")
    # A longer sequence never truncates or drops more.
    assert reports[512][0] + reports[512][1] <= reports[256][0] + reports[256][1]
    assert reports[512][1] <= reports[256][1]
