"""The summary of reruns against cached runs (benchmarks/run.py: cut_pairs_summary)."""

import json

import numpy as np
import pytest

from benchmarks.run import cut_pairs_summary
from fedhl_jax.experiments import stats as S


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(method, seed, mean, cached, seconds):
    return {"setting": "cross_silo", "method": method, "seed": seed, "answer_mean": mean,
            "answer_mean_cached": cached, "seconds": seconds}


def test_against_the_cached_records_and_against_a_baseline_rerun(tmp_path):
    base = [row("a", 1, 1.00, 1.01, 100.0), row("b", 1, 2.00, 2.00, 200.0), row("c", 1, 3.00, 2.98, 300.0),
            row("d", 1, 4.0, 4.0, 400.0)]
    new = [row("a", 1, 1.02, 1.01, 80.0), row("b", 1, 1.99, 2.00, 150.0), row("c", 1, 3.03, 2.98, 240.0),
           row("e", 1, 9.0, 9.0, 1.0)]  # "e" has no baseline row: left out against the baseline
    write(tmp_path / "base.jsonl", base)
    write(tmp_path / "new.jsonl", new)
    got = cut_pairs_summary(tmp_path / "new.jsonl")
    d = np.array([0.01, -0.01, 0.05, 0.0])
    assert got["runs"] == 4 and got["mean_diff"] == pytest.approx(d.mean())
    assert got["ci95"] == pytest.approx([S.t_interval(d).low, S.t_interval(d).high])
    assert "seconds_ratio" not in got
    got = cut_pairs_summary(tmp_path / "new.jsonl", baseline=tmp_path / "base.jsonl")
    d = np.array([0.02, -0.01, 0.03])
    assert got["runs"] == 3 and got["mean_diff"] == pytest.approx(d.mean())
    assert got["max_abs_diff"] == pytest.approx(0.03) and got["sd_diff"] == pytest.approx(d.std(ddof=1))
    assert got["p"] == pytest.approx(S.t_two_sided_p(d.mean() / (d.std(ddof=1) / np.sqrt(3)), 2))
    assert got["seconds_ratio"] == pytest.approx(np.mean([0.8, 0.75, 0.8]))
