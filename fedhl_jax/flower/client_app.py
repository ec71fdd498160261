"""The Flower ``ClientApp``: a node trains its own data (or a simulation partition) at its rank.

Start each node with ``flower-supernode ... --node-config "rank=<r> data='<file.jsonl>'"`` (its own
data: a JSON Lines file of the dataset's fields; add ``partition-id=<i>`` to fix its client id), or
``--node-config "partition-id=<i> rank=<r>"`` (the simulation's partition ``i`` of the run's
dataset, for experiments). It reads the run's config from the run config (``config``,
``overrides``: the same as the server's). Messages: ``query`` (the node says its partition id,
rank and whether it holds its own data) and ``train`` (the starting factors at the node's rank,
the global round and the node's client id; the reply carries the trained factors, the data's
size, the local losses, the round it answers, and its timings: ``train-seconds`` (the local
step, with its compilation on a process's first call), ``start-seconds`` (the ``ClientApp``
process's age when Flower hands it the message: Python's start, Flower's import, the app's load and
the message's pull) and ``node-seconds`` (its age at the reply: start-up, model and data load,
training)). The node keeps JAX's persistent
compilation cache in ``compile-cache="<dir>"`` of its node config (or ``$JAX_COMPILATION_CACHE_DIR``).

With ``worker="<socket>"`` in its node config the node hands each ``train`` to its long-lived node
worker (``flower.worker``: model, data and compiled step kept between messages) and this process
imports no JAX: a message costs a Python start and Flower's import. Without it, each process
trains itself (and Flower 1.42 starts one per message).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhl_jax.flower.node import ARRAYS, CONFIG, METRICS, node_identity
from fedhl_jax.flower.wire import from_record, to_record

app = ClientApp()
_trainers: dict = {}


def process_seconds() -> float:
    """Seconds since this process started (Linux ``/proc``; NaN elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def use_compile_cache(node_config: dict) -> str | None:
    """Turns on JAX's persistent compilation cache in the folder of the node config's ``compile-cache``
    (else ``$JAX_COMPILATION_CACHE_DIR``), every compile cached however short, so a new ``ClientApp``
    process reuses the local step compiled by an earlier round.

    Returns:
      The cache folder, or None when neither names one (or ``compile-cache="off"``).
    """
    import jax

    where = str(node_config.get("compile-cache", "") or os.environ.get("JAX_COMPILATION_CACHE_DIR", "") or "off")
    if where == "off":
        return None
    folder = Path(where).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(folder)


def trainer_key(run_config: dict, partition_id: int, rank: int, data: str | None = None,
                ranks: tuple | None = None) -> tuple:
    """What a ``NodeTrainer`` is kept by: the run config, client id, rank, data file and ranks."""
    return tuple(sorted((k, str(v)) for k, v in run_config.items())), partition_id, rank, data, ranks


def trainer_for(run_config: dict, partition_id: int, rank: int, data: str | None = None,
                ranks: tuple | None = None):
    """The node's ``NodeTrainer`` (one per process, run config and client id: the model and the
    data load once per process)."""
    from fedhl_jax.flower.node import NodeTrainer, run_settings

    key = trainer_key(run_config, partition_id, rank, data, ranks)
    if key not in _trainers:
        _trainers[key] = NodeTrainer(run_settings(run_config), partition_id, rank, data=data, ranks=ranks)
    return _trainers[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    me = node_identity(context.node_config)
    pid = -1 if me.partition_id is None else me.partition_id
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": pid, "rank": me.rank,
                                                      "own-data": int(me.data is not None)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = process_seconds()  # the process's age when Flower hands it the message
    me = node_identity(context.node_config)
    c = msg.content[CONFIG]
    pid, t = int(c["partition-id"]), int(c["round"])
    if (me.partition_id is not None and pid != me.partition_id) or int(c["rank"]) != me.rank:
        raise ValueError(f"the server sent client {pid} at rank {c['rank']} to the node of partition "
                         f"{me.partition_id} at rank {me.rank}")
    ranks = tuple(int(r) for r in c["ranks"]) if "ranks" in c else None
    worker = str(context.node_config.get("worker", "") or "")
    if not worker:
        use_compile_cache(context.node_config)
        trainer = trainer_for(dict(context.run_config), pid, me.rank, me.data, ranks)
    if me.delay is not None and me.delay[0] == t:
        time.sleep(me.delay[1])
    arrays = from_record(msg.content[ARRAYS])
    if worker:  # the node's long-lived worker trains; this process imports no JAX
        from fedhl_jax.flower.worker import TrainRequest, ask

        data = None if me.data is None else os.path.abspath(me.data)
        answer = ask(worker, TrainRequest(dict(context.run_config), pid, me.rank, data, ranks, t, arrays,
                                          str(context.node_config.get("compile-cache", "") or "")))
        reply, losses, num_examples, seconds = answer
    else:
        t0 = time.perf_counter()
        reply, losses = trainer.train(t, arrays)
        num_examples, seconds = trainer.num_examples, time.perf_counter() - t0
    metrics = MetricRecord({"partition-id": pid, "round": t, "num-examples": int(num_examples),
                            "losses": [float(x) for x in losses], "train-seconds": seconds,
                            "start-seconds": started, "node-seconds": process_seconds()})
    return Message(RecordDict({ARRAYS: to_record(reply), METRICS: metrics}), reply_to=msg)
