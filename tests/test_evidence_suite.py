"""The evidence suite (configs/results_smollm2.yaml): tuning order and rule, seeds at each method's own
rate, leaders, resume from the cache, and a page regenerated from the cache alone (training replaced by a
synthetic record whose validation loss has a known best rate per method)."""

import copy
import json
import math

import numpy as np
import pytest
import yaml

from fedhl_jax.experiments import evidence_suite as E
from fedhl_jax.experiments import results_suite as R
from tests.conftest import REPO

SPEC = yaml.safe_load((REPO / "configs" / "results_smollm2.yaml").read_text())
GPU_SPEC = yaml.safe_load((REPO / "configs" / "results_smollm2_gpu.yaml").read_text())
#: the synthetic validation optimum of each method (log2 of lr / 4e-3): off-grid ones need an extension
OPT = {"flexlora": 0.0, "fedhl": -1.0, "fedhl_data_size": 3.0, "fedhl_balanced": -4.0, "rb_lora": 1.0,
       "rb_lora_cap2": 0.4, "raflora_uniform": 1.6, "fedhl_rb": 0.9, "hetlora": -0.2, "fedit_r16": 0.1}


def _method(ov):
    for m, mov in SPEC["methods"].items():
        if all(ov.get(k) == v for k, v in mov.items()) and ov.get("fed.algorithm") == mov["fed.algorithm"]:
            if all(k in ov for k in mov) and not any(k.startswith("fed.options") and k not in mov for k in ov):
                return m
    raise AssertionError(ov)


def fake_run_cell(calls, validated=None):
    validated = [] if validated is None else validated

    def run_cell(base, overrides, seed, log=None):
        m, lr = _method(overrides), overrides["optim.lr"]
        calls.append((m, lr, seed, overrides.get("fed.num_clients", 10), overrides.get("data.dataset", "gsm8k")))
        validated.append(overrides.get("eval.validation", True))
        x = math.log2(lr / 0.004) - OPT[m]
        val = 1.0 + 0.01 * x * x + 0.001 * list(OPT).index(m)
        rng = np.random.default_rng([seed, int(lr * 1e6), list(OPT).index(m)])
        ex = (val + 0.3 * rng.normal(size=200)).tolist()
        return {"final_val_loss": val, "final_eval_loss": val + 0.01, "eval_loss": [val + 0.01], "eval_rounds": [10],
                "train_loss": [1.0] * 10, "bytes": 10 * 2**20, "eval_loss_examples": ex,
                "global_norm": [0.1 * lr / 0.004] * 10, "update_norm": [0.01 * lr / 0.004] * 10,
                "energy_beyond": {"2": [0.5] * 10, "8": [0.1] * 10, "16": [0.0] * 10}, "seconds": 1.0,
                **({"eval_exact_match": 0.05, "eval_exact_match_examples": [1.0] * 10 + [0.0] * 190}
                   if overrides.get("eval.generate_examples") else {})}
    return run_cell


@pytest.fixture
def spec():
    """The suite's spec with the grid rule (the bracket rule: ``test_bracket_tuning``)."""
    s = copy.deepcopy(SPEC)
    s["zero_shot"] = False
    s["tune"] = {"seed": 0, "grid": [0.004, 0.002, 0.008, 0.001], "extend": 1}
    return s


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_config_is_valid_and_every_run_resolves(name):
    from fedhl_jax.config import TrainConfig, from_dict

    spec = SPEC if name == "cpu" else GPU_SPEC

    for setting in E.setting_names(spec):
        for m in spec["methods"]:
            for lr in E.candidate_rates(spec):
                from_dict(TrainConfig, R.merge_overrides(spec["base"], dict(E.overrides(spec, setting, m, lr), seed=1)))
    for a, b in spec["pairs"]:
        assert a in spec["methods"] and b in spec["methods"]


