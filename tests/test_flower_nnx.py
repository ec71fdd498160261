"""A Flower federation of a Flax NNX model (``model.kind: nnx``): the server finds the bridge's
LoRA shapes on an abstract model (no weight), the nodes train through the bridge, and the
federation equals the in-process simulation."""

import json
import os

import jax
import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")

from fedhl_jax.config import ConfigError, load_config, save_config  # noqa: E402
from fedhl_jax.flower import client_app  # noqa: E402
from fedhl_jax.flower.node import NodeTrainer  # noqa: E402
from fedhl_jax.flower.server_app import lora_shapes, no_base_weights, serve  # noqa: E402
from fedhl_jax.flower.strategy import RoundPolicy  # noqa: E402
from fedhl_jax.flower.wire import from_record  # noqa: E402
from fedhl_jax.simulation import Simulation  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.test_deploy import FEDERATION, RANKS, task_identity  # noqa: E402,F401 (a fixture)
from tests.test_flower_quorum import NodeGrid, contexts  # noqa: E402
from tests.test_nnx_bridge import NNX_RUN, tiny_nnx_llama  # noqa: E402

#: Each call of ``recorded_nnx_llama``: True when its weights were concrete arrays, False when tracers.
CALLS: list[bool] = []


def recorded_nnx_llama(vocab_size: int, seed: int):
    """``tests.test_nnx_bridge.tiny_nnx_llama``, recording whether its weights were materialised."""
    model, loss = tiny_nnx_llama(vocab_size, seed)
    CALLS.append(not isinstance(model.embed_tokens.embedding.get_value(), jax.core.Tracer))
    return model, loss


def concrete_nnx_llama(vocab_size: int, seed: int):
    """A factory that reads a weight's value while building (it cannot run abstractly)."""
    model, loss = tiny_nnx_llama(vocab_size, seed)
    model.scale = float(model.embed_tokens.embedding[0, 0])
    return model, loss


