"""The Flower ``ClientApp``: a node trains partition ``partition-id`` at rank ``rank``.

Start each node with ``flower-supernode ... --node-config "partition-id=<i> rank=<r>"``; it reads
the run's config from the run config (``config``, ``overrides``: the same as the server's).
Messages: ``query`` (the node says its partition id and rank) and ``train`` (the starting
factors at the node's rank, the global round; the reply carries the trained factors, the
partition's size and the local losses).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhl_jax.flower.node import NodeTrainer, node_identity, run_settings
from fedhl_jax.flower.strategy import ARRAYS, CONFIG, METRICS, array_record

app = ClientApp()
_trainers: dict = {}


def trainer_for(run_config: dict, partition_id: int, rank: int) -> NodeTrainer:
    """The node's ``NodeTrainer`` (one per process and run config: the model and data load once)."""
    key = (tuple(sorted((k, str(v)) for k, v in run_config.items())), partition_id, rank)
    if key not in _trainers:
        _trainers[key] = NodeTrainer(run_settings(run_config), partition_id, rank)
    return _trainers[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    partition_id, rank = node_identity(context.node_config)
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": partition_id, "rank": rank})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id, rank = node_identity(context.node_config)
    c = msg.content[CONFIG]
    if int(c["partition-id"]) != partition_id or int(c["rank"]) != rank:
        raise ValueError(f"the server sent partition {c['partition-id']} at rank {c['rank']} to the node of "
                         f"partition {partition_id} at rank {rank}")
    trainer = trainer_for(dict(context.run_config), partition_id, rank)
    arrays = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
    reply, losses = trainer.train(int(c["round"]), arrays)
    metrics = MetricRecord({"partition-id": partition_id, "num-examples": trainer.num_examples,
                            "losses": [float(x) for x in losses]})
    return Message(RecordDict({ARRAYS: array_record(reply), METRICS: metrics}), reply_to=msg)
