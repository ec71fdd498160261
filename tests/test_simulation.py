"""The engine: one compile per run, client sharding, rank distributions, input checks."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fedhl_jax.config import ConfigError, FedConfig, load_config
from fedhl_jax.simulation import Simulation, client_ranks
from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    cfg = load_config(None, tiny_overrides(tmp_path_factory.mktemp("sim"), **{"fed.rounds": 5}))
    return Simulation(cfg, log=lambda *_: None)


def test_one_compile_across_rounds_with_different_clients(sim):
    state = sim.init_state()
    sampled = set()
    for t in range(5):
        out = sim.run_round(state, t)
        state = out.state
        sampled.add(tuple(out.metrics["clients"]))
        assert np.isfinite(out.metrics["train_loss"])
        np.testing.assert_allclose(np.sum(out.metrics["p"]), 1.0, rtol=1e-5)
    assert len(sampled) > 1  # the sampled clients (and their ranks) changed
    assert sim.round_fn._cache_size() == 1
    ev = sim.evaluate(state)
    assert np.isfinite(ev["eval_loss"]) and ev["eval_ppl"] > 1
    assert sim.evaluator.loss_fn._cache_size() == 1


def test_training_lowers_heldout_loss(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"fed.participation": 1.0, "optim.local_steps": 4,
                                                       "optim.lr": 0.03}))
    s = Simulation(cfg, log=lambda *_: None)
    state = s.init_state()
    before = s.evaluate(state)["eval_loss"]
    for t in range(4):
        state = s.run_round(state, t).state
    assert s.evaluate(state)["eval_loss"] < before - 0.1


@pytest.mark.parametrize("algorithm", ["flexlora", "hetlora", "flora"])
def test_peer_algorithms_run(tmp_path, algorithm):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"fed.algorithm": algorithm, "fed.rounds": 2}))
    s = Simulation(cfg, log=lambda *_: None)
    state = s.init_state()
    for t in range(2):
        out = s.run_round(state, t)
        state = out.state
    assert np.isfinite(s.evaluate(state)["eval_loss"])
    assert out.metrics["bytes_up"] > 0 and out.metrics["bytes_down"] >= out.metrics["bytes_up"]


def test_rank_distributions():
    def ranks(kind, ranks=(2, 4, 8, 16), n=400):
        return client_ranks(FedConfig(num_clients=n, rank_distribution=kind, ranks=ranks), seed=0)

    np.testing.assert_array_equal(ranks("list", (1, 2, 3), n=7), [1, 2, 3, 1, 2, 3, 1])
    assert set(ranks("homogeneous")) == {16}
    u = ranks("uniform")
    assert set(u) == {2, 4, 8, 16} and np.all(np.bincount(u)[[2, 4, 8, 16]] > 60)
    low, high = ranks("heavy_tail_low"), ranks("heavy_tail_high")
    assert np.mean(low == 2) > 0.4 and np.mean(high == 16) > 0.4
    np.testing.assert_array_equal(ranks("uniform"), u)  # seeded


def test_rank_above_module_dims_is_refused(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"fed.ranks": "[2,64]"}))
    with pytest.raises(ConfigError, match=r"rank 64 in fed.ranks exceeds min\(d_out, d_in\)=16"):
        Simulation(cfg, log=lambda *_: None)


def test_more_clients_than_examples_is_refused(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"fed.num_clients": 500}))
    with pytest.raises(ConfigError, match=r"fed.num_clients=500 is more than the 52 training examples"):
        Simulation(cfg, log=lambda *_: None)


def test_client_axis_shards_over_8_devices(tmp_path):
    """The client axis is partitioned over 8 simulated CPU devices inside the round (the trained
    factors are sharded along it), and the round gives the same result as on one device."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {str(REPO)!r})
        from fedhl_jax.config import load_config
        from fedhl_jax.simulation import Simulation
        from tests.conftest import tiny_overrides
        from pathlib import Path
        for chunk in ("null", "2"):
            cfg = load_config(None, tiny_overrides(Path({str(tmp_path)!r}), **{{"fed.num_clients": 16,
                              "fed.participation": 0.5, "fed.clients_per_chunk": chunk}}))
            seen = []
            sim = Simulation(cfg, log=lambda *_: None, probe=lambda name, shape, s: seen.append((name, shape, s)))
            assert jax.device_count() == 8 and sim.mesh is not None
            sharded = np.asarray(sim.run_round(sim.init_state(), 0).state.G["layers.0.self_attn.q_proj"])
            assert {{name for name, _, _ in seen}} == {{"B", "A"}}
            for name, shape, s in seen:
                assert shape[0] == 8 and len(s.device_set) == 8, (name, shape, s)
                assert s.shard_shape(shape)[0] == 1, (name, shape, s)  # one client per device
            single = Simulation(cfg, log=lambda *_: None, mesh=None)
            assert single.mesh is None
            one = np.asarray(single.run_round(single.init_state(), 0).state.G["layers.0.self_attn.q_proj"])
            print("maxdiff", chunk, np.abs(sharded - one).max())
            assert np.allclose(sharded, one, atol=1e-5)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "maxdiff null" in res.stdout and "maxdiff 2" in res.stdout


