"""How a run ends when something goes wrong: an untrained or non-finite result (exit 3), damaged
metrics on resume, export checks before the first round, ``--export-only``, a refused federation
start, a full disk, and the ``status.json`` each call leaves (``driver.run`` with a stand-in executor)."""

import errno
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from fedhl_jax import driver
from fedhl_jax.config import ConfigError
from fedhl_jax.engine import RoundRecord
from tests.test_driver import MODULE, CountingExecutor, config, rows


class Failing(CountingExecutor):
    """``excluded_from``: rounds from there on keep no client update (the state is unchanged);
    ``eval_nan``: the held-out loss is NaN; ``start_error``: ``start`` refuses (a federation's nodes)."""

    def __init__(self, cfg, excluded_from=None, eval_nan=False, start_error=None, evaluator=None):
        super().__init__(cfg)
        self.excluded_from, self.eval_nan, self.start_error, self.evaluator = excluded_from, eval_nan, start_error, evaluator

    def start(self, first_round):
        if self.start_error:
            raise ConfigError(self.start_error)
        super().start(first_round)

    def run_round(self, state, t):
        record = super().run_round(state, t)
        if self.excluded_from is not None and t >= self.excluded_from:
            record.metrics.update(applied=False, excluded=2, train_loss=float("nan"))
            return RoundRecord(record.t, state, record.info, record.ids, record.ranks, record.metrics)
        return record

    def evaluate(self, state, t=0, *, generate=None):
        return {"eval_loss": float("nan") if self.eval_nan else 1.0}


def status(out):
    return json.loads((out / "status.json").read_text())


def quiet(*a, **k):
    pass


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_last_round_that_kept_no_update_exits_3_and_exports_nothing(tmp_path, capsys, rounds):
    """Fewer rounds than fed.stop_after_failed_rounds (3), every one excluded: not "done"."""
    out, cfg = tmp_path / "run", config(rounds)
    code = driver.run(cfg, out, lambda: Failing(cfg, excluded_from=0), resume=False, log=quiet)
    err = capsys.readouterr().err
    assert code == driver.EXIT_DIVERGED
    assert f"the last round (round {rounds}) kept no client update" in err and len(err.strip().splitlines()) == 1
    assert not (out / "final").exists() and not (out / "checkpoints" / str(rounds)).exists()  # not checkpointed
    assert status(out)["state"] == "diverged" and "kept no client update" in status(out)["reason"]


def test_an_excluded_round_before_the_last_is_tolerated(tmp_path, capsys):
    """The neighbour: one failed round in the middle, the last one applied, ends as before."""
    out, cfg = tmp_path / "run", config(3)

    class MiddleFails(Failing):
        def run_round(self, state, t):
            self.excluded_from = 1 if t == 1 else None
            return super().run_round(state, t)

    assert driver.run(cfg, out, lambda: MiddleFails(cfg), resume=False, log=quiet) == driver.EXIT_OK
    assert status(out) | {"time": None} == {"state": "done", "reason": f"3 rounds; exported to {out / 'final'}",
                                            "rounds": 3, "time": None}


@pytest.mark.parametrize("applied", [True, False])
def test_a_nan_held_out_loss_exits_3(tmp_path, capsys, applied):
    out, cfg = tmp_path / "run", config(4, **{"eval.every": 1})
    code = driver.run(cfg, out, lambda: Failing(cfg, eval_nan=True, excluded_from=None if applied else 0),
                      resume=False, log=quiet)
    assert code == driver.EXIT_DIVERGED
    assert "eval_loss became nan in round 1" in capsys.readouterr().err
    assert not (out / "final").exists() and status(out)["state"] == "diverged"


def test_a_nan_zero_shot_loss_exits_3_before_training(tmp_path, capsys):
    out, cfg = tmp_path / "run", config(2, **{"eval.zero_shot": True})
    ex = Failing(cfg, eval_nan=True, evaluator=object())
    assert driver.run(cfg, out, lambda: ex, resume=False, log=quiet) == driver.EXIT_DIVERGED
    assert "the starting model's held-out loss is not finite" in capsys.readouterr().err
    assert ex.rounds == [] and not (out / "final").exists()


