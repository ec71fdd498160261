"""A real federation with Flower: the strategy and the nodes against the in-process simulation,
a node that does not answer, and a local deployment (SuperLink, 3 SuperNodes, ``flwr run``)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

from fedhl_jax.config import load_config, save_config  # noqa: E402
from fedhl_jax.deploy import client_app  # noqa: E402
from fedhl_jax.deploy.node import node_identity, pack, unpack  # noqa: E402
from fedhl_jax.deploy.server_app import lora_shapes  # noqa: E402
from fedhl_jax.deploy.strategy import FedLoRAStrategy  # noqa: E402
from fedhl_jax.simulation import Simulation  # noqa: E402
from tests.conftest import REPO, tiny_overrides  # noqa: E402

RANKS = [1, 2, 4]
#: 3 clients, all in every round, ranks 1, 2, 4; SGD (see tests/test_mesh.py) for exact comparisons.
FEDERATION = {"fed.num_clients": 3, "fed.participation": 1.0, "fed.ranks": "[1,2,4]", "fed.rounds": 2,
              "optim.optimizer": "sgd", "optim.lr": 0.5, "model.random_num_layers": 1, "data.eval_examples": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config, and the simulation's global adapter and metrics after two rounds."""
    tmp = tmp_path_factory.mktemp("federation")
    cfg = load_config(None, tiny_overrides(tmp, **FEDERATION))
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    assert list(sim.ranks) == RANKS
    state, metrics = sim.init_state(), []
    for t in range(2):
        record = sim.run_round(state, t)
        state = record.state
        metrics.append(record.metrics)
    want = {k: np.asarray(v) for k, v in sim.global_delta(state).items()}
    return tmp, cfg, want, metrics