def test_tuning_rule_seeds_leaders_and_resume(spec, tmp_path, monkeypatch):
    calls, validated = [], []
    monkeypatch.setattr(R, "run_cell", fake_run_cell(calls, validated))
    cache = tmp_path / "c.jsonl"
    res = E.run_suite(spec, cache, log=lambda *a, **k: None)
    grid = spec["tune"]["grid"]
    # tuning first: every method at grid[0], then grid[1], ... (round-robin), seed 0, cross-silo
    n = len(spec["methods"])
    assert [c[1] for c in calls[:n * len(grid)]] == [g for g in grid for _ in range(n)]
    assert all(c[2] == 0 and c[3] == 10 for c in calls[:n * len(grid)])
    # the best validation rate of each method, extended one step beyond the grid's edge at most
    want = {m: 0.004 * 2 ** min(max(round(o), -3), 2) for m, o in OPT.items()}  # grid 2^-2..2^1, one step beyond
    assert res["tuned"] == pytest.approx(want)
    tried = {m: sorted(E.tried(spec, res["by_config"], m)) for m in spec["methods"]}
    assert tried["fedhl_data_size"] == [0.001, 0.002, 0.004, 0.008, 0.016]  # best at 8e-3 -> 1.6e-2 tried, and kept
    assert tried["fedhl_balanced"] == [0.0005, 0.001, 0.002, 0.004, 0.008]
    assert tried["flexlora"] == sorted(grid)
    # seeds 1, 2 at the method's own rate; seed 0 is the tuning run (not rerun)
    silo = [c for c in calls if c[3] == 10 and c[4] == "gsm8k" and c[2] > 0]
    assert sorted((c[0], c[2]) for c in silo) == sorted((m, s) for m in spec["methods"] for s in (1, 2))
    assert all(c[1] == pytest.approx(want[c[0]]) for c in silo)
    # the leaders (lowest tuned validation loss) alone run the other settings (flexlora, named by
    # cross_device's ``also``, leads here), each at its setting's seeds
    val = {m: 1.0 + 0.01 * (math.log2(want[m] / 0.004) - OPT[m]) ** 2 + 0.001 * list(OPT).index(m) for m in OPT}
    lead = sorted(val, key=lambda m: (val[m], m))[:4]
    assert res["leaders"] == lead
    other = [c for c in calls if c[3] == 100 or c[4] == "codealpaca"]
    n_seeds = sum(len(spec["settings"][st]["seeds"]) for st in ("cross_device", "codealpaca"))
    assert "flexlora" in lead and sorted(set(c[0] for c in other)) == sorted(lead) and len(other) == 4 * n_seeds
    assert [c for c in calls if c[0] == lead[0]][-1][2] == 0  # the final generation pass, seed 0
    assert res["final_generation"] and res["final_generation"][0][1]["eval_exact_match"] == 0.05
    # the validation loss is computed where it chooses something (the tuning runs) and nowhere else
    tuning = [c[2] == 0 and c[3] == 10 and c[4] == "gsm8k" for c in calls]
    assert validated[:-1] == tuning[:-1] and validated[-1] is False  # the last: the final generation pass
    assert sum(validated) == sum(len(v) for v in tried.values()) and not all(validated)
    # resume: nothing reruns; an interrupted suite ends with the same cache
    before = len(calls)
    E.run_suite(spec, cache, log=lambda *a, **k: None)
    assert len(calls) == before
    cache2 = tmp_path / "c2.jsonl"
    for _ in range(200):
        if E.run_suite(spec, cache2, log=lambda *a, **k: None, max_runs=7)["final_generation"]:
            break
    key = lambda p: sorted(json.dumps(json.loads(line), sort_keys=True) for line in p.read_text().splitlines())
    assert key(cache) == key(cache2)


