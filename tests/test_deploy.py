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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(procs) -> None:
    """Kills the started processes, their process groups and anything they started."""
    pids = [q for p in procs for q in [p.pid, *descendants(p.pid)]]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def test_local_deployment_matches_the_simulation(setup, tmp_path):
    """A real local federation: ``flower-superlink``, three ``flower-supernode`` processes (one per
    partition, ranks 1, 2, 4 in their node config) and ``flwr run deploy/flower``. The first call
    runs round 1 and stops; the second, with ``fed.rounds=2``, resumes the server from its
    checkpoint and runs round 2. The global adapter is the in-process simulation's, and the bytes
    of every round are the algorithm's ``comm_bytes`` and the simulation's accounting."""
    from safetensors.numpy import load_file

    tmp, cfg, want, metrics = setup
    cfg_path, out, home = tmp_path / "run.yaml", tmp_path / "server", tmp_path / "flwr-home"
    save_config(cfg, cfg_path)
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    bindir = Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", JAX_PLATFORMS="cpu",
               PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO))
    procs, logs = [], []

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(tmp_path / f"{name}.log")
        procs.append(subprocess.Popen([str(bindir / name.split(".")[0]), *args], env=env, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    t0 = time.perf_counter()
    try:
        start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
              "--disable-runtime-dependency-installation", "--database", str(tmp_path / "state.db"))
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "flower-superlink.log").read_text()
                time.sleep(0.5)
        for pid, rank in enumerate(RANKS):
            start(f"flower-supernode.{pid}", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
                  str(free_port()), "--node-config", f"partition-id={pid} rank={rank}")
        outputs = []
        for rounds in (1, 2):
            res = subprocess.run([str(bindir / "flwr"), "run", str(REPO / "deploy" / "flower"), "local-test", "--stream",
                                  "--run-config", f"config='{cfg_path}' out='{out}' overrides='fed.rounds={rounds}'"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            outputs.append(res.stdout + res.stderr)
            assert res.returncode == 0 and "exported the global adapter" in outputs[-1], outputs[-1][-4000:]
    except BaseException:
        for path in logs:
            print(f"--- {path.name}\n{path.read_text()[-3000:]}")
        raise
    finally:
        stop(procs)
    seconds = time.perf_counter() - t0
    assert "resuming after round 1" in outputs[1]
    got = load_file(str(out / "final" / "global_adapter.safetensors"))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    lines = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"Flower deployment vs simulation: maxdiff {diff:.3g}; bytes per round "
          f"{[(m['bytes_down'], m['bytes_up']) for m in lines]}; {seconds:.0f} s")
    assert diff < 1e-5
    assert [m["round"] for m in lines] == [0, 1] and all(not m["missing"] for m in lines)
    for m, sim_m in zip(lines, metrics):
        assert m["bytes_down"] == m["comm_bytes_down"] == sim_m["bytes_down"] > 0
        assert m["bytes_up"] == m["comm_bytes_up"] == sim_m["bytes_up"] > 0
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
