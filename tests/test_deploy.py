"""A real federation with Flower: the strategy and the nodes against the in-process simulation,
a node that does not answer, and a local deployment (SuperLink, 3 SuperNodes, ``flwr run``)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reports from the tests (read at Flower's import)
flwr = pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

from fedhl_jax.build import build_algorithm  # noqa: E402
from fedhl_jax.config import load_config, save_config  # noqa: E402
from fedhl_jax.flower import client_app  # noqa: E402
from fedhl_jax.flower.node import node_identity, pack, unpack  # noqa: E402
from fedhl_jax.flower.server_app import lora_shapes  # noqa: E402
from fedhl_jax.flower.strategy import FedLoRAStrategy  # noqa: E402
from fedhl_jax.flower.wire import from_record  # noqa: E402
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
    alg = build_algorithm(cfg.fed)
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
    assert node_identity({"partition-id": 2, "rank": "8"})[:2] == (2, 8)
    with pytest.raises(ValueError, match="the node config has no 'rank'"):
        node_identity({"partition-id": 0})


def test_wire_bytes_are_the_messages_serialised_objects(task_identity):
    """``wire_bytes``: every object of the message's tree as Flower serialises it (the array values
    in chunks, plus per-array, per-record and per-message headers); identical chunks count once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedhl_jax.flower.strategy import array_record, payload_bytes, wire_bytes

    def message(n, fill=None):
        a = np.arange(n, dtype=np.float32) if fill is None else np.full(n, fill, np.float32)
        return Message(RecordDict({"arrays": array_record({"a": a, "b": np.ones((2, 3), np.float32)})}), 5, "train")

    small, big = wire_bytes(message(10)), wire_bytes(message(1010))
    assert 4000 <= big - small <= 4016  # the extra values, and a few header digits
    assert small > payload_bytes({"a": np.zeros(10, np.float32), "b": np.ones((2, 3), np.float32)})
    objects = get_all_nested_objects(message(10))
    assert {type(o).__name__ for o in objects.values()} == {"Message", "RecordDict", "ArrayRecord", "Array",
                                                            "ArrayChunk"}
    assert small == sum(len(o.deflate()) for o in objects.values())
    assert wire_bytes(message(1010, fill=0.0)) == wire_bytes(message(1010, fill=0.0))  # deterministic


def test_server_shapes_come_from_the_model_config_alone(tmp_path):
    """The server reads the LoRA shapes from ``config.json``: a folder without weights will do."""
    import shutil

    from fedhl_jax.assets import embedded_model_dir
    from fedhl_jax.model import load_pretrained, lora_targets

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(embedded_model_dir() / "config.json", folder / "config.json")
    cfg = load_config(None, [f"model.name_or_path={folder}", "fed.ranks=[1,2]"])
    model_cfg, _ = load_pretrained(embedded_model_dir())
    assert lora_shapes(cfg) == lora_targets(model_cfg, cfg.model.targets)


