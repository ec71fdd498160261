"""The server of a real federation: any of this project's algorithms as a Flower ``Strategy``.

A round runs the same pure functions as the simulation's round (``engine.make_round_step``)::

    inputs, ids = ClientSchedule(node ranks, ...)(t)                         # the simulation's schedule
    B, A      = algorithm.broadcast(state, mask, scale, key_t)               # plan + materialize
    message_i = pack(B_i, A_i, r_i)  (+ base_delta)  -> node of partition i   # its own rank only
    ...the nodes train (flower.node.NodeTrainer: engine.make_client_step)...
    state     = algorithm.aggregate(state, B, A, mask, scale, n_i, fold_in(key_t, AGGREGATE_STREAM))

with ``key_t = engine.round_key(seed, t)`` and the global round ``t = start_round + server_round - 1``
(Flower counts the rounds of each call from 1; a resumed server continues after its checkpoint).
The replies are padded back into the ``[n, ...]`` client axis with the round's masks, so the
aggregation compiles once (``runtime.jit``, in the run's ``model.cpu_matmul`` mode). A node that
does not answer (killed, timed out, or replying with an error) is entered as a non-finite update,
which every algorithm's ``aggregate`` leaves out: the round aggregates the replies it got, with the
weights renormalised over them, and says so in the log and in its metrics (``missing``).

Each round's metrics are the simulation's record (``engine.round_metrics``) plus the bytes measured
on the messages; the run around the rounds (metrics file, checkpoints, export) is the driver's
(``server_app.FederationExecutor``, ``driver.run``).
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhl_jax import engine, runtime
from fedhl_jax.build import build_algorithm
from fedhl_jax.config import ConfigError, TrainConfig
from fedhl_jax.flower.node import BASE_KEY, pack, unpack

#: Message types besides Flower's ``train``: the node says who it is (partition id, rank).
QUERY = "query"
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def payload_bytes(arrays: dict) -> int:
    """Bytes of the array values (what ``algorithms.comm_bytes`` counts)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays of a Flower ``ArrayRecord`` (values plus per-array headers)."""
    return int(sum(len(a.data) for a in record.values()))


class FedLoRAStrategy(Strategy):
    """This project's algorithms behind Flower's ``configure_train`` / ``aggregate_train``.

    Args:
      cfg: the run's config (algorithm, ranks' bound, clients per round, seed, LoRA α).
      shapes: ``{module: (d_out, d_in)}`` of the LoRA modules.
      state: the server state to start from (``algorithm.init`` or a restored checkpoint; the
        driver's executor sets it before each round).
      start_round: global rounds already done (Flower's round 1 is global round ``start_round``).
      log: where messages go.

    After each ``aggregate_train``, ``last`` holds the round's ``engine.RoundRecord`` and
    ``history`` its metrics.

    The nodes are registered first (``discover`` over the grid, or ``register``): each says its
    partition id and rank; every partition ``0 .. fed.num_clients-1`` must have a node.
    """

    def __init__(self, cfg: TrainConfig, shapes: dict, state, *, start_round: int = 0, log: Callable = print):
        self.cfg, self.shapes, self.state = cfg, dict(shapes), state
        self.algorithm = build_algorithm(cfg.fed)
        self.r_max, self.start_round, self.log = cfg.fed.r_max, int(start_round), log
        self.nodes: dict[int, tuple[int, int]] = {}  # partition id -> (node id, rank)
        self._round = None
        self.history: list[dict] = []
        self.last: engine.RoundRecord | None = None
        algorithm = self.algorithm
        runtime.set_cpu_matmul(cfg.model.cpu_matmul)  # the server compiles in the run's mode, as the simulation
        self._broadcast = runtime.jit(algorithm.broadcast)
        self._aggregate = runtime.jit(lambda state, B, A, mask, scale, n, key:
                                      algorithm.aggregate(state, B, A, mask, scale, n, key=key))

    # ---------------------------------------------------------------- nodes
    def register(self, partition_id: int, node_id: int, rank: int) -> None:
        """Records the node that holds ``partition_id`` and its rank (checked)."""
        fed = self.cfg.fed
        if not 0 <= partition_id < fed.num_clients:
            raise ConfigError(f"node {node_id}: partition-id={partition_id} is outside [0, {fed.num_clients}) "
                              f"(fed.num_clients={fed.num_clients})")
        if partition_id in self.nodes and self.nodes[partition_id][0] != node_id:
            raise ConfigError(f"nodes {self.nodes[partition_id][0]} and {node_id} both say partition-id={partition_id}")
        try:
            self.algorithm.check_ranks(np.array([rank]))
        except ValueError as e:
            raise ConfigError(f"node {node_id} (partition-id={partition_id}): rank={rank}: {e}") from None
        self.nodes[int(partition_id)] = (int(node_id), int(rank))

    def discover(self, grid: Grid, timeout: float = 120.0) -> None:
        """Waits for ``fed.num_clients`` nodes and asks each for its partition id and rank.

        Raises:
          ConfigError: not enough nodes within ``timeout`` seconds, or a partition without a node
            (the message names them).
        """
        fed = self.cfg.fed
        deadline = time.time() + timeout
        while len(ids := list(grid.get_node_ids())) < fed.num_clients:
            if time.time() > deadline:
                raise ConfigError(f"{len(ids)} node(s) connected after {timeout:.0f} s; fed.num_clients="
                                  f"{fed.num_clients} needs one node per partition")
            time.sleep(1.0)
        queries = [Message(RecordDict({CONFIG: ConfigRecord({})}), node, QUERY) for node in ids]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error():
                self.log(f"node {reply.metadata.src_node_id} did not say who it is: {reply.error.reason}")
                continue
            m = reply.content[METRICS]
            self.register(int(m["partition-id"]), reply.metadata.src_node_id, int(m["rank"]))
        self.schedule()  # every partition has a node
        self.log("nodes: " + ", ".join(f"partition {p} -> node {n} (rank {r})" for p, (n, r) in sorted(self.nodes.items())))

    # ---------------------------------------------------------------- a round
    def global_round(self, server_round: int) -> int:
        """The 0-based global round of Flower's ``server_round`` (1-based, per call)."""
        return self.start_round + server_round - 1

    def schedule(self) -> engine.ClientSchedule:
        """The simulation's ``ClientSchedule`` over the registered nodes' ranks (the data sizes
        come with the replies; the batches are drawn on the nodes).

        Raises:
          ConfigError: a partition has no node yet.
        """
        fed = self.cfg.fed
        missing = sorted(set(range(fed.num_clients)) - set(self.nodes))
        if missing:
            raise ConfigError(f"no node holds partition-id {missing}; start one flower-supernode per partition "
                              f"with --node-config \"partition-id=<i> rank=<r>\"")
        ranks = np.array([self.nodes[i][1] for i in range(fed.num_clients)], np.int32)
        return engine.ClientSchedule(ranks, np.ones(fed.num_clients, np.float32), self.r_max, self.cfg.model.alpha,
                                     fed.clients_per_round, self.cfg.seed, rslora=self.cfg.model.rslora)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client: its starting factors at its own rank, and the round."""
        t = self.global_round(server_round)
        schedule = self.schedule()
        inputs, ids = schedule(t)  # the simulation's schedule: clients, masks [n, r_max], scales [n], key
        ranks = schedule.ranks[ids]
        mask, scale, key = inputs.mask, inputs.scale, inputs.key
        start = jax.device_get(self._broadcast(self.state, mask, scale, key))
        base_delta = {BASE_KEY + k: np.asarray(v, np.float32) for k, v in (start.base_delta or {}).items()}
        messages, down, wire = [], 0, 0
        for j, (i, r) in enumerate(zip(ids, ranks)):
            arrays = pack({k: b[j] for k, b in start.B.items()}, {k: a[j] for k, a in start.A.items()}, int(r))
            arrays.update(base_delta)
            record = array_record(arrays)
            down += payload_bytes(arrays)
            wire += wire_bytes(record)
            cfg = ConfigRecord({"round": int(t), "partition-id": int(i), "rank": int(r)})
            messages.append(Message(RecordDict({ARRAYS: record, CONFIG: cfg}), self.nodes[int(i)][0], "train"))
        self._round = dict(t=t, ids=ids, ranks=ranks, mask=mask, scale=scale, key=key, start=start,
                           bytes_down=down, wire_down=wire, t0=time.perf_counter())
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Pads the replies into the round's client axis and runs ``algorithm.aggregate``.

        A sampled client without a usable reply enters as a non-finite update, so the algorithm
        excludes it and renormalises the others' weights; the round says which ones.
        """
        rnd = self._round
        if rnd is None or rnd["t"] != self.global_round(server_round):
            raise RuntimeError(f"aggregate_train of round {server_round} without its configure_train")
        ids, ranks, n = rnd["ids"], rnd["ranks"], len(rnd["ids"])
        slot = {int(i): j for j, i in enumerate(ids)}
        B = {k: np.full((n, d_out, self.r_max), np.nan, np.float32) for k, (d_out, _) in self.shapes.items()}
        A = {k: np.full((n, self.r_max, d_in), np.nan, np.float32) for k, (_, d_in) in self.shapes.items()}
        num_examples = np.ones(n, np.float32)
        losses = np.full((n, self.cfg.optim.local_steps), np.nan, np.float32)
        got, problems, up, wire = set(), [], 0, 0
        for reply in replies:
            if reply.has_error():
                problems.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            m, record = reply.content[METRICS], reply.content[ARRAYS]
            pid = int(m["partition-id"])
            if pid not in slot or pid in got:
                problems.append(f"node {reply.metadata.src_node_id}: an unexpected reply for partition {pid}")
                continue
            j = slot[pid]
            arrays = {k: a.numpy() for k, a in record.items()}
            start = rnd["start"]
            sent = {"A": {k: a[j] for k, a in start.A.items()}, "B": {k: b[j] for k, b in start.B.items()}}
            try:
                b, a = unpack(arrays, self.shapes, self.r_max, int(ranks[j]), fill=sent)
            except ValueError as e:
                problems.append(f"node {reply.metadata.src_node_id} (partition {pid}): {e}")
                continue
            for k in self.shapes:
                B[k][j], A[k][j] = b[k], a[k]
            num_examples[j] = float(m["num-examples"])
            losses[j] = np.asarray(m["losses"], np.float32)
            up += payload_bytes(arrays)
            wire += wire_bytes(record)
            got.add(pid)
        missing = [int(i) for i in ids if int(i) not in got]
        with warnings.catch_warnings():
            if missing:  # the library's "non-finite update" warning would misname a missing reply
                warnings.filterwarnings("ignore", message=r"clients \[.*\] sent non-finite", category=RuntimeWarning)
            state, info = self._aggregate(self.state, B, A, rnd["mask"], rnd["scale"], jnp.asarray(num_examples),
                                          jax.random.fold_in(rnd["key"], engine.AGGREGATE_STREAM))
            state, info = jax.block_until_ready((state, info))
        self.state = state
        metrics = self._metrics(rnd, dict(info, losses=losses), missing, up, wire)
        for p in problems:
            self.log(f"round {rnd['t'] + 1}: {p}")
        if missing:
            self.log(f"round {rnd['t'] + 1}: aggregated {n - len(missing)} of {n} replies; clients {missing} did not "
                     f"answer and were left out, the weights of the others renormalised to sum to 1")
        self.last = engine.RoundRecord(rnd["t"], state, dict(info, losses=losses), ids, ranks, metrics)
        self.history.append(metrics)
        self._round = None
        summary = {k: metrics[k] for k in ("round", "bytes_down", "bytes_up", "excluded") if k in metrics}
        summary["train_loss"] = metrics["train_loss"] if np.isfinite(metrics["train_loss"]) else -1.0
        summary["replies"] = n - len(missing)
        return None, MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in summary.items()})

    def _metrics(self, rnd, info, missing, up, wire) -> dict:
        """The simulation's metrics record (``engine.round_metrics``) with the bytes measured on the
        messages: ``bytes_*`` (array values), ``wire_bytes_*`` (serialised), ``comm_bytes_*`` (what
        ``algorithm.comm_bytes`` expects of the clients that answered), and the ``missing`` clients."""
        answered = np.array([int(i) not in missing for i in rnd["ids"]])
        m = engine.round_metrics(rnd["t"], rnd["ids"], rnd["ranks"], info, self.algorithm, self.shapes,
                                 time.perf_counter() - rnd["t0"])
        _, up_expected = self.algorithm.comm_bytes(self.shapes, rnd["ranks"][answered])
        m.update(missing=missing, comm_bytes_down=m["bytes_down"], comm_bytes_up=up_expected,
                 bytes_down=rnd["bytes_down"], bytes_up=up, wire_bytes_down=rnd["wire_down"], wire_bytes_up=wire)
        return m

    # ---------------------------------------------------------------- no client-side evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        fed = self.cfg.fed
        self.log(f"{fed.algorithm}: {fed.clients_per_round} of {fed.num_clients} clients per round, r_max "
                 f"{self.r_max}, global rounds {self.start_round + 1}..{fed.rounds}")


def array_record(arrays: dict) -> ArrayRecord:
    """A Flower ``ArrayRecord`` of named host arrays."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
