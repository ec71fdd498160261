"""bin/plot.py: rounds as in metrics.jsonl (from 0), integer ticks."""

import importlib.util

import numpy as np

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("plot", REPO / "bin" / "plot.py")
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def test_rounds_from_zero_and_integer_ticks():
    rows = [{"round": t, "train_loss": 5.0 - 0.1 * t} for t in range(3)]
    fig = plot.plot_runs([rows], ["run"], ["train_loss"])
    ax = fig.axes[0]
    x = ax.lines[0].get_xdata()
    np.testing.assert_array_equal(x, [0, 1, 2])
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
