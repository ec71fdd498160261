"""The SmolLM2 methods suite (configs/results_smollm2*.yaml): valid configs, cache reuse, a page that
regenerates byte-identically from the cache alone."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedhl_jax.config import TrainConfig, from_dict
from fedhl_jax.experiments import methods_suite as MS
from fedhl_jax.experiments import results_suite as R
from tests.conftest import REPO

SPECS = {name: OmegaConf.to_container(OmegaConf.load(REPO / "configs" / name))
         for name in ("results_smollm2_3rounds.yaml", "results_smollm2_cross_device.yaml")}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_run_is_a_valid_config(name):
    spec = SPECS[name]
    cells = MS.cells(spec)
    assert len({c["id"] for c in cells}) == len(cells)
    for cell in cells:
        for seed in spec["seeds"]:
            cfg = from_dict(TrainConfig, R.merge_overrides(spec["base"], dict(MS.run_overrides(spec, cell, seed), seed=seed)))
            gen = cell["section"] == "main" and seed in spec.get("generate_seeds", spec["seeds"])
            assert (cfg.eval.generate_examples > 0) == gen
            if cell["labels"]["method"].startswith("fedit"):
                assert len(set(cfg.fed.ranks)) == 1
    for a, b in spec.get("pairs", []):
        assert a in spec["methods"] and b in spec["methods"]
    assert {"fedhl", "flexlora"} <= set(spec["methods"])


def _fake_rec(rng, gen):
    loss = list(1.4 - np.cumsum(rng.uniform(0.01, 0.05, size=3)))
    rec = {"eval_loss": loss, "final_eval_loss": loss[-1], "train_loss": loss, "p": [[0.1] * 10] * 3,
           "ranks": [[2, 4, 8, 16, 2, 4, 8, 16, 2, 4]] * 3, "trunc_error": [], "bytes": 3 * 2**20, "seconds": 2.0}
    if gen:
        rec["eval_exact_match"] = float(rng.integers(0, 10)) / 200
    return rec


def test_runs_are_cached_and_the_page_regenerates_byte_identically(tmp_path, monkeypatch):
    spec = SPECS["results_smollm2_3rounds.yaml"]
    rng = np.random.default_rng(0)
    calls = []

    def fake_run_cell(base, overrides, seed):
        calls.append((json.dumps(overrides, sort_keys=True), seed))
        return _fake_rec(rng, overrides.get("eval.generate_examples", 1) != 0)

    monkeypatch.setattr(R, "run_cell", fake_run_cell)
    monkeypatch.setattr(MS, "zero_shot_cell", lambda base: {"eval_loss": 1.43, "eval_exact_match": 0.03,
                                                            "seconds": 5.0})
    cache = tmp_path / "results_smollm2_3rounds.jsonl"
    quiet = lambda *a, **k: None  # noqa: E731
    res = MS.run_suite(spec, cache, log=quiet)
    n_runs = len(MS.cells(spec)) * len(spec["seeds"])
    assert len(calls) == n_runs and len(set(calls)) == n_runs
    # seed by seed: every main-table method of seed 0 runs before any of seed 1
    main_seeds = [s for (ov, s) in calls[:len(spec["methods"]) * len(spec["seeds"])]]
    assert main_seeds == sorted(main_seeds)
    md1 = MS.render(spec, res, tmp_path, seconds=100.0, stem="results_smollm2_3rounds")
    png1 = (tmp_path / "figures" / "results_smollm2_3rounds_loss_vs_mb.png").read_bytes()
    # a second call reuses every cached run (nothing runs) and renders the same page
    res2 = MS.run_suite(spec, cache, log=quiet)
    assert len(calls) == n_runs
    md2 = MS.render(spec, res2, tmp_path, seconds=100.0, stem="results_smollm2_3rounds")
    assert md1 == md2 and (tmp_path / "figures" / "results_smollm2_3rounds_loss_vs_mb.png").read_bytes() == png1
    assert "| fedhl |" in md1 and "| rb_lora |" in md1 and "0.030" in md1  # the zero-shot floor is shown
    assert (tmp_path / "figures" / "results_smollm2_3rounds_weights.png").exists()
    # the hand-written discussion survives a regeneration
    page = R.keep_discussion(None, md1).replace(R.DISCUSSION_END, "my words\n" + R.DISCUSSION_END)
    assert "my words" in R.keep_discussion(page, md2)
    # a torn last line (an interrupted run) is ignored and that run is redone
    cache.write_text(cache.read_text() + '{"torn')
    assert MS.run_suite(spec, cache, log=quiet)["cells"] == res["cells"]


def test_paired_differences_are_per_seed():
    cells = {"a": {"runs": {0: {"x": 1.0}, 1: {"x": 2.0}, 2: {"x": 3.0}}},
             "b": {"runs": {0: {"x": 1.5}, 1: {"x": 2.1}}}}
    d = R.paired(cells, "a", "b", key="x")
    np.testing.assert_allclose(d, [-0.5, -0.1])
    assert MS._fmt_paired(d).endswith("(2/2 below)")


def test_committed_smollm2_cache_matches_the_spec():
    """Every run of the committed SmolLM2 cache is found under the digest its cell has today (a new
    config field at its default must not orphan them and make the suite rerun hours of work)."""
    spec = SPECS["results_smollm2_3rounds.yaml"]
    cells = {c["id"]: c for c in MS.cells(spec)}
    rows = [json.loads(line) for line in (REPO / "docs" / "results" / "results_smollm2_3rounds.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        if row["id"] == MS.ZERO_SHOT:
            assert row["config"] == "zero_shot-" + R.config_digest(spec["base"], {}, 0)
        else:
            ov = MS.run_overrides(spec, cells[row["id"]], row["seed"])
            assert R.config_digest(spec["base"], ov, row["seed"]) == row["config"], row["id"]
