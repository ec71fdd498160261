"""bin/train.py under misuse: runs that must not mix, divergence, wrong paths, tampered checkpoints,
Ctrl-C, resume habits, the end of a run, and the quickstart on a machine without ../shared."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedhl_jax.rundir import read_lock_holder
from tests.conftest import REPO, flip_checkpoint_bytes, tiny_overrides

TRAIN = [sys.executable, str(REPO / "bin" / "train.py"), "--no-progress"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def train(out, args, check=True, cwd=REPO, cmd=TRAIN):
    res = subprocess.run(cmd + ["--out", str(out), *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                         timeout=900)
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def wait_for_rounds(out, n, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        m = Path(out) / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-round run; a second start into its directory is tried while it runs."""
    tmp = tmp_path_factory.mktemp("ref")
    overrides = tiny_overrides(tmp, **{"fed.rounds": 6})
    out = tmp / "run"
    proc = subprocess.Popen(TRAIN + ["--out", str(out), *overrides], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and read_lock_holder(out) is None:
        time.sleep(0.01)  # the lock is taken first; the first round then compiles for a while
    second = train(out, overrides + ["fed.algorithm=flexlora"], check=False)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    return out, overrides, stdout, second, proc.pid


def test_second_start_into_a_running_directory_is_refused(reference):
    """Finding 1: two runs into one --out mixed their metrics, config and checkpoints."""
    out, _, _, second, pid = reference
    assert second.returncode == 2
    assert f"pid {pid}" in second.stderr and "in use by another run" in second.stderr
    assert [r["round"] for r in rows(out)] == list(range(6))  # one run's rounds, each once
    assert "algorithm: fedhl" in (out / "config.yaml").read_text()


def test_status_line_and_summary(reference):
    _, _, stdout, _, _ = reference
    assert "compiling the round step" in stdout
    assert "done: fedhl, 6 rounds" in stdout and "held-out loss" in stdout and "metrics:" in stdout


def test_divergence_stops_loudly_and_exports_nothing(tmp_path):
    """Finding 2: optim.lr=1e9 ran to the end with all-zero weights and exported a collapsed adapter."""
    out = tmp_path / "run"
    res = train(out, tiny_overrides(tmp_path, **{"optim.lr": 1e9, "fed.rounds": 6}), check=False)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    assert "training diverged" in res.stderr and "last good checkpoint" in res.stderr
    assert not (out / "final").exists()
    got = rows(out)
    assert len(got) == 3  # stopped after 3 rounds in a row without a usable update
    for r in got:
        assert r["excluded"] == len(r["clients"]) and r["applied"] is False and sum(r["p"]) == 0
    assert (out / "checkpoints").is_dir()


def test_wrong_data_or_model_path_is_an_error_not_a_switch(tmp_path):
    """Finding 3: a mistyped data.data_dir silently switched to the Hub and left an empty run directory."""
    out = tmp_path / "run"
    res = train(out, ["data.data_dir=/nonexistent/data-dir"], check=False)
    assert res.returncode == 2
    assert "/nonexistent/data-dir" in res.stderr and "does not exist" in res.stderr and "data.data_dir" in res.stderr
    assert "data.source=hub" in res.stderr  # says how to fix it
    assert not out.exists()
    res = train(out, ["model.name_or_path=/nonexistent/model"], check=False)
    assert res.returncode == 2 and "/nonexistent/model" in res.stderr and not out.exists()


def test_resume_of_a_finished_run_with_a_tampered_checkpoint(tmp_path):
    """Finding 4: --resume re-exported final/ from a byte-flipped checkpoint (NaN), then crashed."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"fed.rounds": 3})
    train(out, overrides)
    before = load_file(str(out / "final" / "global_adapter.safetensors"))
    flip_checkpoint_bytes(out / "checkpoints" / "3")
    res = train(out, ["--resume"])  # the run's own config.yaml: no --config, no overrides
    assert "checkpoint of round 3" in res.stdout and "does not match its checksum" in res.stdout
    assert "checkpoints_unreadable" in res.stdout
    assert "resuming after round 2" in res.stdout
    assert len(res.stderr.splitlines()) < 20  # no traceback storm
    after = load_file(str(out / "final" / "global_adapter.safetensors"))
    for k in before:
        assert np.all(np.isfinite(after[k]))
        np.testing.assert_allclose(after[k], before[k], atol=1e-6, rtol=0)
    assert (out / "final" / "peft_adapter" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints_unreadable").is_dir()


def test_ctrl_c_saves_and_resume_is_exact(reference, tmp_path):
    ref_out, overrides, _, _, _ = reference
    out = tmp_path / "run"
    proc = subprocess.Popen(TRAIN + ["--out", str(out), *overrides], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stdout[-1500:] + stderr[-1500:]
    assert "interrupted: stopped after round" in stdout and "--resume" in stdout
    done = len(rows(out))
    assert 2 <= done < 6 and (out / "checkpoints" / str(done)).is_dir()  # the last round was saved
    res = train(out, ["--resume"])
    assert f"resuming after round {done}" in res.stdout
    assert [r["round"] for r in rows(out)] == list(range(6))
    ref, got = load_file(str(ref_out / "final" / "global_adapter.safetensors")), load_file(
        str(out / "final" / "global_adapter.safetensors"))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)


def test_resume_habits(reference, tmp_path):
    """--resume needs no --config, may raise fed.rounds, refuses other changes and missing runs."""
    ref_out, overrides, _, _, _ = reference
    out = tmp_path / "run"
    train(out, [o for o in overrides if not o.startswith("fed.rounds")] + ["fed.rounds=2"])
    res = train(out, ["--resume", "fed.rounds=3"])
    assert "fed.rounds raised from 2 to 3" in res.stdout
    got, ref = rows(out), rows(ref_out)
    assert [r["round"] for r in got] == [0, 1, 2]
    np.testing.assert_allclose([r["train_loss"] for r in got], [r["train_loss"] for r in ref[:3]], rtol=1e-6)
    assert "rounds: 3" in (out / "config.yaml").read_text()
    res = train(out, ["--resume", "fed.rounds=1"], check=False)
    assert res.returncode == 2 and "may only be raised" in res.stderr
    res = train(out, ["--resume", "optim.lr=0.5"], check=False)
    assert res.returncode == 2 and "optim.lr: 0.01 -> 0.5" in res.stderr
    res = train(tmp_path / "nothing", ["--resume"], check=False)
    assert res.returncode == 2 and "holds no run" in res.stderr and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("text,msg", [("fed: {rounds: 2\n", "line "), ("", "is empty"),
                                      ("# only a comment\n", "is empty")])
def test_malformed_or_empty_yaml_is_one_line(tmp_path, text, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    res = train(tmp_path / "run", ["--config", str(cfg)], check=False)
    assert res.returncode == 2 and msg in res.stderr and str(cfg) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_quickstart_runs_without_shared_and_without_network(tmp_path):
    """The quickstart config, one round, from a copy of the project with no ../shared beside it."""
    copy = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith(("docs/", "tests/golden")):
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, copy / f)
    assert not (copy.parent / "shared").exists()
    env = {k: v for k, v in ENV.items() if k not in ("FEDHL_DATA_DIR", "FEDHL_SHARED_DIR")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(copy))
    out = tmp_path / "qs"
    res = subprocess.run([sys.executable, str(copy / "bin" / "train.py"), "--no-progress", "--config",
                          str(copy / "configs" / "quickstart.yaml"), "--out", str(out), "fed.rounds=1",
                          "eval.generate_examples=2"], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "embedded stories260K" in res.stdout and "embedded copy" in res.stdout
    assert "done: fedhl, 1 rounds" in res.stdout and "use it:" in res.stdout
    peft = json.loads((out / "final" / "peft_adapter" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"].endswith("stories260K-hf")
    assert np.isfinite(rows(out)[0]["eval_loss"])
