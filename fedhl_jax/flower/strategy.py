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
weights renormalised over them, and says so in the log and in its metrics (``missing``). A reply
to another round (a straggler's, after the deadline) is dropped; a round with fewer usable
replies than ``RoundPolicy.quorum`` is not aggregated (``short_round``).

Each round's metrics are the simulation's record (``engine.round_metrics``) plus the bytes measured
on the messages (array payload and Flower's serialised ``wire_bytes``) and the nodes' timings; the run around the rounds (metrics file, checkpoints, export) is the driver's
(``server_app.FederationExecutor``, ``driver.run``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhl_jax import engine, runtime
from fedhl_jax.build import build_algorithm
from fedhl_jax.config import ConfigError, TrainConfig
from fedhl_jax.flower.node import ARRAYS, BASE_KEY, CONFIG, METRICS, pack, unpack
from fedhl_jax.flower.wire import from_record, to_record

#: Message types besides Flower's ``train``: the node says who it is (partition id, rank).
QUERY = "query"


def payload_bytes(arrays: dict) -> int:
    """Bytes of the array values (what ``algorithms.comm_bytes`` counts)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def wire_bytes(message: Message) -> int:
    """Bytes of a Flower ``Message`` as Flower 1.42 sends it: the serialised objects of its tree
    (message, record dict, records, arrays and array chunks, each ``deflate()``-d with its header,
    once per object id), before gRPC framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))


@dataclasses.dataclass(frozen=True)
class RoundPolicy:
    """What a round needs to be aggregated, and what happens when it gets less.

    Attributes:
      min_replies: replies a round needs (at least 1).
      min_fraction: fraction of the round's sampled clients it needs, in ``[0, 1]``; the quorum
        is ``max(min_replies, ceil(min_fraction * n))``.
      on_short_round: ``skip`` (the round is not aggregated, the state is kept, the run goes on)
        or ``stop`` (the run stops; its last checkpoint is kept).
      deadline: seconds a round waits for its replies; a reply after it is dropped, never applied
        to a later round.
    """

    min_replies: int = 1
    min_fraction: float = 0.0
    on_short_round: str = "skip"
    deadline: float = 600.0

    def __post_init__(self):
        if int(self.min_replies) != self.min_replies or self.min_replies < 1:
            raise ConfigError(f"min-replies must be an integer >= 1, got {self.min_replies!r}")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ConfigError(f"min-reply-fraction must be in [0, 1], got {self.min_fraction!r}")
        if self.on_short_round not in ("skip", "stop"):
            raise ConfigError(f"on-short-round must be 'skip' or 'stop', got {self.on_short_round!r}")
        if not self.deadline > 0:
            raise ConfigError(f"round-timeout must be > 0 seconds, got {self.deadline!r}")

    @classmethod
    def from_run_config(cls, rc) -> "RoundPolicy":
        """From a Flower run config: ``min-replies``, ``min-reply-fraction``, ``on-short-round``,
        ``round-timeout`` (missing keys keep the defaults).

        Raises:
          ConfigError: a value out of range or not a number (the message names it).
        """
        def number(key, kind, default):
            try:
                return kind(rc.get(key, default))
            except (TypeError, ValueError):
                raise ConfigError(f"{key}={rc.get(key)!r} is not a number") from None

        return cls(number("min-replies", float, 1), number("min-reply-fraction", float, 0.0),
                   str(rc.get("on-short-round", "skip")), number("round-timeout", float, 600.0))

    def quorum(self, n: int) -> int:
        """Replies a round of ``n`` sampled clients needs.

        Raises:
          ConfigError: the quorum exceeds ``n``.
        """
        q = max(int(self.min_replies), math.ceil(self.min_fraction * n - 1e-9))
        if q > n:
            raise ConfigError(f"min-replies={int(self.min_replies)} (min-reply-fraction={self.min_fraction}) needs "
                              f"{q} replies, but a round samples {n} clients")
        return q


class FedLoRAStrategy(Strategy):
    """This project's algorithms behind Flower's ``configure_train`` / ``aggregate_train``.

    Args:
      cfg: the run's config (algorithm, ranks' bound, clients per round, seed, LoRA α).
      shapes: ``{module: (d_out, d_in)}`` of the LoRA modules.
      state: the server state to start from (``algorithm.init`` or a restored checkpoint; the
        driver's executor sets it before each round).
      start_round: global rounds already done (Flower's round 1 is global round ``start_round``).
      policy: the rounds' quorum, deadline and what a round below quorum does (``RoundPolicy``).
      log: where messages go.

    After each ``aggregate_train``, ``last`` holds the round's ``engine.RoundRecord`` and
    ``history`` its metrics.

    The nodes are registered first (``discover`` over the grid, or ``register``): each says its
    rank and, optionally, its partition id (its client id); the nodes that hold their own data
    without one take the free ids in order of rank, then node id. Every client id
    ``0 .. fed.num_clients-1`` must have a node.
    """

    def __init__(self, cfg: TrainConfig, shapes: dict, state, *, start_round: int = 0,
                 policy: RoundPolicy | None = None, log: Callable = print):
        self.cfg, self.shapes, self.state = cfg, dict(shapes), state
        self.policy = policy or RoundPolicy()
        self.quorum = self.policy.quorum(cfg.fed.clients_per_round)  # checked before any node is asked
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
        unnumbered, own_data = [], []
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.log(f"node {node} did not say who it is: {reply.error.reason}")
                continue
            m = reply.content[METRICS]
            pid, rank = int(m["partition-id"]), int(m["rank"])
            if int(m.get("own-data", 0)):
                own_data.append(node)
            if pid >= 0:
                self.register(pid, node, rank)
            else:
                unnumbered.append((node, rank))
        if own_data and self.cfg.data.partition == "rank_correlated":
            raise ConfigError(f"data.partition=rank_correlated derives partitions from the ranks, but nodes "
                              f"{sorted(own_data)} hold their own data files; use another data.partition")
        free = sorted(set(range(fed.num_clients)) - set(self.nodes))
        unnumbered.sort(key=lambda nr: (nr[1], nr[0]))  # by rank, then node id
        for (node, rank), pid in zip(unnumbered, free):
            self.register(pid, node, rank)
        for node, _ in unnumbered[len(free):]:
            self.log(f"node {node}: every client id is taken (fed.num_clients={fed.num_clients}); it is left out")
        self.schedule()  # every client id has a node
        self.log("nodes: " + ", ".join(f"client {p} -> node {n} (rank {r})" for p, (n, r) in sorted(self.nodes.items())))

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
            raise ConfigError(f"no node holds client id(s) {missing}; start one flower-supernode per client with "
                              f"--node-config \"rank=<r> data='<file.jsonl>'\" (or \"partition-id=<i> rank=<r>\")")
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
        every_rank = [self.nodes[i][1] for i in range(self.cfg.fed.num_clients)]
        messages, down = [], 0
        for j, (i, r) in enumerate(zip(ids, ranks)):
            arrays = pack({k: b[j] for k, b in start.B.items()}, {k: a[j] for k, a in start.A.items()}, int(r))
            arrays.update(base_delta)
            down += payload_bytes(arrays)
            cfg = ConfigRecord({"round": int(t), "partition-id": int(i), "rank": int(r)})
            if self.cfg.data.partition == "rank_correlated":  # the partitions follow the nodes' ranks
                cfg["ranks"] = every_rank
            messages.append(Message(RecordDict({ARRAYS: array_record(arrays), CONFIG: cfg}), self.nodes[int(i)][0],
                                    "train"))
        wire = sum(wire_bytes(m) for m in messages)
        self._round = dict(t=t, ids=ids, ranks=ranks, mask=mask, scale=scale, key=key, start=start,
                           bytes_down=down, wire_down=wire, t0=time.perf_counter())
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Pads the replies into the round's client axis and runs ``algorithm.aggregate``.

        A sampled client without a usable reply enters as a non-finite update, so the algorithm
        excludes it and renormalises the others' weights; the round says which ones. A reply to
        another round (a straggler's, after its deadline) is dropped. With fewer usable replies
        than the policy's quorum the round is not aggregated: the state is kept and the metrics
        say ``short_round`` (``FederationExecutor`` then goes on or stops, as the policy says).
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
        timings = np.full((3, n), np.nan)  # the nodes' train-seconds, node-seconds and start-seconds
        got, problems, up, wire = set(), [], 0, 0
        for reply in replies:
            if reply.has_error():
                problems.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            m, record = reply.content[METRICS], reply.content[ARRAYS]
            pid = int(m["partition-id"])
            if "round" in m and int(m["round"]) != rnd["t"]:
                problems.append(f"node {reply.metadata.src_node_id}: a late reply of round {int(m['round']) + 1} "
                                f"dropped")
                continue
            if pid not in slot or pid in got:
                problems.append(f"node {reply.metadata.src_node_id}: an unexpected reply for partition {pid}")
                continue
            j = slot[pid]
            start = rnd["start"]
            sent = {"A": {k: a[j] for k, a in start.A.items()}, "B": {k: b[j] for k, b in start.B.items()}}
            try:  # a damaged layout or a factor of the wrong shape: the reply is left out, by name
                arrays = from_record(record)
                b, a = unpack(arrays, self.shapes, self.r_max, int(ranks[j]), fill=sent)
            except ValueError as e:
                problems.append(f"node {reply.metadata.src_node_id} (partition {pid}): {e}")
                continue
            for k in self.shapes:
                B[k][j], A[k][j] = b[k], a[k]
            num_examples[j] = float(m["num-examples"])
            losses[j] = np.asarray(m["losses"], np.float32)
            timings[:, j] = [float(m.get(k, np.nan)) for k in ("train-seconds", "node-seconds", "start-seconds")]
            up += payload_bytes(arrays)
            wire += wire_bytes(reply)
            got.add(pid)
        missing = [int(i) for i in ids if int(i) not in got]
        for p in problems:
            self.log(f"round {rnd['t'] + 1}: {p}")
        short = len(got) < self.quorum
        if short:  # below quorum: no aggregate, the state is kept
            state = self.state
            info = {"p": np.zeros(n, np.float32), "valid": np.array([int(i) in got for i in ids]),
                    "applied": False, "losses": losses}
            self.log(f"round {rnd['t'] + 1}: {len(got)} of {n} replies, below the quorum of {self.quorum} "
                     f"(min-replies); the round is not aggregated, the server state is kept "
                     f"(on-short-round={self.policy.on_short_round})")
        else:
            with warnings.catch_warnings():
                if missing:  # the library's "non-finite update" warning would misname a missing reply
                    warnings.filterwarnings("ignore", message=r"clients \[.*\] sent non-finite",
                                            category=RuntimeWarning)
                state, info = self._aggregate(self.state, B, A, rnd["mask"], rnd["scale"], jnp.asarray(num_examples),
                                              jax.random.fold_in(rnd["key"], engine.AGGREGATE_STREAM))
                state, info = jax.block_until_ready((state, info))
            info = dict(info, losses=losses)
            if missing:
                self.log(f"round {rnd['t'] + 1}: aggregated {n - len(missing)} of {n} replies; clients {missing} did "
                         f"not answer and were left out, the weights of the others renormalised to sum to 1")
        self.state = state
        metrics = self._metrics(rnd, info, missing, up, wire)
        metrics.update(short_round=short, node_train_seconds=timings[0], node_seconds=timings[1],
                       node_start_seconds=timings[2])
        self.last = engine.RoundRecord(rnd["t"], state, info, ids, ranks, metrics)
        self.history.append(metrics)
        self._round = None
        summary = {k: metrics[k] for k in ("round", "bytes_down", "bytes_up", "wire_bytes_down", "wire_bytes_up",
                                           "excluded") if k in metrics}
        summary["train_loss"] = metrics["train_loss"] if np.isfinite(metrics["train_loss"]) else -1.0
        summary["replies"] = n - len(missing)
        return None, MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in summary.items()})

    def _metrics(self, rnd, info, missing, up, wire) -> dict:
        """The simulation's metrics record (``engine.round_metrics``) with the bytes measured on the
        messages: ``bytes_*`` (array values), ``wire_bytes_*`` (the messages as Flower serialises
        them, ``wire_bytes``), ``comm_bytes_*`` (what ``algorithm.comm_bytes`` expects of the
        clients that answered), and the ``missing`` clients."""
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
    """A Flower ``ArrayRecord`` of named host arrays, one buffer per dtype (``flower.wire``)."""
    return to_record(arrays)