def test_remat_and_dtype_are_selected_from_the_config(tmp_path):
    """model.remat changes what is stored for the backward pass, not the numbers; model.dtype
    bfloat16 keeps the base in bfloat16 and the server's G in float32."""
    results = {}
    for remat in ("none", "dots_saveable", "full"):
        cfg = load_config(None, tiny_overrides(tmp_path, **{"model.remat": remat, "fed.rounds": 1}))
        s = Simulation(cfg, log=lambda *_: None)
        results[remat] = np.asarray(s.run_round(s.init_state(), 0).state.G["layers.0.self_attn.q_proj"])
    for remat in ("dots_saveable", "full"):
        np.testing.assert_allclose(results[remat], results["none"], atol=1e-5)
    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.dtype": "bfloat16", "fed.rounds": 1}))
    s = Simulation(cfg, log=lambda *_: None)
    assert s.params["embed_tokens"].dtype == np.dtype("bfloat16")
    out = s.run_round(s.init_state(), 0)
    assert out.state.G["layers.0.self_attn.q_proj"].dtype == np.float32 and np.isfinite(out.metrics["train_loss"])
    with pytest.raises(ConfigError, match="model.remat must be one of"):
        load_config(None, ["model.remat=some"])
    with pytest.raises(ConfigError, match="moved to 'model.remat"):
        load_config(None, ["fed.remat=true"])


def test_cpu_matmul_mode_is_selected_from_the_config(tmp_path):
    """model.cpu_matmul: accurate compiles the round step and evaluation without YNNPACK fusions;
    the results agree with the default mode to float32 rounding."""
    from fedhl_jax import runtime

    before = runtime.cpu_matmul()
    results = {}
    try:
        for mode in runtime.CPU_MATMUL_MODES:
            logs = []
            cfg = load_config(None, tiny_overrides(tmp_path, **{"model.cpu_matmul": mode, "fed.rounds": 1}))
            s = Simulation(cfg, log=logs.append)
            assert runtime.cpu_matmul() == mode
            out = s.run_round(s.init_state(), 0)
            results[mode] = (np.asarray(out.state.G["layers.0.self_attn.q_proj"]), s.evaluate(out.state)["eval_loss"])
            assert set(s.round_fn._jitted) == {mode}
            assert any("accurate" in line for line in logs) == (mode == "accurate" and jax.default_backend() == "cpu")
    finally:
        runtime.set_cpu_matmul(before)
    np.testing.assert_allclose(results["accurate"][0], results["fast"][0], atol=1e-5)
    np.testing.assert_allclose(results["accurate"][1], results["fast"][1], rtol=1e-5)
    with pytest.raises(ConfigError, match="model.cpu_matmul must be fast or accurate, got 'exact'"):
        load_config(None, ["model.cpu_matmul=exact"])


def test_validation_split_and_per_example_losses(tmp_path):
    over = tiny_overrides(tmp_path, **{"fed.rounds": 1, "data.validation_examples": 12, "eval.per_example": True})
    s = Simulation(load_config(None, over), log=lambda *_: None)
    full = Simulation(load_config(None, tiny_overrides(tmp_path, **{"fed.rounds": 1})), log=lambda *_: None)
    val = s.data.validation
    assert val is not None and len(val) <= 12 and len(s.data.records) == len(full.data.records) - 12
    # no client holds a validation row: its reference answer is in no training row
    train_values = {v for r in s.data.records for v in r.values()}
    assert len(val.references) > 0 and not any(ref in train_values for ref in val.references)
    assert all(ref in {v for r in full.data.records for v in r.values()} for ref in val.references)
    ev = s.evaluate(s.init_state())
    n_eval = len(s.evaluator.loss_tokens)
    assert len(ev["eval_loss_examples"]) == n_eval and len(ev["eval_val_loss_examples"]) == len(val)
    # the pooled loss is the token-weighted mean of the per-example losses
    tok = s.evaluator.loss_mask[:, 1:].sum(1)
    np.testing.assert_allclose(np.sum(np.asarray(ev["eval_loss_examples"]) * tok) / tok.sum(), ev["eval_loss"],
                               rtol=1e-5)
    assert np.isfinite(ev["eval_val_loss"]) and "eval_val_loss" not in full.evaluate(full.init_state())
    with pytest.raises(ConfigError, match="data.validation_examples must be >= 0"):
        load_config(None, tiny_overrides(tmp_path, **{"data.validation_examples": -1}))