def test_also_runs_a_method_beside_the_leaders_and_names_it(spec, tmp_path, monkeypatch):
    """``also`` adds methods to a ``leaders`` setting (at their own tuned rate, every seed of the setting);
    a method it names that is already a leader runs once; an unknown one is refused before any run."""
    calls = []
    monkeypatch.setattr(R, "run_cell", fake_run_cell(calls))
    spec["settings"]["cross_device"]["also"] = ["hetlora", "flexlora"]  # flexlora leads in this synthetic suite
    res = E.run_suite(spec, tmp_path / "c.jsonl", log=lambda *a, **k: None)
    lead = res["leaders"]
    assert "flexlora" in lead and "hetlora" not in lead
    device = [c for c in calls if c[3] == 100]
    seeds = spec["settings"]["cross_device"]["seeds"]
    assert sorted((c[0], c[2]) for c in device) == sorted((m, s) for m in lead + ["hetlora"] for s in seeds)
    assert all(c[1] == pytest.approx(res["tuned"][c[0]]) for c in device)
    assert sorted(set(c[0] for c in calls if c[4] == "codealpaca")) == sorted(lead)  # no also there
    md = E.render(spec, res, tmp_path, stem="results_smollm2")
    assert "and beside them hetlora in cross_device." in md
    row = next(r for r in md.splitlines() if r.startswith("| hetlora |"))  # method, lr, silo, device, codealpaca
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3].endswith(f"({len(seeds)} seeds)") and cells[4] == "–"
    spec["settings"]["cross_device"]["also"] = ["fedavg"]
    calls.clear()
    with pytest.raises(ValueError, match=r"settings.cross_device names method\(s\) \['fedavg'\]"):
        E.run_suite(spec, tmp_path / "c2.jsonl", log=lambda *a, **k: None)
    assert calls == []


