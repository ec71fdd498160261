"""fedhl_jax.plotting (``fedhl-plot``): rounds as in metrics.jsonl (from 0), integer ticks; unknown metrics refused."""

import json

import numpy as np

from fedhl_jax import plotting as plot


def _run_dir(tmp_path, name="run", rounds=3):
    run = tmp_path / name
    run.mkdir()
    rows = [{"round": t, "train_loss": 5.0 - 0.1 * t, "eval_loss": 5.5 - 0.1 * t} for t in range(rounds)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_rounds_from_zero_and_integer_ticks():
    rows = [{"round": t, "train_loss": 5.0 - 0.1 * t} for t in range(3)]
    fig = plot.plot_runs([rows], ["run"], ["train_loss"])
    ax = fig.axes[0]
    x = ax.lines[0].get_xdata()
    np.testing.assert_array_equal(x, [0, 1, 2])
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_main_writes_one_panel_per_metric(tmp_path, capsys):
    a, b = _run_dir(tmp_path, "a"), _run_dir(tmp_path, "b")
    out = tmp_path / "sub" / "curves.png"
    assert plot.main([str(a), str(b / "metrics.jsonl"), "--metric", "eval_loss", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_unknown_metric_is_an_error_naming_it_and_the_metrics_present(tmp_path, capsys):
    run = _run_dir(tmp_path)
    out = tmp_path / "curves.png"
    code = plot.main([str(run), "--metric", "eval_loss", "nonexistent", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "'nonexistent'" in err and "eval_loss, train_loss" in err and "'eval_loss'" not in err
    assert not out.exists()


def test_missing_run_is_an_error_naming_the_path(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert plot.main([str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err and not out.exists()


def test_numeric_metrics_ignores_round_strings_and_booleans():
    rows = [{"round": 0, "train_loss": 1.0, "phase": "zero-shot", "diverged": False}, {"round": 1, "eval_em": 0}]
    assert plot.numeric_metrics([rows[:1], rows[1:]]) == ["eval_em", "train_loss"]