def test_damaged_metrics_are_reported_kept_and_the_checkpoint_decides(tmp_path):
    out, logs = tmp_path / "run", []
    assert driver.run(config(4), out, lambda: CountingExecutor(config(4)), resume=False, log=quiet) == 0
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    damaged = b"{not json\n" + lines[1] + b"\xff\xfe\n" + b"".join(lines[3:])  # rounds 0 and 2 unreadable
    (out / "metrics.jsonl").write_bytes(damaged)
    import shutil

    shutil.rmtree(out / "checkpoints" / "4")  # the newest checkpoint is of round 2
    cfg = config(5)
    assert driver.run(cfg, out, lambda: CountingExecutor(cfg), resume=True, log=logs.append) == 0
    said = [line for line in logs if "unreadable line" in line]
    assert len(said) == 1 and "2 unreadable line(s) (line 1, 3)" in said[0]
    kept = list(out.glob("metrics.jsonl.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged  # nothing deleted
    assert [r["round"] for r in rows(out)] == [1, 2, 3, 4]  # readable rows <= the checkpoint, then rerun rounds


def test_an_intact_metrics_file_is_not_copied(tmp_path):
    out = tmp_path / "run"
    assert driver.run(config(2), out, lambda: CountingExecutor(config(2)), resume=False, log=quiet) == 0
    assert driver.run(config(3), out, lambda: CountingExecutor(config(3)), resume=True, log=quiet) == 0
    assert not list(out.glob("metrics.jsonl.damaged-*")) and [r["round"] for r in rows(out)] == [0, 1, 2]


def test_an_export_rank_too_large_is_refused_before_the_first_round(tmp_path, capsys):
    out, cfg = tmp_path / "run", config(2, export_rank=4)  # the stand-in's module is [4, 3]
    ex = CountingExecutor(cfg)
    assert driver.run(cfg, out, lambda: ex, resume=False, log=quiet) == driver.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "export_rank=4 exceeds the largest rank the LoRA modules allow (3" in err
    assert ex.rounds == [] and not out.exists()


def test_a_module_the_export_cannot_name_is_refused_before_the_first_round(tmp_path, capsys):
    cfg = config(2)

    class Odd(CountingExecutor):
        def global_delta(self, state):
            return {"encoder.q": state["G"]}

    assert driver.run(cfg, tmp_path / "run", lambda: Odd(cfg), resume=False, log=quiet) == driver.EXIT_BAD_INPUT
    assert "the export would fail: not a LoRA module name: 'encoder.q'" in capsys.readouterr().err


def test_export_only_writes_final_from_the_checkpoint_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert driver.run(config(3), out, lambda: CountingExecutor(config(3)), resume=False, log=quiet) == 0
    before = (out / "metrics.jsonl").read_bytes()
    cfg = config(3, export_rank=1)
    ex, logs = CountingExecutor(cfg), []
    assert driver.run(cfg, out, lambda: ex, resume=False, export_only=True, log=logs.append) == driver.EXIT_OK
    assert ex.rounds == [] and ex.started == []
    assert json.loads((out / "final" / "peft_adapter" / "adapter_config.json").read_text())["r"] == 1
    np.testing.assert_array_equal(load_file(str(out / "final" / "global_adapter.safetensors"))[MODULE], 6.0)
    assert (out / "metrics.jsonl").read_bytes() == before and status(out)["state"] == "done"
    assert any("exported the checkpoint of round 3" in line for line in logs)


def test_export_only_without_a_checkpoint_is_refused(tmp_path, capsys):
    out, cfg = tmp_path / "run", config(2)
    assert driver.run(cfg, out, lambda: Failing(cfg, excluded_from=0), resume=False, log=quiet) == 3
    capsys.readouterr()
    assert driver.run(cfg, out, lambda: CountingExecutor(cfg), resume=False, export_only=True,
                      log=quiet) == driver.EXIT_BAD_INPUT
    assert "holds no checkpoint to export" in capsys.readouterr().err and not (out / "final").exists()
    assert status(out)["state"] == "diverged"  # the run's outcome, not the export's


def test_a_start_refused_by_the_nodes_leaves_nothing_that_blocks_a_fixed_rerun(tmp_path, capsys):
    """A federation's discovery error (rank=0, rank > r_max, no partition-id): exit 2, config.yaml
    removed, the reason in status.json; a rerun with another config on the same out starts afresh."""
    out, cfg = tmp_path / "run", config(2)
    ex = Failing(cfg, start_error="node 7 reports rank=0; a node's rank must be in [1, fed.r_max]")
    assert driver.run(cfg, out, lambda: ex, resume=False, log=quiet) == driver.EXIT_BAD_INPUT
    assert "node 7 reports rank=0" in capsys.readouterr().err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    assert status(out)["state"] == "failed" and "rank=0" in status(out)["reason"] and status(out)["rounds"] == 0
    fixed = config(2, **{"optim.lr": 0.5})
    assert driver.run(fixed, out, lambda: CountingExecutor(fixed), resume=False, log=quiet) == driver.EXIT_OK
    assert "lr: 0.5" in (out / "config.yaml").read_text() and status(out)["state"] == "done"


def test_a_resume_of_a_run_that_finished_no_round_starts_it_with_the_given_config(tmp_path):
    """A server killed during discovery leaves config.yaml; the next start (resume=True, as
    ``serve`` does when config.yaml exists) takes its own config instead of refusing the change."""
    out = tmp_path / "run"
    out.mkdir()
    from fedhl_jax.config import save_config

    save_config(config(2), out / "config.yaml")
    fixed = config(2, **{"optim.lr": 0.5})
    assert driver.run(fixed, out, lambda: CountingExecutor(fixed), resume=True, log=quiet) == driver.EXIT_OK
    assert "lr: 0.5" in (out / "config.yaml").read_text() and [r["round"] for r in rows(out)] == [0, 1]


def test_a_full_disk_gives_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    out, cfg = tmp_path / "run", config(4)
    real = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert driver.run(cfg, out, lambda: CountingExecutor(cfg), resume=False, log=quiet) == driver.EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot write the checkpoint of round 4" in err and "No space left on device" in err
    assert "the checkpoint of round 2 is kept" in err and status(out)["state"] == "failed"
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    ex = CountingExecutor(cfg)
    assert driver.run(cfg, out, lambda: ex, resume=True, log=quiet) == driver.EXIT_OK
    assert ex.rounds == [2, 3] and [r["round"] for r in rows(out)] == [0, 1, 2, 3]
    np.testing.assert_array_equal(load_file(str(out / "final" / "global_adapter.safetensors"))[MODULE], 10.0)


def test_a_full_disk_before_the_first_round_is_one_line_too(tmp_path, capsys, monkeypatch):
    import fedhl_jax.rundir as C

    def save_config(cfg, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(C, "save_config", save_config)
    out, cfg = tmp_path / "run", config(2)
    ex = CountingExecutor(cfg)
    assert driver.run(cfg, out, lambda: ex, resume=False, log=quiet) == driver.EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err == f"error: [Errno 28] No space left on device: '{out / 'config.yaml'}'" and ex.rounds == []
    assert status(out)["state"] == "failed"