def test_rerun_supersedes_cached_records_once_and_counts_both(spec, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(R, "run_cell", fake_run_cell(calls))
    cache = tmp_path / "c.jsonl"
    res = E.run_suite(spec, cache, log=lambda *a, **k: None)
    n_rows, seconds, lead = len(cache.read_text().splitlines()), res["seconds"], res["leaders"]
    calls.clear()
    # interrupted after 2 reruns, then resumed: each matching run reruns exactly once
    part = E.run_suite(spec, cache, log=lambda *a, **k: None, only="codealpaca", rerun="seed 0", max_runs=2)
    assert len(calls) == 2 and len(part["superseded"]) == 2
    res = E.run_suite(spec, cache, log=lambda *a, **k: None, only="codealpaca", rerun="seed 0")
    assert sorted((c[0], c[2], c[4]) for c in calls) == sorted((m, 0, "codealpaca") for m in lead)
    assert len(cache.read_text().splitlines()) == n_rows + len(lead)
    assert len(res["superseded"]) == len(lead) and res["seconds"] == pytest.approx(seconds + len(lead))
    assert E.run_suite(spec, cache, log=lambda *a, **k: None, only="codealpaca", rerun="seed 0")["seconds"] \
        == pytest.approx(seconds + len(lead)) and len(calls) == len(lead)  # nothing reruns twice
    md = E.render(spec, res, tmp_path, stem="results_smollm2")
    assert f"and {len(lead)} earlier record(s) they superseded" in md and "Reruns (`--rerun`)" in md


def test_bracket_tuning_walks_the_ladder_to_each_methods_best(tmp_path, monkeypatch):
    spec = copy.deepcopy(SPEC)
    spec["zero_shot"] = False
    assert spec["tune"]["search"] == "bracket"
    ladder = sorted(spec["tune"]["ladder"])
    calls = []
    monkeypatch.setattr(R, "run_cell", fake_run_cell(calls))
    res = E.run_suite(spec, tmp_path / "c.jsonl", log=lambda *a, **k: None)
    n = len(spec["methods"])
    # pass 1: every method at the start; pass 2: every method one step up
    assert [c[1] for c in calls[:n]] == [spec["tune"]["start"]] * n
    assert [c[1] for c in calls[n:2 * n]] == [2 * spec["tune"]["start"]] * n
    for m, o in OPT.items():
        best = min(ladder, key=lambda lr: abs(math.log2(lr / 0.004) - o))
        assert res["tuned"][m] == pytest.approx(best), m
        tried = sorted(E.tried(spec, res["by_config"], m))
        i = ladder.index(best)
        # the best's neighbours ran; the walk went from the start to the best and one step past it
        assert all(ladder[j] in tried for j in (i - 1, i + 1) if 0 <= j < len(ladder))
        lo, hi = min(0.004, best), max(0.008, best)
        want = [lr for lr in ladder if lo / 2 <= lr <= hi * 2 and (lr >= lo or lr == best / 2) and (lr <= hi or lr == best * 2)]
        assert tried == want, (m, tried)
    n_tune = sum(len(E.tried(spec, res["by_config"], m)) for m in OPT)
    assert n_tune < 4 * len(OPT)  # fewer tuning runs than the 4-rate grid
    with pytest.raises(ValueError, match=r"tune.start=0.003 is not on tune.ladder"):
        E.next_rate(dict(spec, tune=dict(spec["tune"], start=0.003)), {})
    with pytest.raises(ValueError, match=r"tune.search must be 'grid' or 'bracket', got 'line'"):
        E.next_rate(dict(spec, tune=dict(spec["tune"], search="line")), {})


def test_page_from_the_cache_alone(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "run_cell", fake_run_cell([]))
    cache = tmp_path / "c.jsonl"
    E.run_suite(spec, cache, log=lambda *a, **k: None)
    monkeypatch.setattr(R, "run_cell", lambda *a, **k: pytest.fail("render must not train"))
    res = E.run_suite(spec, cache, log=lambda *a, **k: None)
    md = E.render(spec, res, tmp_path, stem="results_smollm2")
    assert md == E.render(spec, res, tmp_path, stem="results_smollm2")
    assert "## Which method, per setting" in md and "## Named comparisons" in md and "p (paired t)" in md
    row = next(line for line in md.splitlines() if line.startswith("| flexlora | 0.004 |"))
    assert row.count("[") == 3  # an interval in all three settings (it leads)
    assert "not decided" in md or " < " in md
    assert (tmp_path / "figures" / "results_smollm2_loss_vs_norm.png").exists()
    assert "At matched update size" in md
    # one definition of held-out loss on the page: the step-size table shows the mean over answers
    r = E.tried(spec, res["by_config"], "flexlora")[0.004]
    step = md.split("## Step size", 1)[1]
    assert f"| flexlora | 0.004 | **{r['final_val_loss']:.4f}** | {np.mean(r['eval_loss_examples']):.4f} |" in step
    assert f"{r['final_eval_loss']:.4f} |" not in step.split("| flexlora | 0.004 |", 1)[1].splitlines()[0]
    w = E.S.wilson_ci(10, 200)  # the final pass of the fake cell: 10 of 200 questions
    assert f"exact match 0.050 [{w.low:.3f}, {w.high:.3f}] (10 of 200 test questions; Wilson 95% interval)" in md
    assert "The named pairs at matched ‖G‖_F" in md
    after = md.split("The named pairs at matched ‖G‖_F", 1)[1]
    row = next(line for line in after.splitlines() if line.startswith("| fedhl − flexlora |"))
    assert row.count("[") == 3 and "–" not in row  # an interval at each of the three matched norms


def test_at_norm_interpolates_each_example_in_log_norm():
    rng = np.random.default_rng(1)
    l1, l2, l3 = (rng.normal(size=7) for _ in range(3))
    pts = [(4.0, l2), (1.0, l1), (16.0, l3)]  # unsorted on purpose
    # float64 reference: between norms 1 and 4 at g = 2, w = log(2/1) / log(4/1) = 1/2
    np.testing.assert_allclose(E.at_norm(pts, 2.0), 0.5 * l1 + 0.5 * l2, rtol=1e-12)
    g = 8.0  # between 4 and 16: w = log 2 / log 4 = 1/2 as well; g = 6: w = log 1.5 / log 4
    np.testing.assert_allclose(E.at_norm(pts, g), 0.5 * l2 + 0.5 * l3, rtol=1e-12)
    w = np.log(1.5) / np.log(4.0)
    np.testing.assert_allclose(E.at_norm(pts, 6.0), (1 - w) * l2 + w * l3, rtol=1e-12)
    np.testing.assert_allclose(E.at_norm(pts, 1.0), l1, rtol=1e-12)
    np.testing.assert_allclose(E.at_norm(pts, 16.0), l3, rtol=1e-12)
    # the mean of the interpolated examples is the interpolated mean (the page's table of means)
    assert E.at_norm(pts, 6.0).mean() == pytest.approx(np.interp(np.log(6.0), np.log([1, 4, 16]),
                                                                 [l1.mean(), l2.mean(), l3.mean()]))
    with pytest.raises(ValueError, match=r"‖G‖_F = 20.0 is outside the range"):
        E.at_norm(pts, 20.0)
    with pytest.raises(ValueError, match="at least two rates, got 1"):
        E.at_norm(pts[:1], 4.0)


def test_generation_section_pairs_only_the_seeds_with_per_answer_scores(spec):
    from fedhl_jax.experiments import stats as S

    rng = np.random.default_rng(3)
    best = {"fedhl_data_size": 0.008, "fedhl_balanced": 0.004}
    a1, b1 = rng.uniform(0, 1, 64), rng.uniform(0, 1, 64)
    recs = {("fedhl_data_size", 0): {"eval_rouge_l": 0.40},  # cached before per-answer scores were stored
            ("fedhl_data_size", 1): {"eval_rouge_l": float(a1.mean()), "eval_rouge_l_examples": a1.tolist()},
            ("fedhl_balanced", 0): {"eval_rouge_l": 0.30},
            ("fedhl_balanced", 1): {"eval_rouge_l": float(b1.mean()), "eval_rouge_l_examples": b1.tolist()}}
    by_config = {E.digest(spec, "codealpaca", m, best[m], sd): r for (m, sd), r in recs.items()}
    md = "\n".join(E.generation_section(spec, by_config, best))
    assert "## Generation quality: ROUGE-L" in md
    row = next(line for line in md.splitlines() if line.startswith("| codealpaca | fedhl_data_size |"))
    assert f"{(0.40 + a1.mean()) / 2:.3f} (seed 0: 0.400, seed 1: {a1.mean():.3f})" in row  # mean over both seeds
    ci = S.paired_bootstrap_ci(a1[None], np.zeros((1, 64)))  # interval: seed 1 alone
    assert f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}] (1 seed × 64)" in row
    pair = next(line for line in md.splitlines() if line.startswith("| codealpaca | fedhl_balanced − fedhl_data_size |"))
    d = S.paired_bootstrap_ci(b1[None], a1[None])
    assert f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" in pair and "– (1 seed)" in pair and "1 × 64" in pair
    assert E.generation_section(spec, {}, best) == []  # no generation metric: no section


