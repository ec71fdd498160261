"""One deployed node's side of a round, without Flower: its local training and the wire format.

A node of a real federation is the simulation's client ``i`` run on its own machine: the same
model, the same partition ``i`` of the same data (from the run's config and seed), the same
batches (``RoundBatcher``, keyed by seed, round and client id), the same optimizer and loss and
the same client step (``engine.make_client_step``), so a federation and the in-process
simulation of the same seeds and ranks give the same global adapter (``tests/test_deploy.py``).

On the wire a rank-``r`` client's factors travel at their own rank, not padded to ``r_max``:
``B`` as ``[d_out, r]`` and ``A`` as ``[r, d_in]`` per module (``pack`` / ``unpack``), float32,
which is what ``algorithms.comm_bytes`` counts.

Importing this module loads no JAX (a ``ClientApp`` that hands its rounds to a node worker,
``flower.worker``, never does); a ``NodeTrainer`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

if TYPE_CHECKING:  # JAX and the model load with a NodeTrainer, not with this module (see flower.worker)
    from fedhl_jax.config import TrainConfig

#: Array-name prefixes of the factors and of the shared base update in a message.
B_KEY, A_KEY, BASE_KEY = "B/", "A/", "base_delta/"
#: The records of a message: its arrays, its config and its metrics.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


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


def local_batcher(cfg: TrainConfig, path: str, tokenizer, *, log: Callable = lambda *_: None):
    """A node's own data: every row of its JSON Lines file (the dataset's fields), in file order.

    Nothing else is read: no held-out slice, no validation split, no partition; the file is the
    node's partition. Its batches are drawn as the simulation draws a client's (``RoundBatcher``,
    keyed by seed, round and the node's client id), so a node given the rows of the simulation's
    partition ``i`` in the partition's order trains on the simulation's batches of client ``i``.

    Args:
      cfg: the run's config (``data.dataset``, ``data.seq_len``, ``data.prompt_format``, ``optim``).
      path: the node's JSONL file.
      tokenizer: the model's tokenizer.

    Returns:
      ``(batcher, num_examples)``: a ``RoundBatcher`` whose every client id holds the file's
      rows (``[K, b, T]`` batches for any id), and the file's usable row count.

    Raises:
      DataError: a missing or malformed file, or no row that fits ``data.seq_len``.
    """
    import dataclasses

    from fedhl_jax.data.batching import RoundBatcher
    from fedhl_jax.data.federated import load_records
    from fedhl_jax.data.loading import DataError
    from fedhl_jax.data.prompts import resolve_prompt_format, tokenize_dataset

    dc = dataclasses.replace(cfg.data, source=str(path), eval_examples=0, validation_examples=0,
                             max_train_examples=None)
    rows, _ = load_records(dc, cfg.seed, log)
    fmt = resolve_prompt_format(dc.prompt_format, tokenizer)
    data = tokenize_dataset(rows, tokenizer, dc.seq_len, prompt_format=fmt, warn=False)
    log(f"node data: {path}: {data.truncation_report()}")
    if len(data) == 0:
        raise DataError(f"{path}: no row fits data.seq_len={dc.seq_len}")
    rows_idx = np.arange(len(data))
    o = cfg.optim
    batcher = RoundBatcher(data.tokens, data.loss_mask, [rows_idx] * cfg.fed.num_clients,
                           local_steps=o.local_steps, batch_size=o.batch_size, seed=cfg.seed)
    return batcher, len(data)


class NodeTrainer:
    """Local training of one node at rank ``rank``, as the simulation's client ``partition_id``.

    The node's data is either its own file (``data``: a JSON Lines file of the dataset's fields,
    the node's whole partition; nothing else is loaded) or, for experiments, the simulation's
    partition ``partition_id`` of the run's dataset (``data=None``: the whole dataset is loaded
    and partitioned as the simulation does). ``partition_id`` is the node's client id: it keys
    its batches and its place in the server's schedule.

    Args:
      cfg: the run's config (the same file as the server's).
      partition_id: the node's client id ``i`` in ``[0, fed.num_clients)``.
      rank: its LoRA rank.
      data: the node's own JSONL file, or None for the simulation's partition.
      ranks: ``[fed.num_clients]`` the ranks the nodes reported (the server sends them):
        ``data.partition=rank_correlated`` partitions follow them rather than ``fed.ranks``.
      log: where progress messages go.

    Raises:
      ConfigError: a partition id or rank out of range, ``rank_correlated`` partitions or a
        ``random`` or ``model.kind: nnx`` model (whose word-level tokenizer is built from the
        whole dataset) with a node's own file (each message names the value), or any error of
        the run's set-up.
    """

    def __init__(self, cfg: TrainConfig, partition_id: int, rank: int, *, data: str | None = None,
                 ranks=None, log: Callable = lambda *_: None):
        from fedhl_jax import engine, runtime
        from fedhl_jax.lora import lora_scale, rank_mask
        from fedhl_jax.build import build_algorithm, client_pieces
        from fedhl_jax.config import ConfigError
        from fedhl_jax.model import lora_targets
        from fedhl_jax.simulation import Simulation, load_model

        if not 0 <= partition_id < cfg.fed.num_clients:
            raise ConfigError(f"partition-id={partition_id} is outside [0, {cfg.fed.num_clients}) "
                              f"(fed.num_clients={cfg.fed.num_clients})")
        if not 1 <= rank <= cfg.fed.r_max:
            raise ConfigError(f"rank={rank} is outside [1, {cfg.fed.r_max}] (the largest of fed.ranks)")
        self.cfg, self.partition_id, self.rank, self.r_max = cfg, int(partition_id), int(rank), cfg.fed.r_max
        algorithm = build_algorithm(cfg.fed)
        bridge = None  # model.kind: nnx (fedhl_jax.nnx_bridge)
        if data is not None:
            if cfg.model.kind == "nnx":
                raise ConfigError(f"model.kind=nnx builds its word-level tokenizer from the whole dataset, which a "
                                  f"node holding only {data} does not have; use partition-id=<i> without data=... "
                                  f"(the simulation's partitions)")
            check_local_data(cfg, data)
            model_cfg, self.params, tokenizer, _ = load_model(cfg, [])
            self.shapes = lora_targets(model_cfg, cfg.model.targets)
            self.batches, self.num_examples = local_batcher(cfg, data, tokenizer, log=log)
        else:
            sim = Simulation(cfg, log=log, mesh=None)  # the simulation's set-up (nothing compiles here)
            model_cfg, self.params, self.shapes, bridge = sim.model_cfg, sim.params, sim.shapes, sim.nnx
            batcher, sizes = sim.schedule.batches, sim.data.num_examples
            if cfg.data.partition == "rank_correlated" and ranks is not None and list(ranks) != list(sim.ranks):
                from fedhl_jax.data.federated import build_federated_dataset

                fd = build_federated_dataset(cfg.data, sim.tokenizer, num_clients=cfg.fed.num_clients,
                                             seed=cfg.seed, ranks=np.asarray(ranks), log=log)
                batcher = fd.batcher(local_steps=cfg.optim.local_steps, batch_size=cfg.optim.batch_size,
                                     seed=cfg.seed)
                sizes = fd.num_examples
            self.batches, self.num_examples = batcher, int(sizes[partition_id])
        self.mask = rank_mask(np.array([rank]), self.r_max)[0]  # [r_max]
        self.scale = lora_scale(np.array([rank]), cfg.model.alpha, rslora=cfg.model.rslora)[0]  # []
        pieces = client_pieces(cfg, model_cfg, algorithm, bridge)
        runtime.set_cpu_matmul(cfg.model.cpu_matmul)
        client = engine.make_client_step(algorithm, pieces.loss, pieces.optimizer, to_client=pieces.to_client,
                                         from_client=pieces.from_client, length_bucket=pieces.length_bucket)
        self.trainable = algorithm.trainable

        def step(base, base_delta, B, A, mask, scale, *batch):
            if base_delta is not None:  # algorithms that move the base: the shared update, merged here
                base = pieces.merge_delta(base, base_delta)
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
        import jax
        import jax.numpy as jnp

        B, A = unpack(arrays, self.shapes, self.r_max, self.rank)
        base_delta = {k[len(BASE_KEY):]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(BASE_KEY)} or None
        batch = self.batches(t, np.array([self.partition_id]))
        batch = tuple(jnp.asarray(b[0]) for b in batch)  # [K, b, T]
        B, A, losses = self._step(self.params, base_delta, B, A, self.mask, self.scale, *batch)
        reply = pack(jax.device_get(B), jax.device_get(A), self.rank, self.trainable)
        return reply, np.asarray(losses)


def check_local_data(cfg: TrainConfig, data: str) -> None:
    """Refuses what a node holding only its own file cannot do, before anything loads.

    Raises:
      ConfigError: ``data.partition=rank_correlated`` (the node's file is its partition: there is
        none to derive from the ranks) or ``model.name_or_path=random`` (its tokenizer is built
        from the whole dataset's words, which no node holds).
    """
    from fedhl_jax.config import ConfigError

    if cfg.data.partition == "rank_correlated":
        raise ConfigError(f"data.partition=rank_correlated derives each client's partition from the ranks, but "
                          f"this node holds its own data file ({data}): its file is its partition. Use "
                          f"partition-id=<i> without data=... to keep the simulation's partitions, or another "
                          f"data.partition")
    if cfg.model.name_or_path == "random":
        raise ConfigError(f"model.name_or_path=random builds its tokenizer from the whole dataset, which a node "
                          f"holding only {data} does not have; use a model with its own tokenizer")


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


class NodeIdentity(NamedTuple):
    """What a node's ``--node-config`` says about it.

    Attributes:
      partition_id: its client id (None: the server numbers it).
      rank: its LoRA rank.
      data: its own JSONL file (None: the simulation's partition ``partition_id``).
      delay: ``(round, seconds)``: sleep before training that global round (trials of the round
        deadline), or None.
    """

    partition_id: int | None
    rank: int
    data: str | None = None
    delay: tuple[int, float] | None = None


def node_identity(node_config: dict) -> NodeIdentity:
    """A node's identity from ``--node-config``: ``rank=<r>`` and either ``data="<file.jsonl>"``
    (its own data; ``partition-id=<i>`` optional, fixing its client id) or ``partition-id=<i>``
    (the simulation's partition ``i`` of the run's dataset, for experiments). ``delay="<t>:<s>"``
    makes the node sleep ``s`` seconds before training global round ``t`` (trials of the deadline).

    Raises:
      ValueError: a key is missing or not of its type (the message names it and its value).
    """
    def integer(key):
        try:
            return int(node_config[key])
        except (TypeError, ValueError):
            raise ValueError(f"node config {key}={node_config[key]!r} is not an integer") from None

    usage = "start the node with --node-config \"rank=<r> data='<file.jsonl>'\" (or \"partition-id=<i> rank=<r>\")"
    if "rank" not in node_config:
        raise ValueError(f"the node config has no 'rank'; {usage} (it has {sorted(node_config)})")
    data = str(node_config["data"]) if str(node_config.get("data", "") or "") else None
    if "partition-id" not in node_config and data is None:
        raise ValueError(f"the node config has no 'partition-id' and no 'data'; {usage} (it has {sorted(node_config)})")
    partition_id = integer("partition-id") if "partition-id" in node_config else None
    delay = None
    if str(node_config.get("delay", "") or ""):
        try:
            t, seconds = str(node_config["delay"]).split(":")
            delay = (int(t), float(seconds))
        except ValueError:
            raise ValueError(f"node config delay={node_config['delay']!r} is not \"<round>:<seconds>\"") from None
    return NodeIdentity(partition_id, integer("rank"), data, delay)
