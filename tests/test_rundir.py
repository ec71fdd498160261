"""Run directory: lock, checkpoint checksums, quiet restore of broken checkpoints, atomic final export."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fedhl_jax import rundir as C
from fedhl_jax.rundir import (ChecksumMismatchError, NonFiniteError, RunDir, RunLockedError,
                                     acquire_run_lock, arrays_checksum, atomic_directory, check_finite,
                                     write_final)
from fedhl_jax.config import ConfigError, TrainConfig
from tests.conftest import REPO, flip_checkpoint_bytes

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def state(t: int, n: int = 4) -> dict:
    """Random (incompressible) arrays, so stored bytes are the values themselves."""
    rng = np.random.default_rng(t)
    return {"A": {f"m{i}": jnp.asarray(rng.normal(size=(48, 48)).astype(np.float32)) for i in range(n)},
            "round": jnp.asarray(t, jnp.int32)}


def run_with_checkpoints(path: Path, rounds=(1, 2), log=None) -> RunDir:
    run = RunDir(path, TrainConfig(), resume=False, log=log or (lambda m: None))
    run.begin()
    for t in rounds:
        run.save(t, state(t))
    return run


def resume(path: Path, logs: list) -> RunDir:
    run = RunDir(path, TrainConfig(), resume=True, log=logs.append)
    run.begin()
    return run


def assert_state(got, t):
    want = state(t)
    for k in want["A"]:
        np.testing.assert_array_equal(np.asarray(got["A"][k]), np.asarray(want["A"][k]))
    assert int(got["round"]) == t


# ------------------------------------------------------------------------------------ lock
def test_lock_refuses_a_second_start_and_resume(tmp_path):
    out = tmp_path / "run"
    first = run_with_checkpoints(out)
    for resume_flag in (False, True):
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on "):
            RunDir(out, TrainConfig(), resume=resume_flag)
    first.close()
    with RunDir(out, TrainConfig(), resume=True) as again:
        assert again.lock.held
    assert not again.lock.held


def test_lock_is_taken_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with acquire_run_lock(out):
        with pytest.raises(RunLockedError):
            RunDir(out, TrainConfig(), resume=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_refused_start_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    run_with_checkpoints(out).close()
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir(out, TrainConfig(), resume=False)
    acquire_run_lock(out).release()  # not left held by the refused attempt


def test_lock_of_a_killed_process_does_not_block_resume(tmp_path):
    out = tmp_path / "run"
    run_with_checkpoints(out).close()
    code = ("import sys, time; from fedhl_jax.rundir import acquire_run_lock; "
            f"lock = acquire_run_lock({str(out)!r}); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on "):
            RunDir(out, TrainConfig(), resume=True)
        assert C.read_lock_holder(out).startswith(f"pid {proc.pid} ")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    logs: list = []
    run = resume(out, logs)  # the kernel dropped the dead holder's lock
    restored, done = run.restore(state(0))
    assert done == 2 and logs == []
    assert C.read_lock_holder(out).startswith(f"pid {os.getpid()} ")


# ------------------------------------------------------------------------------------ checksums
def test_checkpoints_carry_a_checksum(tmp_path):
    out = tmp_path / "run"
    run_with_checkpoints(out).close()
    saved = json.loads((out / "checkpoints" / "2" / "checksum" / "metadata").read_text())
    flat = C._flatten(state(2))
    assert saved == {"sha256": arrays_checksum(flat), "arrays": len(flat)}
    logs: list = []
    restored, done = resume(out, logs).restore(state(0))
    assert done == 2 and logs == []
    assert_state(restored, 2)


def test_flipped_bytes_in_the_latest_checkpoint_fall_back(tmp_path):
    out = tmp_path / "run"
    run_with_checkpoints(out, rounds=(1, 2, 3)).close()
    flip_checkpoint_bytes(out / "checkpoints" / "3")
    logs: list = []
    restored, done = resume(out, logs).restore(state(0))
    assert done == 2
    assert_state(restored, 2)
    assert len(logs) == 1, logs
    assert "checkpoint of round 3" in logs[0] and "checkpoints_unreadable" in logs[0]
    assert "does not match its checksum" in logs[0] or "unreadable" in logs[0]
    assert not (out / "checkpoints" / "3").exists()
    assert [p.name.split("-")[0] for p in (out / "checkpoints_unreadable").iterdir()] == ["3"]


def test_checksum_mismatch_is_detected(tmp_path):
    """Arrays that read fine but differ from what was saved (here: the saved digest changed)."""
    out = tmp_path / "run"
    run_with_checkpoints(out).close()
    meta = out / "checkpoints" / "2" / "checksum" / "metadata"
    saved = json.loads(meta.read_text())
    saved["sha256"] = arrays_checksum(C._flatten(state(7)))
    meta.write_text(json.dumps(saved))
    logs: list = []
    restored, done = resume(out, logs).restore(state(0))
    assert done == 1
    assert_state(restored, 1)
    assert len(logs) == 1 and "checkpoint of round 2" in logs[0] and "does not match its checksum" in logs[0]


def test_checksum_covers_keys_dtypes_and_shapes():
    a = np.arange(6, dtype=np.float32)
    base = arrays_checksum({"x": a})
    assert base == arrays_checksum({"x": a.copy()}) == arrays_checksum({"x": jnp.asarray(a)})
    assert base != arrays_checksum({"y": a})
    assert base != arrays_checksum({"x": a.reshape(2, 3)})
    assert base != arrays_checksum({"x": a.astype(ml_dtypes.bfloat16)})
    assert arrays_checksum({"x": a, "y": a + 1}) == arrays_checksum({"y": a + 1, "x": a})
    assert issubclass(ChecksumMismatchError, ValueError)


def test_legacy_checkpoint_without_checksum_restores(tmp_path):
    import orbax.checkpoint as ocp

    out = tmp_path / "run"
    run_with_checkpoints(out, rounds=(1,)).close()
    mgr = ocp.CheckpointManager((out / "checkpoints").resolve(),
                                options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    mgr.save(2, args=ocp.args.StandardSave(C._flatten(state(2))), force=True)
    mgr.wait_until_finished()
    logs: list = []
    restored, done = resume(out, logs).restore(state(0))
    assert done == 2 and logs == []
    assert_state(restored, 2)


# ------------------------------------------------------------------------------------ quiet restore
NOISY = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    import numpy as np, jax.numpy as jnp
    from fedhl_jax.rundir import RunDir
    from fedhl_jax.config import TrainConfig

    def state(t):
        rng = np.random.default_rng(t)
        return {f"m{i}": jnp.asarray(rng.normal(size=(32, 32)).astype(np.float32)) for i in range(40)}

    base = Path(sys.argv[1])
    run = RunDir(base / "src", TrainConfig(), resume=False, log=print)
    run.begin()
    for t in (1, 2):
        run.save(t, state(t))
    run.close()
    for k in range(int(sys.argv[2])):
        out = base / f"copy{k}"
        shutil.copytree(base / "src", out)
        for f in (out / "checkpoints" / "2" / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.9)])
        run = RunDir(out, TrainConfig(), resume=True, log=print)
        run.begin()
        _, done = run.restore(state(0))
        assert done == 1, done
        run.close()
""")