def test_exact_match_against_the_zero_shot_model():
    from fedhl_jax.experiments import stats as S

    rng = np.random.default_rng(5)
    fin = (rng.uniform(size=200) < 0.08).astype(float)
    zs = (rng.uniform(size=200) < 0.02).astype(float)
    k, kz = int(fin.sum()), int(zs.sum())
    rec = {"eval_exact_match": fin.mean(), "eval_exact_match_examples": fin.tolist()}
    counted = {"eval_exact_match": kz / 200, "eval_generated": 200.0}  # the count only (an older record)
    assert E.em_count(rec) == (k, 200) and E.em_count(counted) == (kz, 200)
    ci = S.newcombe_diff_ci(k, 200, kz, 200)
    text = E.em_versus(rec, counted)
    assert f"{ci.mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]" in text and "Newcombe" in text
    assert text.endswith("not decided" if ci.low <= 0 <= ci.high else "higher")
    both = E.em_versus(rec, {"eval_exact_match": zs.mean(), "eval_exact_match_examples": zs.tolist()})
    ci = S.paired_bootstrap_ci(fin, zs)
    assert f"{ci.mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}] (paired bootstrap over questions)" in both
    with pytest.raises(ValueError, match="without eval_generated"):
        E.em_count({"eval_exact_match": 0.1})


def test_compare_is_the_stats_modules_paired_interval():
    rng = np.random.default_rng(0)
    a = {s: {"eval_loss_examples": (1 + rng.normal(size=50)).tolist()} for s in (0, 1, 2)}
    b = {s: {"eval_loss_examples": (np.asarray(a[s]["eval_loss_examples"]) + 0.2).tolist()} for s in (0, 1)}
    c = E.compare(a, b)
    assert c["seeds"] == 2 and c["examples"] == 50
    assert c["ci"].mean == pytest.approx(-0.2) and c["ci"].high < 0 and c["t"].p < 1e-6
    assert E.compare(a, {}) is None


