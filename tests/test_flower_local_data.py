"""Nodes that hold their own data: each node reads only its JSON Lines file and its rank, and a
federation of such nodes equals the in-process simulation of the same data."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from fedhl_jax.build import build_algorithm  # noqa: E402
from fedhl_jax.config import ConfigError, load_config, save_config  # noqa: E402
from fedhl_jax.data.registry import dataset_spec  # noqa: E402
from fedhl_jax.flower import client_app  # noqa: E402
from fedhl_jax.flower.node import NodeTrainer, node_identity  # noqa: E402
from fedhl_jax.flower.server_app import lora_shapes  # noqa: E402
from fedhl_jax.flower.strategy import FedLoRAStrategy  # noqa: E402
from fedhl_jax.simulation import Simulation  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.test_deploy import task_identity  # noqa: E402,F401 (a fixture)

RANKS = [1, 2, 4]
#: The embedded stories260K (its own tokenizer: a node needs no other node's words), 3 clients in
#: every round, ranks 1, 2, 4, SGD for exact comparisons.
LOCAL = {"model.name_or_path": "auto", "fed.num_clients": 3, "fed.participation": 1.0, "fed.ranks": "[1,2,4]",
         "fed.rounds": 2, "optim.optimizer": "sgd", "optim.lr": 0.5, "data.eval_examples": 0, "data.seq_len": 160}


def write_node_files(sim: Simulation, folder: Path) -> list[Path]:
    """One JSONL file per client: the rows of the simulation's partition, in the partition's
    order, with the dataset's own field names."""
    spec = dataset_spec(sim.cfg.data.dataset)
    files = []
    for i, part in enumerate(sim.data.partitions):
        rows = sim.data.records.select(sim.data.data.source_index[part])
        path = folder / f"node{i}.jsonl"
        with open(path, "w") as f:
            for r in rows:
                row = {spec.instruction: r["instruction"], spec.output: r["output"]}
                if spec.input and r["input"]:
                    row[spec.input] = r["input"]
                f.write(json.dumps(row) + "\n")
        files.append(path)
    return files