@pytest.fixture
def task_identity():
    """Messages made outside a Flower process need a run (and a node) to belong to."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def node_context(cfg_path: Path, partition_id: int, rank: int) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id, "rank": rank},
                   state=RecordDict(), run_config={"config": str(cfg_path), "overrides": ""})


def strategy_for(cfg, log=lambda *_: None) -> FedLoRAStrategy:
    alg = cfg.fed.build_algorithm()
    shapes = lora_shapes(cfg)
    import jax

    strategy = FedLoRAStrategy(cfg, shapes, alg.init(shapes, jax.random.PRNGKey(cfg.seed)), log=log)
    for pid, rank in enumerate(RANKS):
        strategy.register(pid, 100 + pid, rank)
    return strategy


def test_wire_format_and_node_config():
    B = {"m": np.arange(12, dtype=np.float32).reshape(3, 4) * np.array([1, 1, 0, 0], np.float32)}
    A = {"m": np.arange(20, dtype=np.float32).reshape(4, 5) * np.array([1, 1, 0, 0], np.float32)[:, None]}
    arrays = pack(B, A, 2)
    assert {k: v.shape for k, v in arrays.items()} == {"B/m": (3, 2), "A/m": (2, 5)}
    B2, A2 = unpack(arrays, {"m": (3, 5)}, 4, 2)
    np.testing.assert_array_equal(B2["m"], B["m"])
    np.testing.assert_array_equal(A2["m"], A["m"])
    with pytest.raises(ValueError, match=r"B/m has shape \(3, 2\); a rank-3 client sends \(3, 3\)"):
        unpack(arrays, {"m": (3, 5)}, 4, 3)
    assert node_identity({"partition-id": 2, "rank": "8"}) == (2, 8)
    with pytest.raises(ValueError, match="the node config has no 'rank'"):
        node_identity({"partition-id": 0})


def run_in_process(strategy, cfg_path, rounds, drop=()):
    """Flower's loop without Flower's transport: ``configure_train``, each node's ``ClientApp``
    handler, ``aggregate_train``. ``drop``: ``(round, partition)`` pairs whose reply is lost."""
    for server_round in range(1, rounds + 1):
        replies = []
        for msg in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None):
            pid = int(msg.content["config"]["partition-id"])
            reply = client_app.train(msg, node_context(cfg_path, pid, RANKS[pid]))
            if (server_round, pid) not in drop:
                replies.append(reply)
        strategy.aggregate_train(server_round, replies)


def test_strategy_and_nodes_match_the_simulation(setup, task_identity):
    """The server's strategy and three nodes' ClientApp handlers, in one process, give the
    simulation's global adapter after two rounds, and the bytes of the messages are the
    algorithm's ``comm_bytes`` and the simulation's accounting."""
    tmp, cfg, want, metrics = setup
    save_config(cfg, tmp / "run.yaml")
    strategy = strategy_for(cfg)
    run_in_process(strategy, tmp / "run.yaml", 2)
    got = strategy.algorithm.global_delta(strategy.state)
    diff = max(float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in want)
    print(f"in-process federation vs simulation: maxdiff {diff:.3g}")
    assert diff < 1e-5
    for m, sim_m in zip(strategy.history, metrics):
        assert m["bytes_down"] == m["comm_bytes_down"] == sim_m["bytes_down"] > 0
        assert m["bytes_up"] == m["comm_bytes_up"] == sim_m["bytes_up"] > 0
        assert m["wire_bytes_down"] > m["bytes_down"]  # + the serialisation's headers
        np.testing.assert_allclose(m["p"], sim_m["p"], atol=1e-6)
        np.testing.assert_allclose(m["train_loss"], sim_m["train_loss"], rtol=1e-5)


def test_a_missing_reply_is_left_out_and_the_weights_renormalised(setup, task_identity):
    """Round 2 gets 2 of 3 replies: the aggregate is the algorithm's over the two that answered
    (weights renormalised over them), the missing client has weight 0, and the log says so."""
    import jax

    tmp, cfg, _, _ = setup
    save_config(cfg, tmp / "run.yaml")
    logs = []
    strategy = strategy_for(cfg, log=logs.append)
    run_in_process(strategy, tmp / "run.yaml", 1)
    before = strategy.state
    # Round 2 with every reply, kept aside, to rebuild the two-client aggregate by hand.
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid=None))
    replies = {int(m.content["config"]["partition-id"]): client_app.train(
        m, node_context(tmp / "run.yaml", int(m.content["config"]["partition-id"]),
                        RANKS[int(m.content["config"]["partition-id"])])) for m in msgs}
    rnd = strategy._round
    strategy.aggregate_train(2, [replies[0], replies[2]])
    m = strategy.history[-1]
    assert m["missing"] == [1] and m["excluded"] == 1 and m["applied"]
    assert m["p"][1] == 0 and abs(m["p"].sum() - 1) < 1e-6
    assert m["comm_bytes_up"] == m["bytes_up"]  # the two replies that came
    assert any("aggregated 2 of 3 replies; clients [1] did not answer" in line for line in logs)
    # The reference: the algorithm's aggregate over the two clients that answered.
    keep = [0, 2]
    shapes, r_max = strategy.shapes, strategy.r_max
    B = {k: np.stack([unpack({a: x.numpy() for a, x in replies[i].content["arrays"].items()}, shapes, r_max,
                             RANKS[i])[0][k] for i in keep]) for k in shapes}
    A = {k: np.stack([unpack({a: x.numpy() for a, x in replies[i].content["arrays"].items()}, shapes, r_max,
                             RANKS[i])[1][k] for i in keep]) for k in shapes}
    n = np.array([float(replies[i].content["metrics"]["num-examples"]) for i in keep], np.float32)
    from fedhl_jax.engine import AGGREGATE_STREAM

    ref, info = strategy.algorithm.aggregate(before, B, A, rnd["mask"][np.array(keep)], rnd["scale"][np.array(keep)],
                                             n, key=jax.random.fold_in(rnd["key"], AGGREGATE_STREAM))
    np.testing.assert_allclose(m["p"][keep], np.asarray(info["p"]), rtol=1e-5)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(strategy.state.G[k]), np.asarray(ref.G[k]), atol=1e-6)
