"""Beyond one device: the (clients, model) mesh, and one run over several processes."""

import argparse
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedhl_jax import engine
from fedhl_jax.cli import distributed_settings
from fedhl_jax.config import ConfigError, load_config
from fedhl_jax.simulation import Simulation
from tests.conftest import REPO, tiny_overrides

#: SGD: AdamW's normalised step turns float32 rounding of near-zero gradients into ±lr steps, so
#: runs that sum in a different order (sharded vs one device) are compared on SGD.
EXACT = {"fed.num_clients": 8, "fed.participation": 1.0, "fed.rounds": 2, "optim.optimizer": "sgd",
         "optim.lr": 0.5, "model.random_num_layers": 1}


def test_fsdp_spec_splits_the_largest_divisible_dim():
    assert engine.fsdp_spec((2, 48, 32), 2) == P(None, "model")
    assert engine.fsdp_spec((2, 32, 48), 4) == P(None, None, "model")
    assert engine.fsdp_spec((60, 32), 8) == P(None, "model")  # 60 does not split over 8
    assert engine.fsdp_spec((7, 5), 2) == P()  # nothing divides: replicated
    assert engine.fsdp_spec((), 2) == P()
    assert engine.fsdp_spec((64, 64), 1) == P()


def test_mesh_config_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="mesh.model must be >= 1, got 0"):
        load_config(None, ["mesh.model=0"])
    cfg = load_config(None, tiny_overrides(tmp_path, **{"mesh.clients": 4, "mesh.model": 2,
                                                        "data.source": str(tmp_path / "absent.jsonl")}))
    # The mesh is checked first: the missing data file is never reached.
    with pytest.raises(ConfigError, match=r"mesh.clients=4 x mesh.model=2 = 8 devices, but there are 1 devices"):
        Simulation(cfg, log=lambda *_: None)
    cfg = load_config(None, tiny_overrides(tmp_path, **{"mesh.clients": 1}))
    assert Simulation(cfg, log=lambda *_: None).mesh.shape == {"clients": 1, "model": 1}


def test_distributed_settings_from_flags_or_environment():
    args = lambda **kw: argparse.Namespace(**{"coordinator_address": None, "num_processes": None,
                                              "process_id": None, "local_device_ids": None, **kw})
    assert distributed_settings(args(), environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed_settings(args(), environ=env) == {"coordinator_address": "10.0.0.1:1234",
                                                         "num_processes": 2, "process_id": 1}
    assert distributed_settings(args(process_id=0, local_device_ids="0,1"), environ=env)["local_device_ids"] == [0, 1]
    with pytest.raises(ConfigError, match="missing: --num-processes, --process-id"):
        distributed_settings(args(coordinator_address="h:1"), environ={})
    with pytest.raises(ConfigError, match=r"--process-id must be in \[0, 2\), got 2"):
        distributed_settings(args(coordinator_address="h:1", num_processes=2, process_id=2), environ={})


def test_two_axis_mesh_matches_one_device(tmp_path):
    """On 8 simulated CPU devices, a 4x2 and an 8x1 mesh give the global adapter of one device
    after two rounds; the base weights are split over ``model`` and the trained client factors
    over ``clients``."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from fedhl_jax.config import load_config
        from fedhl_jax.simulation import Simulation
        from tests.conftest import tiny_overrides
        from tests.test_mesh import EXACT
        assert jax.device_count() == 8
        overrides = tiny_overrides(Path({str(tmp_path)!r}), **EXACT, **{{"data.eval_examples": 0}})

        def two_rounds(sim):
            state = sim.init_state()
            for t in range(2):
                state = sim.run_round(state, t).state
            return {{k: np.asarray(v) for k, v in sim.global_delta(state).items()}}

        one = two_rounds(Simulation(load_config(None, overrides), log=lambda *_: None, mesh=None))
        for clients, model in ((4, 2), (8, 1)):
            seen = []
            cfg = load_config(None, overrides + [f"mesh.clients={{clients}}", f"mesh.model={{model}}"])
            sim = Simulation(cfg, log=lambda *_: None, probe=lambda name, shape, s: seen.append((name, shape, s)))
            assert sim.mesh.shape == {{"clients": clients, "model": model}}
            if model > 1:
                q = sim.base["layers"]["self_attn"]["q_proj"]  # [L, 32, 32]
                assert "model" in q.sharding.spec and len(q.sharding.device_set) == 8, q.sharding
                assert q.sharding.shard_shape(q.shape)[1:] in ((16, 32), (32, 16))
                specs = [x.sharding.spec for x in jax.tree.leaves(sim.base)]
                assert sum("model" in s for s in specs) >= len(specs) - 1, specs
            got = two_rounds(sim)
            assert {{name for name, _, _ in seen}} == {{"B", "A"}}
            for name, shape, s in seen:
                assert s.spec[0] == "clients" and s.shard_shape(shape)[0] == 8 // clients, (name, shape, s)
            diff = max(np.abs(got[k] - one[k]).max() for k in one)
            print(f"mesh {{clients}}x{{model}} maxdiff {{diff:.3g}} max {{max(np.abs(v).max() for v in one.values()):.3g}}")
            assert diff < 1e-5, diff
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mesh 4x2 maxdiff" in res.stdout and "mesh 8x1 maxdiff" in res.stdout, res.stdout
    print(res.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """bin/train.py as 2 processes x 4 CPU devices (jax.distributed over localhost) gives the global
    adapter of 1 process x 8 devices after two rounds; process 0 alone writes the run's files and
    both take part in the Orbax checkpoints."""
    from safetensors.numpy import load_file

    overrides = tiny_overrides(tmp_path, **EXACT, **{"data.eval_examples": 8, "eval.every": 2})
    train = [sys.executable, str(REPO / "bin" / "train.py"), "--no-progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    port = free_port()
    procs = []
    t0 = time.perf_counter()
    try:
        procs.append(subprocess.Popen(train + ["--out", str(tmp_path / "one")] + overrides, cwd=REPO, text=True,
                                      env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        for pid in range(2):
            procs.append(subprocess.Popen(
                train + ["--out", str(tmp_path / "two"), "--coordinator-address", f"127.0.0.1:{port}",
                         "--num-processes", "2", "--process-id", str(pid)] + overrides,
                cwd=REPO, text=True, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "round 2/2" in outs[1] and "round 2/2" not in outs[2]  # process 1 is silent
    assert "sharding the client axis over 8 devices (2 processes)" in outs[1]
    one = load_file(str(tmp_path / "one" / "final" / "global_adapter.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "global_adapter.safetensors"))
    diff = max(np.abs(one[k] - two[k]).max() for k in one)
    print(f"2x4 vs 1x8 processes: maxdiff {diff:.3g} in {seconds:.0f} s")
    assert diff < 1e-5
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["1", "2"]
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"eval_loss"' in lines[1]
