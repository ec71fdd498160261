"""bin/train.py end to end: outputs, resume after a real SIGKILL, corrupt checkpoints, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import REPO, tiny_overrides

TRAIN = [sys.executable, str(REPO / "bin" / "train.py"), "--no-progress"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def train(out, overrides, *extra, check=True):
    res = subprocess.run(TRAIN + ["--out", str(out), *extra, *overrides], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def metrics_rounds(out):
    return [json.loads(line)["round"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_adapter(out):
    return load_file(str(Path(out) / "final" / "global_adapter.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 8 rounds."""
    tmp = tmp_path_factory.mktemp("ref")
    overrides = tiny_overrides(tmp, **{"fed.rounds": 8})
    train(tmp / "run", overrides)
    return tmp / "run", overrides


def test_outputs_of_a_run(reference):
    out, _ = reference
    assert metrics_rounds(out) == list(range(8))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "p", "trunc_error", "bytes_down", "bytes_up", "seconds", "clients", "ranks"):
        assert key in rows[0], key
    assert "eval_loss" in rows[1] and "eval_loss" not in rows[0]  # eval.every=2
    assert (out / "config.yaml").exists()
    assert (out / "final" / "peft_adapter" / "adapter_config.json").exists()
    assert set(final_adapter(out)) == {f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}


def test_zero_shot_once_and_generation_after_the_last_round(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"eval.zero_shot": "true", "eval.generate_examples": 3,
                                            "eval.generate_every": 0, "eval.max_new_tokens": 4, "eval.every": 1})
    res = train(tmp_path / "run", overrides)
    zs = json.loads((tmp_path / "run" / "zero_shot.json").read_text())
    assert np.isfinite(zs["eval_loss"]) and 0.0 <= zs["eval_exact_match"] <= 1.0 and zs["eval_generated"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["eval_exact_match" in r for r in rows] == [False, False, False, True]  # generate_every=0: last only
    assert all("eval_loss" in r for r in rows)
    assert f"exact match on 3 held-out prompts: {rows[-1]['eval_exact_match']:.4f} (zero-shot " in res.stdout
    stamp = (tmp_path / "run" / "zero_shot.json").stat().st_mtime_ns
    train(tmp_path / "run", [], "--resume", "fed.rounds=5")  # a resumed run keeps the first zero-shot file
    assert (tmp_path / "run" / "zero_shot.json").stat().st_mtime_ns == stamp


def test_resume_after_sigkill_matches_uninterrupted_run(reference, tmp_path):
    ref_out, overrides = reference
    out = tmp_path / "run"
    for target in (3, 6):  # kill twice, at different moments
        proc = subprocess.Popen(TRAIN + ["--out", str(out), *(["--resume"] if out.exists() else []), *overrides],
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= target:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = train(out, overrides, "--resume")
    assert "resuming after round" in res.stdout
    assert metrics_rounds(out) == list(range(8))  # each round exactly once
    ref, got = final_adapter(ref_out), final_adapter(out)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)


def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
    ref_out, overrides = reference
    out = tmp_path / "run"
    short = [o for o in overrides if not o.startswith("fed.rounds")] + ["fed.rounds=8"]
    proc = subprocess.Popen(TRAIN + ["--out", str(out), *short], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2
    for f in (out / "checkpoints" / str(steps[-1])).rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA" and "commit_success" not in f.name:
            f.write_bytes(b"garbage")
    res = train(out, short, "--resume")
    assert f"checkpoint of round {steps[-1]}" in res.stdout and "unreadable" in res.stdout
    assert f"resuming after round {steps[-2]}" in res.stdout
    assert metrics_rounds(out) == list(range(8))
    ref, got = final_adapter(ref_out), final_adapter(out)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)


def test_resume_with_different_config_is_refused(reference, tmp_path):
    ref_out, overrides = reference
    before = (ref_out / "metrics.jsonl").read_bytes()
    res = train(ref_out, overrides + ["optim.lr=0.5", "fed.algorithm=flexlora"], "--resume", check=False)
    assert res.returncode == 2
    assert "cannot resume with a different config" in res.stderr
    assert "optim.lr: 0.01 -> 0.5" in res.stderr and "fed.algorithm: 'fedhl' -> 'flexlora'" in res.stderr
    assert (ref_out / "metrics.jsonl").read_bytes() == before


def test_existing_run_without_resume_is_refused(reference):
    ref_out, overrides = reference
    before = (ref_out / "metrics.jsonl").read_bytes()
    res = train(ref_out, overrides, check=False)
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (ref_out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("override,msg", [
    ("fed.bogus=1", "unknown config key 'fed.bogus'; valid keys under 'fed': algorithm, num_clients"),
    ("optim.lr=0", "optim.lr must be > 0, got 0"),
    ("fed.participation=0", "fed.participation must be in (0, 1], got 0"),
    ("fed.options.eps=-1", "eps must be > 0, got eps=-1"),
    ("fed.eps=0.1", "config key 'fed.eps' moved to 'fed.options.eps'"),
    ("fed.options.eps_mode=weird", "unknown eps_mode 'weird'"),
    ("fed.clients_per_chunk=0", "fed.clients_per_chunk must be >= 1"),
    ("eval.length_bucket=-8", "eval.length_bucket must be >= 0 (0: no cut), got -8"),
    ("fed.algorithm=fedit", "needs homogeneous ranks"),
])
def test_bad_config_values(tmp_path, override, msg):
    res = train(tmp_path / "run", [override], check=False)
    assert res.returncode == 2
    assert msg in res.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_unwritable_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        res = train(ro / "run", tiny_overrides(tmp_path), check=False)
        assert res.returncode == 2 and "not writable" in res.stderr
    finally:
        ro.chmod(0o700)


def test_unwritable_output_directory_file_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = train(blocker / "run", tiny_overrides(tmp_path), check=False)
    assert res.returncode == 2 and "is not writable" in res.stderr
