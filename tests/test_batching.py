"""Per-round client batches (fedhl_jax.data.batching)."""

from __future__ import annotations

import numpy as np
import pytest

from fedhl_jax.data import DataError, RoundBatcher, iid_partition, make_round_batch, sample_clients

N, T = 200, 12


@pytest.fixture()
def data():
    # Row i holds the value i everywhere, so gathered rows reveal their index.
    tokens = np.repeat(np.arange(N, dtype=np.int32)[:, None], T, axis=1)
    mask = (np.arange(T)[None, :] >= 4).astype(np.float32).repeat(N, axis=0)
    parts = [
        np.arange(0, 100),       # client 0: 100 examples (enough)
        np.arange(100, 103),     # client 1: 3 examples (needs replacement)
        np.arange(103, 200),     # client 2: 97 examples
    ]
    return tokens, mask, parts


def test_shapes_and_dtypes(data):
    tokens, mask, parts = data
    b = RoundBatcher(tokens, mask, parts, local_steps=4, batch_size=5, seed=0)
    tk, mk = b(0, [0, 2])
    assert tk.shape == mk.shape == (2, 4, 5, T)
    assert tk.dtype == np.int32 and mk.dtype == np.float32
    # Same shape every round, whatever clients are sampled.
    for r in range(1, 6):
        ids = sample_clients(3, 2, r)
        assert b(r, ids)[0].shape == (2, 4, 5, T)


def test_rows_come_from_own_partition(data):
    tokens, mask, parts = data
    b = RoundBatcher(tokens, mask, parts, local_steps=4, batch_size=5)
    tk, mk = b(3, [0, 1, 2])
    for c in range(3):
        rows = tk[c, :, :, 0].ravel()
        assert set(rows.tolist()) <= set(parts[c].tolist())
        np.testing.assert_array_equal(tk[c], tokens[tk[c, :, :, 0]])
        np.testing.assert_array_equal(mk[c], mask[tk[c, :, :, 0]])


def test_without_replacement_when_enough(data):
    tokens, mask, parts = data
    b = RoundBatcher(tokens, mask, parts, local_steps=4, batch_size=5)
    idx = b.round_indices(7, [0, 2])
    for c in range(2):
        assert len(np.unique(idx[c])) == 20  # no repeats within the round


def test_with_replacement_when_too_few(data):
    tokens, mask, parts = data
    b = RoundBatcher(tokens, mask, parts, local_steps=4, batch_size=5)
    idx = b.client_indices(0, 1)
    assert idx.shape == (4, 5)
    assert set(idx.ravel().tolist()) <= {100, 101, 102}
    assert len(np.unique(idx)) <= 3  # 20 draws from 3 examples


def test_deterministic_and_independent_of_cosampled_clients(data):
    tokens, mask, parts = data
    b1 = RoundBatcher(tokens, mask, parts, local_steps=2, batch_size=3, seed=11)
    b2 = RoundBatcher(tokens, mask, parts, local_steps=2, batch_size=3, seed=11)
    np.testing.assert_array_equal(b1.round_indices(5, [0, 1, 2]), b2.round_indices(5, [0, 1, 2]))
    # Client 2's batch in round 5 is the same whoever else is sampled.
    np.testing.assert_array_equal(b1.round_indices(5, [0, 2])[1], b1.round_indices(5, [2])[0])
    # Different rounds / seeds give different batches.
    assert not np.array_equal(b1.round_indices(5, [0]), b1.round_indices(6, [0]))
    b3 = RoundBatcher(tokens, mask, parts, local_steps=2, batch_size=3, seed=12)
    assert not np.array_equal(b1.round_indices(5, [0]), b3.round_indices(5, [0]))


def test_make_round_batch_matches_class(data):
    tokens, mask, parts = data
    tk, mk = make_round_batch(tokens, mask, parts, 2, [1, 2], local_steps=3, batch_size=2, seed=5)
    tk2, mk2 = RoundBatcher(tokens, mask, parts, local_steps=3, batch_size=2, seed=5)(2, [1, 2])
    np.testing.assert_array_equal(tk, tk2)
    np.testing.assert_array_equal(mk, mk2)


def test_covers_all_examples_over_rounds():
    tokens = np.arange(50, dtype=np.int32)[:, None]
    mask = np.ones_like(tokens, dtype=np.float32)
    parts = iid_partition(50, 5, seed=0)
    b = RoundBatcher(tokens, mask, parts, local_steps=1, batch_size=10)
    # Each client has exactly 10 examples = one round's need: a permutation.
    for k in range(5):
        assert sorted(b.client_indices(0, k).ravel().tolist()) == parts[k].tolist()


def test_sample_clients():
    a = sample_clients(10, 4, round_idx=3, seed=1)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 4
    np.testing.assert_array_equal(a, sample_clients(10, 4, round_idx=3, seed=1))
    assert sample_clients(10, 10, 0).tolist() == list(range(10))
    rounds = {tuple(sample_clients(10, 4, r)) for r in range(20)}
    assert len(rounds) > 1
    with pytest.raises(DataError, match=r"clients_per_round must be in \[1, 10\], got 11"):
        sample_clients(10, 11, 0)


def test_errors(data):
    tokens, mask, parts = data
    with pytest.raises(DataError, match="must both be"):
        RoundBatcher(tokens, mask[:, :5], parts, local_steps=1, batch_size=1)
    with pytest.raises(DataError, match="client 1 has an empty partition"):
        RoundBatcher(tokens, mask, [parts[0], np.array([], np.int64)], local_steps=1, batch_size=1)
    with pytest.raises(DataError, match="outside"):
        RoundBatcher(tokens, mask, [np.array([N])], local_steps=1, batch_size=1)
    with pytest.raises(DataError, match=">= 1"):
        RoundBatcher(tokens, mask, parts, local_steps=0, batch_size=1)
    b = RoundBatcher(tokens, mask, parts, local_steps=1, batch_size=1)
    with pytest.raises(DataError, match="client id 3 outside"):
        b(0, [3])