def test_render_only_trains_nothing(tmp_path, monkeypatch):
    from fedhl_jax.experiments import cli
    from fedhl_jax.experiments import methods_suite as MS

    monkeypatch.setattr(R, "run_cell", lambda *a, **k: pytest.fail("--render-only must not train"))
    monkeypatch.setattr(MS, "zero_shot_cell", lambda *a, **k: pytest.fail("--render-only must not evaluate"))
    assert cli.main(["--config", str(REPO / "configs" / "results_smollm2.yaml"), "--out", str(tmp_path),
                     "--render-only", "--compile-cache", ""]) == 0
    page = (tmp_path / "results_smollm2.md").read_text()
    assert "## Which method, per setting" in page and "<!-- discussion" in page


def test_run_cell_records_the_update_validation_and_per_example_losses(tmp_path):
    """A real (tiny) run through ``results_suite.run_cell``: the update statistics of every round
    (the round donates the state's buffers, so they are read from host copies), evaluation on the
    ``eval.every`` cadence, the validation loss and each example's loss."""
    from tests.conftest import tiny_overrides

    ov = dict(o.split("=", 1) for o in tiny_overrides(tmp_path, **{
        "fed.rounds": 3, "eval.every": 2, "data.validation_examples": 10, "eval.per_example": "true",
        }))
    ov = {k: yaml.safe_load(v) for k, v in ov.items()}
    rec = R.run_cell({}, ov, 0)
    assert rec["eval_rounds"] == [2, 3] and len(rec["eval_loss"]) == 2 and len(rec["val_loss"]) == 2
    assert len(rec["update_norm"]) == 3 and all(u > 0 for u in rec["update_norm"])
    assert set(rec["energy_beyond"]) == {"2", "8", "16"} and all(len(v) == 3 for v in rec["energy_beyond"].values())
    assert rec["final_val_loss"] == rec["val_loss"][-1] and len(rec["val_loss_examples"]) <= 10
    assert len(rec["eval_loss_examples"]) == 8 and all(np.isfinite(rec["eval_loss_examples"]))
    # round 1 starts from G = 0: the update's norm is the final norm of a one-round run
    assert rec["global_norm"][0] == pytest.approx(rec["update_norm"][0], rel=1e-5)


def test_committed_cache_keys_are_the_specs_digests():
    """Every cached run is found again by the spec: a new config field that changes the digests of
    finished runs (so the suite would rerun them) fails here, not after hours of compute."""
    rows = R.read_cache(REPO / "docs" / "results" / "results_smollm2.jsonl")
    assert rows, "the committed cache is empty"
    fg = E.final_generation(SPEC, {row["config"]: row["rec"] for row in rows})
    for row in rows:
        rid, seed = row["id"], row["seed"]
        if rid == E.ZERO_SHOT:
            want = "zero_shot-" + R.config_digest(SPEC["base"], {}, seed)
        elif rid.startswith(E.FINAL_GENERATION + ":"):  # the spec's best method, with the pass's overrides
            assert fg is not None and rid == fg[0] and seed == SPEC["tune"]["seed"], rid
            want = fg[2]
        else:
            setting, method, lr = rid.split(":")
            assert setting in SPEC["settings"] and method.startswith("method="), rid
            method, lr = method.removeprefix("method="), float(lr.removeprefix("lr="))
            assert lr in E.candidate_rates(SPEC), rid
            want = E.digest(SPEC, setting, method, lr, seed)
        assert row["config"] == want, rid


# --------------------------------------------------------------------------- runs in worker processes


def fake_cell(run, base):
    """``fake_run_cell``'s record as a module-level runner (picklable, for worker processes)."""
    return fake_run_cell([])(base, run.overrides if run.validation else dict(run.overrides, **{"eval.validation": False}),
                             run.seed)


def failing_cell(run, base):
    """``fake_cell``, but hetlora's runs fail (a worker's error)."""
    if run.overrides.get("fed.algorithm") == "hetlora":
        raise RuntimeError(f"{run.rid} failed")
    return fake_cell(run, base)


def _rows(path):
    return sorted(json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines())


