"""``fedhl-plot``: draws the curves of several runs into one PNG.

  fedhl-plot runs/fedhl runs/flexlora --metric eval_loss --out curves.png [--label fedhl flexlora]

Each run is a run directory (its ``metrics.jsonl`` is read) or a ``metrics.jsonl`` file. A metric
that none of the runs records is an error (exit status 2) that names it and the metrics present;
nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def read_metrics(run: Path) -> list[dict]:
    """The rows of one run's ``metrics.jsonl``.

    Args:
      run: a run directory or a ``metrics.jsonl`` file.

    Returns:
      One dict per line, in file order.

    Raises:
      FileNotFoundError: the file does not exist (the message names the path).
      json.JSONDecodeError: a line is not JSON.
    """
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or a metrics.jsonl file)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def numeric_metrics(data: list[list[dict]]) -> list[str]:
    """The metrics that at least one row of one run records as a number, sorted (``round`` excluded).

    Args:
      data: per run, its rows as returned by :func:`read_metrics`.

    Returns:
      Sorted metric names.
    """
    names = {k for rows in data for r in rows for k, v in r.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(names - {"round"})


def plot_runs(data: list[list[dict]], labels: list[str], metrics: list[str]):
    """One panel per metric, one line per run; x is the round as in metrics.jsonl (0-based, integer ticks).

    Args:
      data: per run, its rows (each with ``round``).
      labels: one legend label per run.
      metrics: the metrics to draw, one panel each.

    Returns:
      The matplotlib figure (not saved).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for rows, label in zip(data, labels):
            pts = [(r["round"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (as in metrics.jsonl, from 0)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def main(argv=None) -> int:
    """Command line of ``fedhl-plot``; returns the exit status (0, or 2 on bad input)."""
    p = argparse.ArgumentParser(prog="fedhl-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    p.add_argument("--metric", nargs="+", default=["train_loss", "eval_loss"], help="metrics to plot, one panel each")
    p.add_argument("--label", nargs="*", help="legend labels (default: directory names)")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        p.error(f"--label got {len(args.label)} labels for {len(args.runs)} runs")
    try:
        data = [read_metrics(r) for r in args.runs]
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    present = numeric_metrics(data)
    missing = [m for m in args.metric if m not in present]
    if missing:
        print(f"error: metric {', '.join(repr(m) for m in missing)} is in none of the runs; "
              f"metrics present: {', '.join(present) or '(none)'}", file=sys.stderr)
        return EXIT_BAD_INPUT
    fig = plot_runs(data, args.label or [r.name if r.is_dir() else r.parent.name for r in args.runs], args.metric)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0