#: The tiny NNX Llama of tests/test_nnx_bridge.py over 3 nodes at ranks 1, 2, 4 (tests/test_deploy.py's federation).
NNX_FEDERATION = {**FEDERATION, **NNX_RUN, "model.cpu_matmul": "accurate", "model.factory": "tests.test_flower_nnx:recorded_nnx_llama"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config, the simulation's shapes, global adapter and metrics after two rounds."""
    tmp = tmp_path_factory.mktemp("flower-nnx")
    cfg = load_config(None, tiny_overrides(tmp, **NNX_FEDERATION))
    save_config(cfg, tmp / "run.yaml")
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    assert list(sim.ranks) == RANKS and sim.nnx is not None
    state, metrics = sim.init_state(), []
    for t in range(2):
        record = sim.run_round(state, t)
        state, metrics = record.state, metrics + [record.metrics]
    want = {k: np.asarray(v) for k, v in sim.global_delta(state).items()}
    return tmp, cfg, sim, want, metrics


def test_server_shapes_are_the_simulations_from_an_abstract_model(setup):
    """``lora_shapes`` of ``model.kind: nnx`` is the simulation's ``shapes``, in the same order,
    with every factory call on tracers and no base-weight loader called."""
    _, cfg, sim, _, _ = setup
    CALLS.clear()
    with no_base_weights() as refused:
        shapes = lora_shapes(cfg)
    assert list(shapes.items()) == list(sim.shapes.items())
    assert sorted(shapes) == [f"layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"]
    assert refused == [] and CALLS == [False, False]  # two vocabulary sizes, both abstract


def test_the_server_of_an_nnx_run_ignores_model_name_or_path(setup):
    """``model.name_or_path`` is not the model of ``model.kind: nnx``: the server neither resolves nor reads it."""
    from fedhl_jax.flower.server_app import FederationExecutor

    tmp, _, sim, _, _ = setup
    cfg = load_config(None, tiny_overrides(tmp, **{**NNX_FEDERATION, "model.name_or_path": str(tmp / "absent")}))
    with no_base_weights() as refused:
        executor = FederationExecutor(cfg, grid=None, log=lambda *_: None)
    assert refused == [] and executor.shapes == sim.shapes
    assert (executor.model_source.kind, executor.model_source.path) == ("nnx", "tests.test_flower_nnx:recorded_nnx_llama")


@pytest.mark.parametrize("extra, message", [
    ({"model.targets": "[.*nothing]"}, r"pattern '\.\*nothing' matches no module"),
    ({"model.targets": "[.*input_layernorm]"}, r"module 'layers.0.input_layernorm' is a .*RMSNorm"),
    ({"model.factory": "tests.test_nnx_bridge:no_such_factory"}, r"has no function 'no_such_factory'"),
    ({"fed.ranks": "[1,40]"}, r"r_max=40 exceeds min\(d_out, d_in\)=32 of module 'layers.0.self_attn.q_proj'"),
])
def test_server_shape_errors_name_the_value_as_the_simulation(setup, extra, message):
    tmp, _, _, _, _ = setup
    cfg = load_config(None, tiny_overrides(tmp, **{**NNX_FEDERATION, **extra}))
    with pytest.raises(ConfigError, match=message):
        lora_shapes(cfg)
    with pytest.raises(ConfigError, match=message):
        Simulation(cfg, log=lambda *_: None, mesh=None)


def test_a_factory_that_needs_concrete_weights_is_named_on_the_server(setup):
    tmp, _, _, _, _ = setup
    cfg = load_config(None, tiny_overrides(tmp, **{**NNX_FEDERATION,
                                                 "model.factory": "tests.test_flower_nnx:concrete_nnx_llama"}))
    with pytest.raises(ConfigError, match=r"model.factory 'tests.test_flower_nnx:concrete_nnx_llama' needs concrete "
                                          r"weights to build its model, but the server builds it abstractly"):
        lora_shapes(cfg)


def test_a_target_whose_shape_follows_the_vocabulary_is_refused_on_the_server(setup):
    """The vocabulary is built from the training texts, which the server does not hold: the
    shapes of q/v/down projections do not depend on it (checked at two sizes), ``lm_head``'s does."""
    tmp, _, _, _, _ = setup
    cfg = load_config(None, tiny_overrides(tmp, **{**NNX_FEDERATION, "model.targets": "[.*q_proj,lm_head]"}))
    with pytest.raises(ConfigError, match=r"lm_head: \(512, 32\) at vocab_size=512, \(1031, 32\) at "
                                          r"vocab_size=1031\); the vocabulary of model.kind: nnx is built from"):
        lora_shapes(cfg)


def test_a_node_with_its_own_file_refuses_an_nnx_model(setup):
    tmp, cfg, _, _, _ = setup
    with pytest.raises(ConfigError, match=r"model.kind=nnx builds its word-level tokenizer from the whole dataset, "
                                          r"which a node holding only .*node0.jsonl does not have"):
        NodeTrainer(cfg, 0, 1, data=str(tmp / "node0.jsonl"))


def test_a_flower_federation_of_an_nnx_model_matches_the_simulation(setup, task_identity):
    """Three nodes (the simulation's partitions, ranks 1, 2, 4) and the server's ``serve`` on a grid
    of in-process nodes: after two rounds the global adapter is the simulation's within 1e-5, the
    nodes' losses are the simulation's, and the server built no weight (every factory call it made
    was abstract, no base-weight loader was called)."""
    from safetensors.numpy import load_file

    tmp, cfg, sim, want, metrics = setup
    ctx = contexts(tmp / "run.yaml", {})
    for node, c in ctx.items():  # each node's model and data, loaded before the server starts
        pid = int(c.node_config["partition-id"])
        trainer = client_app.trainer_for(dict(c.run_config), pid, RANKS[pid])
        assert trainer.num_examples == sim.data.num_examples[pid]
    CALLS.clear()
    logs = []
    code = serve(NodeGrid(ctx), cfg, tmp / "server", policy=RoundPolicy(min_replies=3, deadline=300),
                 discover_timeout=30, log=logs.append)
    assert code == 0, logs
    assert "base weights loaded on the server: 0" in logs and CALLS and not any(CALLS), (logs, CALLS)
    got = load_file(str(tmp / "server" / "final" / "global_adapter.safetensors"))
    diff = max(float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in want)
    print(f"NNX federation vs simulation: maxdiff {diff:.3g} (max |delta| {max(float(np.abs(v).max()) for v in want.values()):.3g})")
    assert sorted(got) == sorted(want) and diff < 1e-5
    lines = [json.loads(x) for x in (tmp / "server" / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in lines if "train_loss" in x]
    assert len(rounds) == 2
    for m, sim_m in zip(rounds, metrics):
        np.testing.assert_allclose(m["train_loss"], sim_m["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(m["p"], sim_m["p"], atol=1e-6)


@pytest.mark.slow
def test_flora_nodes_merge_the_base_update_through_the_bridge(tmp_path, task_identity):
    """FLoRA sends the nodes the dense base update, which a node merges into the NNX model's
    kernels (``NnxLoRA.merge_delta``): through the strategy and the ``ClientApp`` handlers, two
    rounds equal the simulation's."""
    from flwr.app import ArrayRecord, ConfigRecord

    from tests.test_deploy import node_context, strategy_for

    cfg = load_config(None, tiny_overrides(tmp_path, **{**NNX_FEDERATION, "fed.algorithm": "flora"}))
    save_config(cfg, tmp_path / "run.yaml")
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    state = sim.init_state()
    for t in range(2):
        state = sim.run_round(state, t).state
    want = {k: np.asarray(v) for k, v in sim.global_delta(state).items()}
    strategy = strategy_for(cfg)
    for server_round in (1, 2):
        msgs = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None)
        if server_round == 2:
            assert any(k.startswith("base_delta/") for k in from_record(msgs[0].content["arrays"]))
        replies = [client_app.train(m, node_context(tmp_path / "run.yaml", pid, RANKS[pid]))
                   for m in msgs for pid in [int(m.content["config"]["partition-id"])]]
        strategy.aggregate_train(server_round, replies)
    got = strategy.algorithm.global_delta(strategy.state)
    diff = max(float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in want)
    print(f"NNX FLoRA federation vs simulation: maxdiff {diff:.3g}")
    assert diff < 1e-5
