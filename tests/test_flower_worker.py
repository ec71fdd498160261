"""The long-lived node worker: a ClientApp with ``worker=`` gets the in-process training's numbers
without importing JAX, and a worker that is missing or dies fails the request, naming its socket."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from fedhl_jax.build import build_algorithm  # noqa: E402
from fedhl_jax.config import load_config, save_config  # noqa: E402
from fedhl_jax.flower import client_app  # noqa: E402
from fedhl_jax.flower.server_app import lora_shapes  # noqa: E402
from fedhl_jax.flower.strategy import FedLoRAStrategy  # noqa: E402
from fedhl_jax.flower.worker import TrainRequest, WorkerError, ask, key_path  # noqa: E402
from fedhl_jax.flower.wire import from_record  # noqa: E402
from tests.conftest import REPO, tiny_overrides  # noqa: E402
from tests.test_deploy import stop, task_identity  # noqa: E402,F401 (a fixture)

RANKS = [2, 4]
#: The embedded stories260K, 2 clients in every round at ranks 2 and 4, the simulation's partitions.
CONFIG = {"model.name_or_path": "auto", "fed.num_clients": 2, "fed.participation": 1.0, "fed.ranks": "[2,4]",
          "fed.rounds": 2, "optim.optimizer": "sgd", "optim.lr": 0.5, "data.eval_examples": 0, "data.seq_len": 160}
HEAVY = ("jax", "jaxlib", "flax", "optax", "transformers", "tokenizers", "fedhl_jax.model", "fedhl_jax.simulation")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The run's config file and a node worker process listening on its socket."""
    tmp = tmp_path_factory.mktemp("worker")
    cfg = load_config(None, tiny_overrides(tmp, **CONFIG))
    save_config(cfg, tmp / "run.yaml")
    sock = tmp / "node.sock"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "fedhl_jax.flower.worker", "--socket", str(sock)], env=env,
                            stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while not key_path(sock).exists():
        assert proc.poll() is None and time.time() < deadline, (tmp / "worker.log").read_text()
        time.sleep(0.1)
    yield tmp, cfg, sock
    stop([proc])


def context(tmp: Path, pid: int, **extra) -> Context:
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "rank": RANKS[pid], **extra},
                   state=RecordDict(), run_config={"config": str(tmp / "run.yaml"), "overrides": ""})


def two_node_strategy(cfg) -> FedLoRAStrategy:
    """The server's strategy with the nodes of partitions 0 and 1 registered at ``RANKS``."""
    import jax

    shapes = lora_shapes(cfg)
    strategy = FedLoRAStrategy(cfg, shapes, build_algorithm(cfg.fed).init(shapes, jax.random.PRNGKey(cfg.seed)),
                               log=lambda *_: None)
    for pid, rank in enumerate(RANKS):
        strategy.register(pid, 100 + pid, rank)
    return strategy


def test_the_worker_gives_the_in_process_numbers(worker, task_identity):
    """Two rounds, two nodes: each message answered by the ClientApp training in-process and by the
    same ClientApp forwarding to the worker; the factors, losses and sizes are identical, and the
    rounds aggregate the worker's replies."""
    tmp, cfg, sock = worker
    strategy = two_node_strategy(cfg)
    for server_round in (1, 2):
        replies = []
        for msg in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None):
            pid = int(msg.content["config"]["partition-id"])
            here = client_app.train(msg, context(tmp, pid))
            there = client_app.train(msg, context(tmp, pid, worker=str(sock)))
            a, b = from_record(here.content["arrays"]), from_record(there.content["arrays"])
            assert sorted(a) == sorted(b) and len(a) == 2 * len(strategy.shapes)
            for k in a:
                np.testing.assert_array_equal(b[k], a[k], err_msg=k)
            for key in ("losses", "num-examples", "round", "partition-id"):
                assert there.content["metrics"][key] == here.content["metrics"][key], key
            assert there.content["metrics"]["train-seconds"] > 0
            replies.append(there)
        strategy.aggregate_train(server_round, replies)
        assert not strategy.history[-1]["missing"]