def simulate(cfg, rounds):
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    state, metrics = sim.init_state(), []
    for t in range(rounds):
        record = sim.run_round(state, t)
        state, metrics = record.state, metrics + [record.metrics]
    return sim, {k: np.asarray(v) for k, v in sim.global_delta(state).items()}, metrics


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The config, the simulation's result after two rounds, and the three nodes' files."""
    tmp = tmp_path_factory.mktemp("local-data")
    cfg = load_config(None, tiny_overrides(tmp, **LOCAL))
    sim, want, metrics = simulate(cfg, 2)
    assert list(sim.ranks) == RANKS
    files = write_node_files(sim, tmp)
    save_config(cfg, tmp / "run.yaml")
    return tmp, cfg, sim, want, metrics, files


def test_node_identity():
    assert node_identity({"partition-id": 2, "rank": "8"}) == (2, 8, None, None)
    assert node_identity({"rank": 4, "data": "/d/x.jsonl"}) == (None, 4, "/d/x.jsonl", None)
    assert node_identity({"rank": 4, "data": "x.jsonl", "partition-id": 1, "delay": "0:2.5"}) == (1, 4, "x.jsonl",
                                                                                                (0, 2.5))
    with pytest.raises(ValueError, match="the node config has no 'rank'"):
        node_identity({"partition-id": 0})
    with pytest.raises(ValueError, match="no 'partition-id' and no 'data'"):
        node_identity({"rank": 1})
    with pytest.raises(ValueError, match="node config rank='x' is not an integer"):
        node_identity({"rank": "x", "data": "a.jsonl"})
    with pytest.raises(ValueError, match=r"node config delay='3' is not \"<round>:<seconds>\""):
        node_identity({"rank": 1, "data": "a.jsonl", "delay": "3"})


def test_nodes_with_their_own_files_match_the_simulation(local, task_identity):
    """Three nodes, each given only its JSONL file and its rank (the server numbers them), through
    the strategy and the ClientApp handlers, equal the simulation of the same data after two rounds."""
    tmp, cfg, sim, want, metrics, files = local
    shapes = lora_shapes(cfg)
    strategy = FedLoRAStrategy(cfg, shapes, build_algorithm(cfg.fed).init(shapes, __import__("jax").random.PRNGKey(
        cfg.seed)), log=lambda *_: None)
    for pid, rank in enumerate(RANKS):
        strategy.register(pid, 100 + pid, rank)

    def context(pid):
        return Context(run_id=1, node_id=100 + pid, node_config={"rank": RANKS[pid], "data": str(files[pid])},
                       state=RecordDict(), run_config={"config": str(tmp / "run.yaml"), "overrides": ""})

    for server_round in (1, 2):
        replies = [client_app.train(m, context(int(m.content["config"]["partition-id"])))
                   for m in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None)]
        strategy.aggregate_train(server_round, replies)
    got = strategy.algorithm.global_delta(strategy.state)
    diff = max(float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in want)
    print(f"nodes with their own files vs simulation: maxdiff {diff:.3g}")
    assert diff < 1e-5
    for m, sim_m in zip(strategy.history, metrics):
        np.testing.assert_allclose(m["p"], sim_m["p"], atol=1e-6)
        np.testing.assert_allclose(m["train_loss"], sim_m["train_loss"], rtol=1e-5)
    trainer = next(t for key, t in client_app._trainers.items() if key[3] == str(files[1]))
    assert trainer.num_examples == len(sim.data.partitions[1])


def test_a_node_with_its_own_file_refuses_what_needs_the_whole_dataset(local):
    tmp, cfg, _, _, _, files = local
    rc = load_config(None, tiny_overrides(tmp, **{**LOCAL, "data.partition": "rank_correlated"}))
    with pytest.raises(ConfigError, match=r"data.partition=rank_correlated .* this node holds its own data file"):
        NodeTrainer(rc, 0, 1, data=str(files[0]))
    rnd = load_config(None, tiny_overrides(tmp, **{**LOCAL, "model.name_or_path": "random"}))
    with pytest.raises(ConfigError, match="model.name_or_path=random builds its tokenizer from the whole dataset"):
        NodeTrainer(rnd, 0, 1, data=str(files[0]))


def test_rank_correlated_partitions_follow_the_ranks_the_nodes_report(tmp_path):
    """With the simulation's partitions, ``rank_correlated`` follows the ranks the server sends
    (the nodes'), not ``fed.ranks``."""
    from fedhl_jax.data.federated import build_federated_dataset

    data = tmp_path / "dolly.jsonl"
    with open(data, "w") as f:
        for i in range(48):
            f.write(json.dumps({"instruction": f"say {i} {'twice' * (i % 5)}", "context": "", "response": f"{i} {i}",
                                "category": ("open_qa", "classification", "brainstorming")[i % 3]}) + "\n")
    cfg = load_config(None, tiny_overrides(tmp_path, **{**LOCAL, "model.name_or_path": "random", "data.dataset": "dolly",
                                                        "data.source": str(data), "data.partition": "rank_correlated",
                                                        "data.seq_len": 48}))
    reported = (4, 1, 2)
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    fd = build_federated_dataset(cfg.data, sim.tokenizer, num_clients=3, seed=cfg.seed, ranks=np.array(reported))
    assert any(not np.array_equal(a, b) for a, b in zip(fd.partitions, sim.data.partitions))  # the ranks matter
    for pid in range(3):
        trainer = NodeTrainer(cfg, pid, reported[pid], ranks=reported)
        assert trainer.num_examples == len(fd.partitions[pid])
        got = trainer.batches(0, np.array([pid]))[0]
        np.testing.assert_array_equal(got, fd.batcher(local_steps=cfg.optim.local_steps,
                                                      batch_size=cfg.optim.batch_size, seed=cfg.seed)(0, [pid])[0])
