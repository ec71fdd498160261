"""Deterministic per-round client batches with static shapes.

For round ``r`` and sampled clients ``[k_1, ..., k_C]``, each client draws
``local_steps * batch_size`` example indices from its own partition with an
RNG seeded by ``(seed, r, k)``, so a client's batch does not depend on which
other clients were sampled. Draws are *without* replacement within the round
when the client has at least ``local_steps * batch_size`` examples and *with*
replacement otherwise. The token rows are then gathered in one NumPy indexing
operation, giving arrays of the same shape every round, so a jitted training
step never recompiles.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedhl_jax.data.loading import DataError

__all__ = ["RoundBatcher", "make_round_batch", "sample_clients"]


def sample_clients(num_clients: int, clients_per_round: int, round_idx: int, seed: int = 0) -> np.ndarray:
    """Samples the participating clients of a round, without replacement.

    Args:
        num_clients: Total clients ``K``.
        clients_per_round: ``C <= K``.
        round_idx: Round number (part of the RNG seed).
        seed: Base seed.

    Returns:
        ``[C]`` sorted int64 client ids.

    Raises:
        DataError: ``clients_per_round`` outside ``[1, num_clients]``.
    """
    if not 1 <= clients_per_round <= num_clients:
        raise DataError(
            f"clients_per_round must be in [1, {num_clients}], got {clients_per_round}"
        )
    rng = np.random.default_rng([seed, round_idx, 0x5A3])
    return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False)).astype(np.int64)


class RoundBatcher:
    """Builds the ``[clients, local_steps, batch, seq]`` arrays of each round.

    Args:
        tokens: ``[N, T]`` token ids.
        loss_mask: ``[N, T]`` target mask (same shape as ``tokens``).
        partitions: One index array (into ``N``) per client.
        local_steps: Optimiser steps per client per round ``S``.
        batch_size: Examples per step ``B``.
        seed: Base seed.

    Raises:
        DataError: Shape mismatch, an empty or out-of-range partition, or
            non-positive ``local_steps``/``batch_size``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        loss_mask: np.ndarray,
        partitions: Sequence[np.ndarray],
        *,
        local_steps: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        tokens = np.asarray(tokens)
        loss_mask = np.asarray(loss_mask)
        if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
            raise DataError(
                f"tokens and loss_mask must both be [N, T]; got {tokens.shape} and {loss_mask.shape}"
            )
        if local_steps < 1 or batch_size < 1:
            raise DataError(
                f"local_steps and batch_size must be >= 1, got {local_steps} and {batch_size}"
            )
        n = tokens.shape[0]
        parts = []
        for k, p in enumerate(partitions):
            p = np.asarray(p, dtype=np.int64)
            if p.size == 0:
                raise DataError(f"client {k} has an empty partition")
            if p.min() < 0 or p.max() >= n:
                raise DataError(f"client {k} has an index outside [0, {n})")
            parts.append(p)
        if not parts:
            raise DataError("no client partitions given")
        self.tokens = tokens
        self.loss_mask = loss_mask
        self.partitions = parts
        self.local_steps = int(local_steps)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    @property
    def num_clients(self) -> int:
        """Number of clients ``K``."""
        return len(self.partitions)

    @property
    def examples_per_round(self) -> int:
        """``local_steps * batch_size``."""
        return self.local_steps * self.batch_size

    def client_indices(self, round_idx: int, client_id: int) -> np.ndarray:
        """Example indices of one client in one round.

        Args:
            round_idx: Round number.
            client_id: Client id in ``[0, K)``.

        Returns:
            ``[S, B]`` int64 indices into ``tokens``.
        """
        if not 0 <= client_id < self.num_clients:
            raise DataError(f"client id {client_id} outside [0, {self.num_clients})")
        part = self.partitions[client_id]
        need = self.examples_per_round
        rng = np.random.default_rng([self.seed, round_idx, client_id])
        if len(part) >= need:
            pick = rng.permutation(len(part))[:need]
        else:
            pick = rng.integers(0, len(part), size=need)
        return part[pick].reshape(self.local_steps, self.batch_size)

    def round_indices(self, round_idx: int, client_ids: Sequence[int]) -> np.ndarray:
        """Stacks :meth:`client_indices` for the sampled clients.

        Args:
            round_idx: Round number.
            client_ids: ``C`` client ids.

        Returns:
            ``[C, S, B]`` int64 indices.
        """
        ids = [int(k) for k in np.asarray(client_ids).reshape(-1)]
        if not ids:
            raise DataError("no clients sampled for the round")
        return np.stack([self.client_indices(round_idx, k) for k in ids])

    def __call__(self, round_idx: int, client_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Gathers the round's batches.

        Args:
            round_idx: Round number.
            client_ids: ``C`` sampled client ids.

        Returns:
            ``(tokens [C, S, B, T], loss_mask [C, S, B, T])`` with the dtypes
            of the source arrays.
        """
        idx = self.round_indices(round_idx, client_ids)
        return self.tokens[idx], self.loss_mask[idx]


def make_round_batch(
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    partitions: Sequence[np.ndarray],
    round_idx: int,
    client_ids: Sequence[int],
    *,
    local_steps: int,
    batch_size: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Functional form of :class:`RoundBatcher` (same arguments and result).

    Args:
        tokens: ``[N, T]`` token ids.
        loss_mask: ``[N, T]`` target mask.
        partitions: One index array per client.
        round_idx: Round number.
        client_ids: ``C`` sampled client ids.
        local_steps: ``S``.
        batch_size: ``B``.
        seed: Base seed.

    Returns:
        ``(tokens [C, S, B, T], loss_mask [C, S, B, T])``.
    """
    batcher = RoundBatcher(
        tokens, loss_mask, partitions, local_steps=local_steps, batch_size=batch_size, seed=seed
    )
    return batcher(round_idx, client_ids)