def test_workers_record_what_one_process_records_and_resume(tmp_path):
    """Two worker processes end with the cache that one process makes (every run once, in another order);
    an interrupted parallel suite (``max_runs``) resumes to the same cache; ``ready`` offers a method's
    next rate only after its current one has finished."""
    spec = copy.deepcopy(SPEC)
    spec["zero_shot"] = False
    quiet = lambda *a, **k: None  # noqa: E731
    one, two, parts = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "parts.jsonl"
    res1 = E.run_suite(spec, one, log=quiet, runner=fake_cell)
    res2 = E.run_suite(spec, two, log=quiet, runner=fake_cell, workers=2)
    assert _rows(one) == _rows(two) and len(_rows(two)) == len({json.loads(x)["config"] for x in _rows(two)})
    assert res2["tuned"] == res1["tuned"] and res2["leaders"] == res1["leaders"] and res2["final_generation"]
    for _ in range(60):
        if E.run_suite(spec, parts, log=quiet, runner=fake_cell, workers=2, max_runs=25)["final_generation"]:
            break
    assert _rows(parts) == _rows(one)
    # what can start at once: every method's first rate, nothing that depends on one of them
    first = E.ready(spec, {})
    assert [r.stage for r in first] == [1] * len(spec["methods"])
    assert len({r.digest for r in first}) == len(spec["methods"])


def test_a_failed_run_raises_after_the_runs_in_flight_are_recorded_and_the_suite_resumes(tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["zero_shot"] = False
    quiet = lambda *a, **k: None  # noqa: E731
    cache, whole = tmp_path / "c.jsonl", tmp_path / "whole.jsonl"
    with pytest.raises(RuntimeError, match=r"cross_silo:method=hetlora:lr=0.004 failed"):
        E.run_suite(spec, cache, log=quiet, runner=failing_cell, workers=2)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]  # every line whole
    assert rows and not any("hetlora" in r["id"] for r in rows)
    E.run_suite(spec, whole, log=quiet, runner=fake_cell)
    assert len(rows) < len(_rows(whole))  # no final generation: hetlora was never tuned
    assert not any(r["id"].startswith(E.FINAL_GENERATION) for r in rows)
    # the cache resumes: the finished runs are not trained again, and it ends as one process makes it
    res = E.run_suite(spec, cache, log=quiet, runner=fake_cell, workers=2)
    assert _rows(cache) == _rows(whole) and res["final_generation"]
    with pytest.raises(ValueError, match=r"workers must be at least 1, got 0"):
        E.run_suite(spec, cache, log=quiet, workers=0)


def _affinity_and_cache_dir(_):
    import os

    import jax

    return sorted(os.sched_getaffinity(0)), jax.config.jax_compilation_cache_dir


def test_worker_pool_pins_disjoint_cores_and_passes_the_compile_cache(tmp_path):
    import os

    import jax

    from fedhl_jax.experiments import workers as W

    assert W.core_groups(2, [3, 0, 1, 2]) == [[0, 1], [2, 3]]
    assert W.core_groups(3, [0, 1, 2, 3]) == [[0, 1], [2], [3]]
    assert W.core_groups(2, [0]) is None
    with pytest.raises(ValueError, match=r"workers must be at least 1, got 0"):
        W.core_groups(0, [0, 1])
    cores = sorted(os.sched_getaffinity(0))
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    try:
        with W.pool(2) as ex:
            got = [f.result() for f in [ex.submit(_affinity_and_cache_dir, i) for i in range(8)]]
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
    assert all(d == str(tmp_path / "xla") for _, d in got)
    groups = {tuple(a) for a, _ in got}
    if len(cores) >= 2:
        assert all(set(g) <= set(cores) for g in groups) and set(map(tuple, W.core_groups(2, cores))) >= groups
    else:
        assert groups == {tuple(cores)}


