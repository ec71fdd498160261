"""One deployed node's side of a round, without Flower: its local training and the wire format.

A node of a real federation is the simulation's client ``i`` run on its own machine: the same
model, the same partition ``i`` of the same data (from the run's config and seed), the same
batches (``RoundBatcher``, keyed by seed, round and client id), the same optimizer and loss and
the same client step (``engine.make_client_step``), so a federation and the in-process
simulation of the same seeds and ranks give the same global adapter (``tests/test_deploy.py``).

On the wire a rank-``r`` client's factors travel at their own rank, not padded to ``r_max``:
``B`` as ``[d_out, r]`` and ``A`` as ``[r, d_in]`` per module (``pack`` / ``unpack``), float32,
which is what ``algorithms.comm_bytes`` counts.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax import engine, runtime
from fedhl_jax.config import TrainConfig
from fedhl_jax.lora import lora_scale, rank_mask

#: Array-name prefixes of the factors and of the shared base update in a message.
B_KEY, A_KEY, BASE_KEY = "B/", "A/", "base_delta/"


def pack(B: dict, A: dict, rank: int, factors=("A", "B")) -> dict[str, np.ndarray]:
    """A client's factors at its own rank, as host arrays named for a message.

    Args:
      B: ``{module: [d_out, r_max]}``.
      A: ``{module: [r_max, d_in]}``.
      rank: the client's rank ``r``.
      factors: which factors go (FFA-LoRA sends ``B`` only back).

    Returns:
      ``{"B/<module>": [d_out, r], "A/<module>": [r, d_in]}`` float32.
    """
    out = {}
    if "B" in factors:
        out.update({B_KEY + k: np.ascontiguousarray(np.asarray(b, np.float32)[:, :rank]) for k, b in B.items()})
    if "A" in factors:
        out.update({A_KEY + k: np.ascontiguousarray(np.asarray(a, np.float32)[:rank]) for k, a in A.items()})
    return out


def unpack(arrays: dict, shapes: dict, r_max: int, rank: int, *, fill: dict | None = None) -> tuple[dict, dict]:
    """The inverse of ``pack``: factors zero-padded back to ``r_max``.

    Args:
      arrays: ``{"B/<module>": [d_out, r], "A/<module>": [r, d_in]}`` host arrays.
      shapes: ``{module: (d_out, d_in)}``.
      r_max: padded rank.
      rank: the client's rank ``r``.
      fill: ``{"A": {module: [r_max, d_in]}, ...}`` for factors the message does not carry.

    Returns:
      ``(B {module: [d_out, r_max]}, A {module: [r_max, d_in]})`` float32 NumPy.

    Raises:
      ValueError: a factor is missing or has the wrong shape (the message names it).
    """
    B, A = {}, {}
    for k, (d_out, d_in) in shapes.items():
        for name, prefix, want, out in (("B", B_KEY, (d_out, rank), B), ("A", A_KEY, (rank, d_in), A)):
            if prefix + k not in arrays:
                if fill is not None and name in fill:
                    out[k] = np.asarray(fill[name][k], np.float32)
                    continue
                raise ValueError(f"the message has no {prefix + k}")
            x = np.asarray(arrays[prefix + k], np.float32)
            if x.shape != want:
                raise ValueError(f"{prefix + k} has shape {x.shape}; a rank-{rank} client sends {want}")
            full = np.zeros((d_out, r_max) if name == "B" else (r_max, d_in), np.float32)
            if name == "B":
                full[:, :rank] = x
            else:
                full[:rank] = x
            out[k] = full
    return B, A


class NodeTrainer:
    """Local training of one node: partition ``partition_id`` of the run's data at rank ``rank``.

    Args:
      cfg: the run's config (the same file as the server's).
      partition_id: the node's client id ``i`` in ``[0, fed.num_clients)``.
      rank: its LoRA rank.
      log: where progress messages go.

    Raises:
      ConfigError: a partition id or rank out of range (the message names it), or any error of
        the run's set-up.
    """

    def __init__(self, cfg: TrainConfig, partition_id: int, rank: int, *, log: Callable = lambda *_: None):
        from fedhl_jax.config import ConfigError
        from fedhl_jax.simulation import Simulation

        if not 0 <= partition_id < cfg.fed.num_clients:
            raise ConfigError(f"partition-id={partition_id} is outside [0, {cfg.fed.num_clients}) "
                              f"(fed.num_clients={cfg.fed.num_clients})")
        if not 1 <= rank <= cfg.fed.r_max:
            raise ConfigError(f"rank={rank} is outside [1, {cfg.fed.r_max}] (the largest of fed.ranks)")
        self.cfg, self.partition_id, self.rank = cfg, int(partition_id), int(rank)
        sim = Simulation(cfg, log=log, mesh=None)  # the same set-up as the simulation (nothing compiles here)
        self.sim = sim
        self.shapes, self.r_max = sim.shapes, cfg.fed.r_max
        self.num_examples = int(sim.data.num_examples[partition_id])
        self.mask = rank_mask(np.array([rank]), self.r_max)[0]  # [r_max]
        self.scale = lora_scale(np.array([rank]), cfg.model.alpha, rslora=cfg.model.rslora)[0]  # []
        client = engine.make_client_step(sim.algorithm, sim.loss, sim.optimizer, to_client=sim.to_client,
                                         from_client=sim.from_client)  # the simulation's client step

        def step(base, base_delta, B, A, mask, scale, *batch):
            if base_delta is not None:  # algorithms that move the base: the shared update, merged here
                base = sim.merge_delta(base, base_delta)
            trained, losses = client.train(base, B, A, mask, scale, *batch)
            return trained.B, trained.A, losses

        self._step = runtime.jit(step)

    def train(self, t: int, arrays: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Round ``t``: trains from the received factors and returns the factors to send back.

        Args:
          t: the global round (0-based; it keys the batches).
          arrays: the message's arrays (``pack`` of the starting factors, and
            ``base_delta/<module>`` ``[d_out, d_in]`` for algorithms that move the base).

        Returns:
          ``(reply, losses)``: ``pack`` of the trained factors (the trainable ones) and ``[K]``
          the loss before each local step.
        """
        B, A = unpack(arrays, self.shapes, self.r_max, self.rank)
        base_delta = {k[len(BASE_KEY):]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(BASE_KEY)} or None
        batch = self.sim.schedule.batches(t, np.array([self.partition_id]))
        batch = tuple(jnp.asarray(b[0]) for b in batch)  # [K, b, T]
        B, A, losses = self._step(self.sim.params, base_delta, B, A, self.mask, self.scale, *batch)
        reply = pack(jax.device_get(B), jax.device_get(A), self.rank, self.sim.algorithm.trainable)
        return reply, np.asarray(losses)


def run_settings(run_config: dict):
    """The run's ``TrainConfig`` from a Flower run config: ``config`` (a YAML path, "" for the
    defaults) and ``overrides`` (space-separated ``key=value``), the same on the server and the nodes.

    Raises:
      ConfigError / FileNotFoundError: as ``config.load_config``.
    """
    import shlex

    from fedhl_jax.config import load_config

    path = str(run_config.get("config", "") or "")
    return load_config(path or None, shlex.split(str(run_config.get("overrides", "") or "")))


def node_identity(node_config: dict) -> tuple[int, int]:
    """``(partition_id, rank)`` from a node's ``--node-config "partition-id=<i> rank=<r>"``.

    Raises:
      ValueError: a key is missing or not an integer (the message names it).
    """
    out = []
    for key in ("partition-id", "rank"):
        if key not in node_config:
            raise ValueError(f"the node config has no {key!r}; start the node with "
                             f"--node-config \"partition-id=<i> rank=<r>\" (it has {sorted(node_config)})")
        try:
            out.append(int(node_config[key]))
        except (TypeError, ValueError):
            raise ValueError(f"node config {key}={node_config[key]!r} is not an integer") from None
    return out[0], out[1]