def test_the_server_compiles_in_the_runs_cpu_matmul_mode(setup):
    from fedhl_jax import runtime

    tmp, _, _, _ = setup
    before = runtime.cpu_matmul()
    try:
        for mode in ("accurate", "fast"):
            strategy_for(load_config(None, tiny_overrides(tmp, **{**FEDERATION, "model.cpu_matmul": mode})))
            assert runtime.cpu_matmul() == mode
    finally:
        runtime.set_cpu_matmul(before)


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


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,ranks", [("flora", "[1,2,4]"), ("ffa_lora", "[2,2,2]")])
def test_algorithms_that_move_the_base_or_freeze_a_factor(tmp_path, task_identity, algorithm, ranks):
    """FLoRA (the nodes also receive the base update ``base_delta``) and FFA-LoRA (only ``B``
    comes back) through the strategy and the nodes equal their simulation."""
    cfg = load_config(None, tiny_overrides(tmp_path, **{**FEDERATION, "fed.algorithm": algorithm, "fed.ranks": ranks,
                                                        "fed.rounds": 2}))
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    state, sim_metrics = sim.init_state(), []
    for t in range(2):
        record = sim.run_round(state, t)
        state, sim_metrics = record.state, sim_metrics + [record.metrics]
    want = sim.global_delta(state)
    save_config(cfg, tmp_path / "run.yaml")
    import jax

    shapes = lora_shapes(cfg)
    strategy = FedLoRAStrategy(cfg, shapes, build_algorithm(cfg.fed).init(shapes, jax.random.PRNGKey(cfg.seed)))
    node_ranks = [int(r) for r in sim.ranks]
    for pid, rank in enumerate(node_ranks):
        strategy.register(pid, 100 + pid, rank)
    for server_round in (1, 2):
        msgs = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None)
        replies = []
        for msg in msgs:
            pid = int(msg.content["config"]["partition-id"])
            ctx = Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "rank": node_ranks[pid]},
                          state=RecordDict(), run_config={"config": str(tmp_path / "run.yaml"), "overrides": ""})
            replies.append(client_app.train(msg, ctx))
        strategy.aggregate_train(server_round, replies)
    got = strategy.algorithm.global_delta(strategy.state)
    diff = max(float(np.abs(np.asarray(got[k]) - np.asarray(want[k])).max()) for k in want)
    print(f"{algorithm}: in-process federation vs simulation: maxdiff {diff:.3g}")
    assert diff < 1e-5
    for m, sim_m in zip(strategy.history, sim_metrics):
        assert m["bytes_up"] == m["comm_bytes_up"] == sim_m["bytes_up"]
        if algorithm == "ffa_lora":
            assert m["bytes_down"] == sim_m["bytes_down"] and m["bytes_up"] < m["bytes_down"]  # B only comes back
        else:  # FLoRA: the dense base update travels instead of the stacked factors comm_bytes assumes
            n = len(m["clients"])
            own = sim_m["bytes_down"] // (1 + n)  # comm_bytes: own factors + everyone's stack, per client
            assert m["bytes_down"] == own + n * sum(4 * a * b for a, b in shapes.values())


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
    B = {k: np.stack([unpack(from_record(replies[i].content["arrays"]), shapes, r_max,
                             RANKS[i])[0][k] for i in keep]) for k in shapes}
    A = {k: np.stack([unpack(from_record(replies[i].content["arrays"]), shapes, r_max,
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


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a SuperLink certificate for 127.0.0.1 / localhost signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, sign_key, *, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, link_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhl test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, ca=True)
    link = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, link_key, ca_key,
                ca=False, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    out = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(link.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(link_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return out


def make_node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format: ``(private, public)`` files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    public = path.with_suffix(".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return path, public


class LocalFederation:
    """``flower-superlink`` and one ``flower-supernode`` per partition on localhost (free ports), each
    in its own process group; ``run`` is ``flwr run deploy/flower``. ``close`` kills them all.

    ``secure``: TLS (a CA and a SuperLink certificate made here) and SuperNode authentication
    (``--enable-supernode-auth``; each node's public key registered with ``flwr supernode
    register`` before it starts, unless ``add_node(..., register=False)``)."""

    def __init__(self, tmp_path: Path, *, secure: bool = False):
        self.tmp, self.secure = tmp_path, secure
        self.port = free_port()
        home = tmp_path / "flwr-home"
        home.mkdir()
        self.certs = make_certificates(tmp_path / "certs") if secure else None
        tls = f'root-certificates = "{self.certs["ca"]}"' if secure else "insecure = true"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
                                          f'address = "127.0.0.1:{self.port}"\n{tls}\n')
        self.bindir = Path(sys.executable).parent
        self.env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        FLWR_TELEMETRY_ENABLED="0",
                        JAX_PLATFORMS="cpu", PATH=f"{self.bindir}{os.pathsep}{os.environ.get('PATH', '')}",
                        PYTHONPATH=str(REPO))
        self.procs, self.logs, self.nodes = [], [], {}

    def _start(self, name: str, *args, env: dict | None = None) -> subprocess.Popen:
        path = self.tmp / f"{name}.log"
        self.logs.append(path)
        proc = subprocess.Popen([str(self.bindir / name.split(".")[0]), *args], env={**self.env, **(env or {})},
                                cwd=self.tmp, stdout=open(path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_link(self) -> None:
        tls = (["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"] if self.secure else ["--insecure"])
        link = self._start("flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(self.port),
                           "--disable-runtime-dependency-installation", "--database", str(self.tmp / "state.db"))
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and link.poll() is None, (self.tmp / "flower-superlink.log").read_text()
                time.sleep(0.5)

    def add_node(self, key, node_config: str, *, register: bool = True, env: dict | None = None) -> None:
        """Starts the SuperNode ``key`` with ``node_config``; with ``secure``, with its own key pair,
        registered first unless ``register=False`` (an unknown node)."""
        tls = ["--insecure"]
        if self.secure:
            private, public = make_node_key(self.tmp / f"node-{key}.key")
            if register:
                done = subprocess.run([str(self.bindir / "flwr"), "supernode", "register", str(public), "local-test"],
                                      env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr
            tls = ["--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(private)]
        self.nodes[key] = self._start(f"flower-supernode.{key}", *tls, "--superlink", f"127.0.0.1:{self.port}",
                                      "--port", str(free_port()), "--node-config", node_config, env=env)

    def start(self, ranks) -> None:
        self.start_link()
        for pid, rank in enumerate(ranks):
            self.add_node(pid, f"partition-id={pid} rank={rank}")

    def run(self, run_config: str, **kw) -> subprocess.Popen:
        """``flwr run deploy/flower local-test --stream --run-config ...`` (output: ``.communicate()``)."""
        return subprocess.Popen([str(self.bindir / "flwr"), "run", str(REPO / "deploy" / "flower"), "local-test",
                                 "--stream", "--run-config", run_config], env=self.env, cwd=self.tmp, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)

    def kill_node(self, pid: int) -> None:
        stop([self.nodes[pid]])

    def dump_logs(self) -> None:
        for path in self.logs:
            print(f"--- {path.name}\n{path.read_text()[-3000:]}")

    def close(self) -> None:
        stop(self.procs)


def flwr_run(federation: LocalFederation, run_config: str, timeout: float = 300) -> str:
    proc = federation.run(run_config)
    federation.procs.append(proc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "exported the global adapter" in out, out[-4000:]
    return out


def test_local_deployment_matches_the_simulation(setup, tmp_path):
    """A real local federation: ``flower-superlink``, three ``flower-supernode`` processes (one per
    partition, ranks 1, 2, 4 in their node config) and ``flwr run deploy/flower``. The first call
    runs round 1 and stops; the second, with ``fed.rounds=2``, resumes the server from its
    checkpoint and runs round 2. The global adapter is the in-process simulation's, and the bytes
    of every round are the algorithm's ``comm_bytes`` and the simulation's accounting."""
    from safetensors.numpy import load_file

    tmp, cfg, want, metrics = setup
    cfg_path, out = tmp_path / "run.yaml", tmp_path / "server"
    save_config(cfg, cfg_path)
    federation = LocalFederation(tmp_path)
    t0 = time.perf_counter()
    try:
        federation.start(RANKS)
        outputs = [flwr_run(federation, f"config='{cfg_path}' out='{out}' overrides='fed.rounds={rounds}'")
                   for rounds in (1, 2)]
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.close()
    seconds = time.perf_counter() - t0
    assert "resuming after round 1" in outputs[1]
    got = load_file(str(out / "final" / "global_adapter.safetensors"))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"Flower deployment vs simulation: maxdiff {diff:.3g}; bytes per round "
          f"{[(m['bytes_down'], m['bytes_up']) for m in lines]}; {seconds:.0f} s")
    assert diff < 1e-5
    assert [m["round"] for m in lines] == [0, 1] and all(not m["missing"] for m in lines)
    for m, sim_m in zip(lines, metrics):
        assert m["bytes_down"] == m["comm_bytes_down"] == sim_m["bytes_down"] > 0
        assert m["bytes_up"] == m["comm_bytes_up"] == sim_m["bytes_up"] > 0
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]


@pytest.mark.slow
def test_a_node_killed_mid_round(setup, tmp_path, task_identity):
    """The node of partition 1 is killed (SIGKILL, with its processes) as round 2 starts: Flower
    reports it unavailable, the round aggregates the two other replies with renormalised weights
    and says so, and the result is the in-process strategy's with that reply dropped."""
    from safetensors.numpy import load_file

    tmp, cfg, _, _ = setup
    cfg_path, out = tmp_path / "run.yaml", tmp_path / "server"
    save_config(cfg, cfg_path)
    reference = strategy_for(cfg)
    run_in_process(reference, cfg_path, 2, drop={(2, 1)})
    want = {k: np.asarray(v) for k, v in reference.algorithm.global_delta(reference.state).items()}
    federation = LocalFederation(tmp_path)
    try:
        federation.start(RANKS)
        proc = federation.run(f"config='{cfg_path}' out='{out}' round-timeout=240")
        federation.procs.append(proc)
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        federation.kill_node(1)
        output, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, output[-4000:]
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.close()
    assert "aggregated 2 of 3 replies; clients [1] did not answer" in output, output[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["missing"] == [1] and lines[1]["p"][1] == 0 and abs(sum(lines[1]["p"]) - 1) < 1e-6
    got = load_file(str(out / "final" / "global_adapter.safetensors"))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    print(f"killed node: maxdiff {diff:.3g} against the in-process round without its reply")
    assert diff < 1e-5


class TwoNodeGrid:
    """A grid on which two of the three nodes a run needs ever connect."""

    def get_node_ids(self):
        return [101, 102]


def test_a_start_refused_at_node_discovery_blocks_no_fixed_rerun(setup, tmp_path, capsys):
    """A discovery error (too few nodes; rank=0, a rank above r_max, no partition-id take the same
    path): exit 2, no config.yaml left, the outcome in out/status.json; a rerun with another config
    on the same out is a new start, not a refused resume."""
    from fedhl_jax.flower.server_app import serve

    _, cfg, _, _ = setup
    out = tmp_path / "server"
    assert serve(TwoNodeGrid(), cfg, out, discover_timeout=0, log=lambda *_: None) == 2
    err = capsys.readouterr().err
    assert "2 node(s) connected after 0 s; fed.num_clients=3 needs one node per partition" in err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["rounds"] == 0 and "2 node(s) connected" in status["reason"]
    import dataclasses

    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.25))
    assert serve(TwoNodeGrid(), other, out, discover_timeout=0, log=lambda *_: None) == 2
    err = capsys.readouterr().err
    assert "cannot resume" not in err and "2 node(s) connected" in err