def test_cli_refuses_bad_worker_counts_before_any_run(tmp_path, capsys, monkeypatch):
    from fedhl_jax.experiments import cli

    monkeypatch.setattr(R, "run_cell", lambda *a, **k: pytest.fail("a refused command must not train"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(REPO / "configs" / "results_smollm2.yaml"), "--workers", "0"])
    assert e.value.code == 2 and "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert cli.main(["--config", str(REPO / "configs" / "results.yaml"), "--out", str(tmp_path), "--workers", "2",
                     "--compile-cache", ""]) == 2
    assert "--workers 2: only a 'suite: evidence' spec runs in workers" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_fewer_seeds_redecides_each_pair_over_the_first_seeds(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "run_cell", fake_run_cell([]))
    res = E.run_suite(spec, tmp_path / "c.jsonl", log=lambda *a, **k: None)
    by, best = res["by_config"], res["tuned"]
    rows = E.fewer_seeds(spec, by, best, 2)
    named = sum(1 for s in E.setting_names(spec) for a, b in spec["pairs"]
                if E.runs_of(spec, by, s, a, best[a]) and E.runs_of(spec, by, s, b, best[b]))
    assert len(rows) == named > 0  # every setting has 3 seeds
    r = rows[0]
    a, b = r["pair"]
    ra, rb = (E.runs_of(spec, by, r["setting"], m, best[m]) for m in (a, b))
    want = E.compare({s: ra[s] for s in (0, 1)}, {s: rb[s] for s in (0, 1)})
    assert r["first"]["seeds"] == 2 and r["all"]["seeds"] == 3
    assert r["first"]["ci"] == want["ci"] and r["all"]["ci"] == E.compare(ra, rb)["ci"]
    md = "\n".join(E.fewer_seeds_section(spec, by, best, 2))
    changed = sum(E.S.decision(x["all"]["ci"], x["pair"]) != E.S.decision(x["first"]["ci"], x["pair"]) for x in rows)
    assert f"{changed} of {len(rows)} decisions change" in md and md.count("\n| ") == len(rows) + 1
    assert E.fewer_seeds(spec, by, best, 3) == [] and E.fewer_seeds_section(spec, by, best, 3) == []


def test_real_runs_in_workers_match_the_in_process_run(tmp_path):
    """A tiny evidence suite (random Llama, synthetic GSM8K) trained for real in two worker processes: it
    tunes, runs the second seed at the tuned rate, and each record is the one this process computes."""
    from tests.conftest import tiny_overrides

    dotted = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in tiny_overrides(tmp_path, **{
        "fed.rounds": 2, "eval.every": 2, "data.validation_examples": 6, "eval.per_example": "true"}))}
    spec = {"suite": "evidence", "base": R.merge_overrides({}, dotted), "zero_shot": False, "leaders": 1,
            "methods": {"fedhl": {"fed.algorithm": "fedhl"}, "flexlora": {"fed.algorithm": "flexlora"}},
            "tune": {"seed": 0, "search": "bracket", "start": 0.01, "ladder": [0.01, 0.02]},
            "settings": {"s": {"methods": "all", "seeds": [0, 1]}}, "pairs": [["fedhl", "flexlora"]]}
    cache = tmp_path / "c.jsonl"
    res = E.run_suite(spec, cache, log=lambda *a, **k: None, workers=2)
    rows = R.read_cache(cache)
    assert len(rows) == 6 and set(res["tuned"]) == {"fedhl", "flexlora"}  # 2 rates × 2 methods, then seed 1
    assert sorted(r["seed"] for r in rows) == [0, 0, 0, 0, 1, 1]
    assert all("final_val_loss" in r["rec"] for r in rows if r["seed"] == 0)
    assert not any("final_val_loss" in r["rec"] for r in rows if r["seed"] == 1)
    m = res["leaders"][0]
    run = next(r for r in E.ready(spec, res["by_config"]) if r.seed == 1 and f"method={m}:" in r.rid)
    here = E.execute(run, spec["base"])
    there = res["by_config"][run.digest]
    np.testing.assert_allclose(there["eval_loss_examples"], here["eval_loss_examples"], rtol=1e-5)
    np.testing.assert_allclose(there["update_norm"], here["update_norm"], rtol=1e-5)


def test_workers_end_when_the_suite_process_is_killed(tmp_path):
    """A suite process killed outright (no pool shutdown) takes its workers with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, time\n"
        "from fedhl_jax.experiments.workers import pool\n"
        "if __name__ == '__main__':\n"
        "    ex = pool(1)\n"
        "    print(ex.submit(os.getpid).result(), flush=True)\n"
        "    ex.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it became our child (it did not: its parent was the killed process)
            os.waitpid(worker, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} outlived its parent")
