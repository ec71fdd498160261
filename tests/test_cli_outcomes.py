"""fedhl-train's outcomes end to end: a diverged short run exits 3, --export-only, overrides before
--out, and a second Ctrl-C that stops at once leaving the last completed checkpoint intact."""

import json
import signal
import subprocess
import time

from fedhl_jax import cli
from tests.conftest import REPO, tiny_overrides
from tests.test_cli_reliability import ENV, TRAIN, rows, train, wait_for_rounds


def test_overrides_before_out_are_accepted():
    args = cli.parse_args(["fed.rounds=2", "--out", "x", "optim.lr=0.1", "--no-progress"])
    assert str(args.out) == "x" and args.overrides == ["fed.rounds=2", "optim.lr=0.1"] and args.no_progress


def test_a_short_diverged_run_exits_3_and_exports_nothing(tmp_path):
    """optim.lr=1e9 with one round (fewer than fed.stop_after_failed_rounds): not "done", exit 3."""
    out = tmp_path / "run"
    res = train(out, tiny_overrides(tmp_path, **{"optim.lr": 1e9, "fed.rounds": 1, "eval.every": 1}), check=False)
    assert res.returncode == 3, res.stdout[-1500:] + res.stderr[-1500:]
    assert "the last round (round 1) kept no client update" in res.stderr and "done:" not in res.stdout
    assert not (out / "final").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "diverged"


def test_export_only_refuses_other_changes_and_runs_with_no_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    assert cli.main(["--out", str(tmp_path / "run"), "--export-only", "export_rank=2", "optim.lr=0.1"]) == 2
    assert "--export-only may change the export settings only (export_rank); refused: optim.lr" in \
        capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path / "run"), "--export-only", "--resume"]) == 2
    assert "--export-only reads the run's own config.yaml; leave out --resume and --config" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path / "none"), "--export-only"]) == 2
    assert "--export-only: " in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    over = tiny_overrides(tmp_path, **{"fed.rounds": 40, "optim.local_steps": 400, "eval.every": 40})
    proc = subprocess.Popen(TRAIN + ["--out", str(out), *over], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 2, proc)  # round 1 is checkpointed before round 2 runs
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # two signals sent at once would reach the process as one
    proc.send_signal(signal.SIGINT)  # within the round that runs now (about half a second)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-1500:] + stderr[-1500:]
    assert time.time() - t0 < 5
    assert "second Ctrl-C: stopping now" in stderr
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    saved = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 1 and saved <= len(rows(out)) + 1
    res = train(out, ["--export-only", "export_rank=1"])  # the checkpoint restores and matches its checksum
    assert f"exported the checkpoint of round {saved}" in res.stdout and "unreadable" not in res.stdout
    assert json.loads((out / "final" / "peft_adapter" / "adapter_config.json").read_text())["r"] == 1


def test_an_export_rank_the_model_cannot_hold_is_refused_before_training(tmp_path, capsys):
    """The tiny model's k/v projections are 32 x 16: export_rank=64 is refused at once, exit 2."""
    out = tmp_path / "run"
    assert cli.main(["--no-progress", "--out", str(out), *tiny_overrides(tmp_path, export_rank=64)]) == 2
    err = capsys.readouterr().err
    assert "export_rank=64 exceeds the largest rank the LoRA modules allow (16" in err, err
    assert [line for line in err.splitlines() if "Traceback" in line or line.startswith("error")] == [
        err[err.index("error:"):].strip()] and not out.exists()