def test_truncated_checkpoint_is_one_line_not_a_traceback_storm(tmp_path):
    copies = 6
    res = subprocess.run([sys.executable, "-c", NOISY, str(tmp_path), str(copies)], env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == copies and all("checkpoint of round 2" in line for line in lines), lines
    noise = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(noise) <= 1, "\n".join(noise[:40])
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr


# ------------------------------------------------------------------------------------ final export
def write_files(folder: Path, arrays: dict) -> None:
    for k, v in arrays.items():
        np.save(folder / f"{k}.npy", v)


def test_atomic_directory_replaces_and_keeps_the_old_on_failure(tmp_path, monkeypatch):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    assert (final / "a.txt").read_text() == "old"

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise Boom()
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left

    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    monkeypatch.setattr(C, "_exchange", lambda a, b: False)  # file systems without RENAME_EXCHANGE
    with atomic_directory(final) as tmp:
        (tmp / "c.txt").write_text("fallback")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_atomic_directory_recovers_from_a_kill_between_renames(tmp_path):
    final = tmp_path / "final"
    old = tmp_path / ".final.old-12345"
    old.mkdir()
    (old / "a.txt").write_text("complete")
    (tmp_path / ".final.tmp-abc").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(final):
            raise RuntimeError("stop")
    assert (final / "a.txt").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_write_final(tmp_path):
    arrays = {"x": jnp.ones((2, 3)), "y": np.arange(4, dtype=np.float32)}
    dest = write_final(tmp_path, arrays, write_files)
    assert dest == tmp_path / "final" and sorted(p.name for p in dest.iterdir()) == ["x.npy", "y.npy"]

    def half_then_fail(folder, arrays):
        np.save(folder / "x.npy", arrays["x"] * 0)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_final(tmp_path, arrays, half_then_fail)
    np.testing.assert_array_equal(np.load(dest / "x.npy"), np.ones((2, 3)))


def test_write_final_refuses_non_finite(tmp_path):
    write_final(tmp_path, {"x": np.ones(3, np.float32)}, write_files)
    bad = {"x": np.array([1.0, np.nan, np.inf], np.float32), "ok": np.ones(2, np.float32),
           "b16": np.array([np.inf], ml_dtypes.bfloat16), "ints": np.arange(3)}
    with pytest.raises(NonFiniteError) as e:
        write_final(tmp_path, bad, write_files)
    msg = str(e.value)
    assert "non-finite values in 2 of 4 arrays" in msg and "x (1 NaN, 1 inf of 3)" in msg and "b16" in msg
    assert "ok" not in msg.split("arrays:")[1] and "\n" not in msg
    np.testing.assert_array_equal(np.load(tmp_path / "final" / "x.npy"), np.ones(3))
    check_finite({"fine": jnp.zeros(3, jnp.bfloat16), "empty": np.zeros(0)})


# ------------------------------------------------------------------------------------ state layouts
def _alg_state(name: str, seed: int = 0):
    import jax

    from fedhl_jax.algorithms import make_algorithm

    alg = make_algorithm(name, 4)
    st = alg.init({"m": (6, 5)}, jax.random.PRNGKey(seed))
    G = {"m": jnp.asarray(np.random.default_rng(seed).normal(size=(6, 5)).astype(np.float32))}
    return alg, st.replace(G=G) if hasattr(st, "replace") else type(st)(**{**vars(st), "G": G})


def _save_legacy(out: Path, st) -> None:
    """A checkpoint as written before layouts were recorded (no ``state_layout`` in its JSON item)."""
    run = RunDir(out, TrainConfig(), resume=False, log=lambda m: None)
    run.begin()
    run.save(1, st)
    run.close()


def test_checkpoints_record_the_state_layout_and_restore_it(tmp_path):
    out = tmp_path / "run"
    alg, st = _alg_state("fedhl")
    run = RunDir(out, TrainConfig(), resume=False, log=lambda m: None)
    run.begin()
    run.save(1, st, layout=alg.state_layout)
    run.close()
    saved = json.loads((out / "checkpoints" / "1" / "checksum" / "metadata").read_text())
    assert saved[C.LAYOUT_KEY] == alg.state_layout == "dense/2"
    logs: list = []
    _, fresh = _alg_state("fedhl", seed=1)
    restored, done = resume(out, logs).restore(fresh, layout=alg.state_layout, migrate=alg.migrate_state)
    assert done == 1 and logs == []
    np.testing.assert_array_equal(np.asarray(restored.G["m"]), np.asarray(st.G["m"]))


def test_a_legacy_checkpoint_is_migrated_when_the_algorithm_reads_it(tmp_path):
    out = tmp_path / "run"
    alg, st = _alg_state("fedhl")
    _save_legacy(out, st)
    logs: list = []
    _, fresh = _alg_state("fedhl", seed=1)
    restored, done = resume(out, logs).restore(fresh, layout=alg.state_layout, migrate=alg.migrate_state)
    assert done == 1
    np.testing.assert_array_equal(np.asarray(restored.G["m"]), np.asarray(st.G["m"]))
    assert len(logs) == 1 and "'server-state/1'" in logs[0] and "'dense/2'" in logs[0], logs


def test_a_checkpoint_of_an_unreadable_layout_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    alg, st = _alg_state("fedhl_momentum")
    _save_legacy(out, st)  # fedhl_momentum reads only its own layout
    logs: list = []
    _, fresh = _alg_state("fedhl_momentum", seed=1)
    with pytest.raises(ConfigError, match=r"'server-state/1'.*'fedhl-momentum/1'"):
        resume(out, logs).restore(fresh, layout=alg.state_layout, migrate=alg.migrate_state)
    assert (out / "checkpoints" / "1").is_dir() and not (out / "checkpoints_unreadable").exists()
    assert logs == []
