"""The run driver with a stand-in round executor: cadence, resume rule, divergence, export."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fedhl_jax import driver
from fedhl_jax.config import ConfigError, TrainConfig, load_config, to_dict
from fedhl_jax.engine import RoundRecord

MODULE = "layers.0.self_attn.q_proj"


class CountingExecutor:
    """A round adds ``t + 1`` to a ``[4, 3]`` "global update" (so the state says which rounds ran);
    ``nan_from``: rounds from there on report a NaN train loss."""

    data = evaluator = ranks = None
    model_source = SimpleNamespace(kind="random", path="random")
    algorithm = SimpleNamespace(state_layout="counting/1", migrate_state=None)

    def __init__(self, cfg, nan_from=None):
        self.cfg, self.nan_from, self.started, self.rounds = cfg, nan_from, [], []

    def init_state(self):
        return {"G": np.zeros((4, 3), np.float32)}

    def place_state(self, state):
        return state

    host_state = place_state

    def start(self, first_round):
        self.started.append(first_round)

    def run_round(self, state, t):
        self.rounds.append(t)
        loss = float("nan") if self.nan_from is not None and t >= self.nan_from else 1.0 / (t + 1)
        metrics = {"round": t, "train_loss": loss, "applied": True, "excluded": 0, "seconds": 0.0}
        info = {"valid": np.ones(2, bool)}
        return RoundRecord(t, {"G": state["G"] + (t + 1)}, info, np.arange(2), np.array([1, 2]), metrics)

    def evaluate(self, state, t=0, *, generate=None):
        return {}

    def global_delta(self, state):
        return {MODULE: state["G"]}


def config(rounds, **extra):
    return load_config(None, [f"fed.rounds={rounds}", "checkpoint.every=2", "fed.ranks=[1,2]"]
                       + [f"{k}={v}" for k, v in extra.items()])


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_its_cadence_and_its_resume(tmp_path):
    out, logs = tmp_path / "run", []
    cfg = config(3)
    ex = CountingExecutor(cfg)
    assert driver.run(cfg, out, lambda: ex, resume=False, log=logs.append) == driver.EXIT_OK
    assert ex.rounds == [0, 1, 2] and ex.started == [0]
    assert [r["round"] for r in rows(out)] == [0, 1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]  # every 2 rounds and the last
    assert any(line.startswith("done: fedhl, 3 rounds") for line in logs)
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(out / "final" / "global_adapter.safetensors"))[MODULE], 6.0)
    # Raising fed.rounds continues from the checkpoint of round 3, with the same state.
    cfg5 = config(5)
    ex = CountingExecutor(cfg5)
    assert driver.run(cfg5, out, lambda: ex, resume=True, log=logs.append) == driver.EXIT_OK
    assert ex.rounds == [3, 4] and ex.started == [3]
    assert any("fed.rounds raised from 3 to 5" in line for line in logs)
    np.testing.assert_array_equal(load_file(str(out / "final" / "global_adapter.safetensors"))[MODULE], 15.0)
    assert "rounds: 5" in (out / "config.yaml").read_text()


def test_a_refused_resume_builds_nothing_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert driver.run(config(2), out, lambda: CountingExecutor(config(2)), resume=False, log=lambda m: None) == 0
    before = (out / "metrics.jsonl").read_bytes()
    built = []
    cfg = config(2, **{"optim.lr": 0.5})
    code = driver.run(cfg, out, lambda: built.append(1), resume=True, log=lambda m: None)
    assert code == driver.EXIT_BAD_INPUT and not built
    err = capsys.readouterr().err
    assert "cannot resume with a different config" in err and "-> 0.5" in err.split("optim.lr:")[1].splitlines()[0]
    assert (out / "metrics.jsonl").read_bytes() == before


def test_divergence_stops_with_status_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(6)
    code = driver.run(cfg, out, lambda: CountingExecutor(cfg, nan_from=3), resume=False, log=lambda m: None)
    assert code == driver.EXIT_DIVERGED
    assert "the last good checkpoint (round 2)" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert not (out / "final").exists()


def test_a_start_refused_at_set_up_leaves_no_directory(tmp_path):
    out = tmp_path / "new"

    def build():
        raise ConfigError("data.source: /nowhere does not exist")

    assert driver.run(config(2), out, build, resume=False, log=lambda m: None) == driver.EXIT_BAD_INPUT
    assert not out.exists()


def test_the_resume_rule():
    saved = to_dict(TrainConfig())
    rounds = saved["fed"]["rounds"]
    assert driver.check_resume(saved, to_dict(TrainConfig())) is None
    assert driver.check_resume(saved, {"fed": {"rounds": rounds + 3}}) == rounds
    assert driver.check_resume(saved, {"mesh": {"clients": 2}}) is None  # the device layout may change
    with pytest.raises(ConfigError, match="may only be raised"):
        driver.check_resume(saved, {"fed": {"rounds": rounds - 1}})
    with pytest.raises(ConfigError, match=r"(?s)differences \(saved -> given\):.*fed.algorithm: 'fedhl' -> 'flexlora'"):
        driver.check_resume(saved, {"fed": {"algorithm": "flexlora"}, "optim": {"lr": 0.5}})


def test_watchdog_names_excluded_clients_but_not_missing_ones():
    logs = []
    dog = driver.Watchdog(2, logs.append)
    m = {"applied": True, "excluded": 2, "train_loss": 1.0, "missing": [7]}
    record = RoundRecord(0, None, {"valid": np.array([True, False, False])}, np.array([5, 6, 7]), None, m)
    assert dog(record) is None
    assert logs == ["round 1: clients [6] sent non-finite or overflowing updates and were excluded; "
                    "the weights of the others sum to 1"]
    off = dict(m, applied=False)
    assert dog(RoundRecord(1, None, {}, np.array([5]), None, off)) is None
    assert "2 rounds in a row" in dog(RoundRecord(2, None, {}, np.array([5]), None, off))



def test_a_checkpoint_of_an_unreadable_layout_refuses_the_resume_and_keeps_everything(tmp_path, capsys):
    """A run whose newest checkpoint holds a server-state layout its algorithm cannot read ends with
    exit 2 and one line naming both layouts; checkpoints, config and metrics are left as they were."""
    from fedhl_jax.simulation import Simulation
    from tests.conftest import tiny_overrides

    out, quiet = tmp_path / "run", (lambda *a, **k: None)
    over = tiny_overrides(tmp_path, **{"fed.algorithm": "fedhl_momentum", "fed.rounds": 2, "eval.every": 2})
    cfg = load_config(None, over)
    assert driver.run(cfg, out, lambda: Simulation(cfg, log=quiet), resume=False, log=quiet) == 0
    meta = out / "checkpoints" / "2" / "checksum" / "metadata"
    saved = json.loads(meta.read_text())
    assert saved["state_layout"] == "fedhl-momentum/1"
    meta.write_text(json.dumps({k: v for k, v in saved.items() if k != "state_layout"}))  # as before layouts
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in (".lock", "status.json")}
    cfg3 = load_config(None, over + ["fed.rounds=3"])
    capsys.readouterr()
    code = driver.run(cfg3, out, lambda: Simulation(cfg3, log=quiet), resume=True, log=quiet)
    err = capsys.readouterr().err
    assert code == driver.EXIT_BAD_INPUT
    assert "'server-state/1'" in err and "'fedhl-momentum/1'" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in (".lock", "status.json")} == before


def test_the_hard_stop_thread_has_ended_when_disarm_returns():
    """A reader thread still alive at the interpreter's shutdown dropped the run's JAX arrays there and
    crashed the process (SIGSEGV instead of exit status 130 after a Ctrl-C)."""
    import gc
    import signal
    import weakref

    class Held:  # stands for the run the stop callback reaches
        pass

    held = Held()
    ref = weakref.ref(held)
    stop = driver.HardStop(lambda: held)
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    stop.arm()
    thread = stop.thread
    assert thread is not None and thread.is_alive() and thread.daemon
    stop.disarm()
    assert not thread.is_alive() and stop.thread is None
    assert signal.set_wakeup_fd(before) == before  # the previous wake-up fd is back
    stop.disarm()  # twice is harmless
    del stop, held
    gc.collect()
    assert ref() is None  # nothing left holds the run