def test_a_clientapp_with_a_worker_imports_no_jax(worker, task_identity, tmp_path):
    """A fresh process (as Flower's per-message ``flwr-clientapp``) answers a train message through
    the worker without importing JAX, Flax, the tokenizers or the model; its reply is the
    in-process one."""
    tmp, cfg, sock = worker
    strategy = two_node_strategy(cfg)
    msg = next(m for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)
               if int(m.content["config"]["partition-id"]) == 1)
    want = from_record(client_app.train(msg, context(tmp, 1)).content["arrays"])
    np.savez(tmp_path / "arrays.npz", **from_record(msg.content["arrays"]))
    (tmp_path / "config.json").write_text(json.dumps(dict(msg.content["config"])))
    script = f"""
import json, sys
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedhl_jax.flower import client_app
from fedhl_jax.flower.wire import from_record, to_record
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
arrays = dict(np.load({str(tmp_path / "arrays.npz")!r}))
config = json.load(open({str(tmp_path / "config.json")!r}))
msg = Message(RecordDict({{"arrays": to_record(arrays),
                           "config": ConfigRecord(config)}}), 101, "train")
ctx = Context(run_id=1, node_id=101, node_config={{"partition-id": 1, "rank": 4, "worker": {str(sock)!r}}},
              state=RecordDict(), run_config={{"config": {str(tmp / "run.yaml")!r}, "overrides": ""}})
reply = client_app.train(msg, ctx)
np.savez({str(tmp_path / "reply.npz")!r}, **from_record(reply.content["arrays"]))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m in {HEAVY!r})))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    got = np.load(tmp_path / "reply.npz")
    assert sorted(got.files) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_request_the_worker_cannot_serve_fails_with_its_error(worker):
    tmp, _, sock = worker
    request = TrainRequest({"config": str(tmp / "run.yaml"), "overrides": ""}, 0, 99, None, None, 0, {})
    with pytest.raises(WorkerError, match=rf"node worker at {re.escape(str(sock))} failed: ConfigError: rank=99 is outside \[1, 4\]"):
        ask(sock, request)


def test_a_missing_socket_is_named(tmp_path, task_identity):
    sock = tmp_path / "nowhere" / "node.sock"
    request = TrainRequest({}, 0, 1, None, None, 0, {})
    with pytest.raises(WorkerError, match=rf"no node worker at {re.escape(str(sock))}: the socket does not exist"):
        ask(sock, request)
    sock.parent.mkdir()
    sock.write_bytes(b"")  # a file where the socket should be, and its key: nothing listens
    key_path(sock).write_bytes(b"k")
    with pytest.raises(WorkerError, match=rf"the node worker at {re.escape(str(sock))} refuses connections"):
        ask(sock, request)


def test_a_worker_that_dies_mid_request_fails_the_request(tmp_path):
    """A worker that reads the request and goes away without replying: the node's request fails at
    once, naming the socket (it does not wait)."""
    sock = tmp_path / "dying.sock"
    key_path(sock).write_bytes(b"secret")
    listener = Listener(str(sock), family="AF_UNIX", authkey=b"secret")

    def die():
        conn = listener.accept()
        conn.recv()
        conn.close()
        listener.close()

    thread = threading.Thread(target=die, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    with pytest.raises(WorkerError, match=rf"the node worker at {re.escape(str(sock))} closed the connection before replying"):
        ask(sock, TrainRequest({}, 0, 1, None, None, 0, {"B/m": np.zeros((3, 1), np.float32)}))
    assert time.perf_counter() - t0 < 10
    thread.join(timeout=10)


def test_a_second_worker_on_a_live_socket_is_refused(worker):
    from fedhl_jax.flower.worker import serve

    _, _, sock = worker
    with pytest.raises(WorkerError, match=f"a node worker already listens on {re.escape(str(sock))}"):
        serve(sock, log=lambda *_: None)


def test_the_least_recently_used_trainer_is_dropped(worker):
    """``max_trainers=1``: a request under another run config loads a new trainer and drops the
    old one; a trainer is kept by its run config, client id, rank, data and ranks."""
    from fedhl_jax.flower.node import pack
    from fedhl_jax.flower.worker import Worker

    tmp, cfg, _ = worker
    shapes = lora_shapes(cfg)
    arrays = pack({k: np.zeros((o, 4), np.float32) for k, (o, i) in shapes.items()},
                  {k: np.full((4, i), 0.01, np.float32) for k, (o, i) in shapes.items()}, 2)
    keep = dict(client_app._trainers)
    client_app._trainers.clear()
    try:
        w = Worker(max_trainers=1)
        runs = [{"config": str(tmp / "run.yaml"), "overrides": lr} for lr in ("optim.lr=0.5", "optim.lr=0.25")]
        replies = [w.train(TrainRequest(run, 0, 2, None, None, 0, arrays)) for run in runs]
        assert [k[0] for k in client_app._trainers] == [tuple(sorted(runs[1].items()))]
        for reply in replies:
            assert sorted(reply.arrays) == sorted(arrays) and reply.losses.shape == (cfg.optim.local_steps,)
        first = "B/" + next(iter(shapes))
        assert not np.array_equal(replies[0].arrays[first], replies[1].arrays[first])  # the learning rates differ
    finally:
        client_app._trainers.clear()
        client_app._trainers.update(keep)
    with pytest.raises(ValueError, match="max_trainers=0 must be at least 1"):
        Worker(max_trainers=0)


def test_sigterm_while_a_request_trains_ends_the_worker_cleanly(tmp_path, task_identity):
    """SIGTERM while a request's thread was inside JAX ended the worker with SIGSEGV (the interpreter's
    shutdown ended that thread there); now the worker exits with 0, its socket and key removed, and the
    node's request fails naming the socket."""
    import signal

    cfg = load_config(None, tiny_overrides(tmp_path, **CONFIG))
    save_config(cfg, tmp_path / "run.yaml")
    sock, log = tmp_path / "node.sock", tmp_path / "worker.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "fedhl_jax.flower.worker", "--socket", str(sock)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not key_path(sock).exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        msg = next(iter(two_node_strategy(cfg).configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)))
        pid = int(msg.content["config"]["partition-id"])
        errors = []

        def request():
            try:
                client_app.train(msg, context(tmp_path, pid, worker=str(sock)))
            except WorkerError as e:
                errors.append(str(e))

        node = threading.Thread(target=request)
        node.start()
        while "loaded the trainer" not in log.read_text():  # the request's thread now compiles and trains
            assert proc.poll() is None and time.time() < deadline + 120, log.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        node.join(timeout=60)
        assert not sock.exists() and not key_path(sock).exists()
        assert len(errors) == 1 and str(sock) in errors[0], errors
    finally:
        stop([proc])
