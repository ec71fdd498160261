"""The results suite: every cell of configs/results.yaml is a valid config; the report renders."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedhl_jax.config import TrainConfig, from_dict
from fedhl_jax.experiments import results_suite as R
from tests.conftest import REPO

SPEC = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "results.yaml"))


def test_every_cell_is_a_valid_config():
    full, quick = R.cells(SPEC, quick=False), R.cells(SPEC, quick=True)
    assert len({c["id"] for c in full}) == len(full) and len(quick) < len(full)
    for cell in full + quick:
        cfg = from_dict(TrainConfig, R.merge_overrides(SPEC["base"], cell["overrides"]))
        if cell["labels"].get("method", "").startswith("fedit"):
            assert len(set(cfg.fed.ranks)) == 1
    assert all(R.merge_overrides(SPEC["base"], c["overrides"])["fed"]["rounds"] == SPEC["quick"]["rounds"] for c in quick)


def test_report_renders_from_fake_runs(tmp_path):
    cells = R.cells(SPEC, quick=True)
    rng = np.random.default_rng(0)
    results = {}
    for c in cells:
        runs = {}
        for seed in (0, 1):
            loss = list(5 - np.cumsum(rng.uniform(0.1, 0.3, size=3)))
            runs[seed] = {"eval_loss": loss, "final_eval_loss": loss[-1], "p": [[0.5, 0.5]] * 3,
                          "ranks": [[2, 16]] * 3, "trunc_error": [[1.0, 0.0]] * 3, "bytes": 3000,
                          "eval_exact_match": 0.0, "seconds": 1.0}
        results[c["id"]] = {"cell": c, "runs": runs}
    md = R.render(SPEC, results, tmp_path, quick=True, seconds=60)
    assert "| fedhl |" in md and "± " in md
    figures = tmp_path / "figures"
    assert (figures / "results_convergence_quick.png").exists() and (figures / "results_weights_quick.png").exists()


def test_cache_is_reused_only_for_the_same_config(tmp_path):
    import json

    cell = R.cells(SPEC, quick=True)[0]
    rec = {"eval_loss": [5.0], "final_eval_loss": 5.0, "seconds": 1.0}
    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps({"id": cell["id"], "seed": 0, "rec": rec}) + "\n"          # no digest: reused
                     + json.dumps({"id": cell["id"], "seed": 0, "config": "stale", "rec": rec}) + "\n"
                     + '{"torn')
    res = R.run_suite(SPEC, cache, quick=True, only="no cell has this id", log=lambda *a, **k: None)
    assert list(res) == []  # the later row (stale config) replaced the first: nothing reusable
    cache.write_text(json.dumps({"id": cell["id"], "seed": 0, "rec": rec}) + "\n")
    res = R.run_suite(SPEC, cache, quick=True, only="no cell has this id", log=lambda *a, **k: None)
    assert res[cell["id"]]["runs"][0]["final_eval_loss"] == 5.0


def test_cells_with_identical_configs_share_one_run(tmp_path):
    import json

    full = R.cells(SPEC, quick=False)
    part = next(c for c in full if c["id"] == "partition:partition=dirichlet_0.3/method=fedhl")
    main = next(c for c in full if c["id"] == "main:dataset=gsm8k/ranks=uniform/method=fedhl")
    assert R.merge_overrides(SPEC["base"], part["overrides"]) == R.merge_overrides(SPEC["base"], main["overrides"])
    other = next(c for c in full if c["id"] == "partition:partition=iid/method=fedhl")
    rec = {"eval_loss": [4.0], "final_eval_loss": 4.0, "seconds": 1.0}
    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps({"id": main["id"], "seed": 0, "rec": rec}) + "\n")
    res = R.run_suite(SPEC, cache, quick=False, only="no cell has this id", log=lambda *a, **k: None)
    assert res[part["id"]]["runs"][0] is res[main["id"]]["runs"][0]
    assert other["id"] not in res  # a different config is not reused


def test_regenerating_the_page_keeps_the_written_discussion():
    new = f"# Results\n| t | 1 |\n\n{R.DISCUSSION_BEGIN}\n{R.DISCUSSION_END}\n\n## Plots\n"
    assert R.keep_discussion(None, new) == new
    old = new.replace("| 1 |", "| 0 |").replace(R.DISCUSSION_END, "FedHL wins by 0.1.\n" + R.DISCUSSION_END)
    kept = R.keep_discussion(old, new)
    assert "| t | 1 |" in kept and "FedHL wins by 0.1." in kept and kept.count(R.DISCUSSION_BEGIN) == 1


def test_config_digest_sees_resolved_defaults_and_seed():
    cell = R.cells(SPEC, quick=False)[0]
    d = R.config_digest(SPEC["base"], cell["overrides"], 0)
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"fed.options.split": "balanced"}), 0) == d  # the default
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"fed.options.split": "left"}), 0) != d
    assert R.config_digest(SPEC["base"], cell["overrides"], 1) != d
    # eval.length_bucket: its default reproduces the runs made before it (to float rounding), 0 is another config
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"eval.length_bucket": 64}), 0) == d
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"eval.length_bucket": 0}), 0) != d
    # optim.length_bucket: 0 trains as the older runs did; the default cut is a different run (float rounding
    # that ten rounds amplify). eval.validation only reports: it trains nothing.
    assert SPEC["base"]["optim"]["length_bucket"] == 0  # the suite's committed runs trained at full width
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"optim.length_bucket": 32}), 0) != d
    base = dict(SPEC["base"], optim={k: v for k, v in SPEC["base"]["optim"].items() if k != "length_bucket"})
    assert R.config_digest(base, cell["overrides"], 0) != d  # the code default (32) is another run
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"eval.validation": False}), 0) == d
    assert R.config_digest(SPEC["base"], dict(cell["overrides"], **{"fed.clients_per_chunk": 1}), 0) != d


@pytest.mark.parametrize("quick", [True, False])
def test_committed_cache_covers_every_cell(quick):
    """A new config field at its default must not change the digests of the committed runs (else
    ``bin/results.py`` would rerun the whole suite instead of rendering its pages from the cache)."""
    spec, name = SPEC, f"results_{'quick' if quick else 'full'}.jsonl"
    cache = next(p for p in (REPO / "docs" / "results" / name, REPO / "docs" / name) if p.exists())
    have = {row.get("config") for row in R.read_cache(cache)}
    seeds = spec.get("quick", {}).get("seeds", [0]) if quick else spec["seeds"]
    missing = [(c["id"], s) for c in R.cells(spec, quick) for s in seeds
               if R.config_digest(spec["base"], c["overrides"], s) not in have]
    assert not missing, missing[:5]
