"""RB-LoRA's rank-rarity cap (``beta_cap``) against a float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

import fedhl_jax as F
from fedhl_jax import aggregation as agg

R_MAX = 4
RANKS = np.array([1, 4, 2, 1, 3])
SIZES = jnp.array([10.0, 1, 7, 3, 5])


def factors(seed=0, d_out=7, d_in=6):
    rng = np.random.default_rng(seed)
    G = jnp.asarray(rng.normal(size=(d_out, d_in)), jnp.float32)
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B0, A0 = F.truncate(G, mask, scale)
    B = B0 + 0.3 * jnp.asarray(rng.normal(size=B0.shape), jnp.float32)
    A = A0 + 0.3 * jnp.asarray(rng.normal(size=A0.shape), jnp.float32)
    return G, mask, scale, B, A


def np_rb_lora(B, A, ranks, scale, sizes, cap=None):
    """float64: component r of client k weighted α_k · min(β_r, cap), β_r = Σn / Σ_{k: r_k > r} n_k."""
    sizes = np.asarray(sizes, np.float64)
    out = 0.0
    for r in range(max(ranks)):
        holders = [k for k, rk in enumerate(ranks) if rk > r]
        beta = sizes.sum() / sum(sizes[k] for k in holders)
        beta = beta if cap is None else min(beta, cap)
        for k in holders:
            b, a = np.asarray(B[k], np.float64)[:, r], np.asarray(A[k], np.float64)[r]
            out = out + sizes[k] / sizes.sum() * beta * float(scale[k]) * np.outer(b, a)
    return out


def test_rank_rarity_cap_is_a_minimum():
    mask, valid = F.rank_mask(RANKS, R_MAX), jnp.ones(5, bool)
    beta = np.asarray(F.rank_rarity(mask, SIZES, valid), np.float64)
    np.testing.assert_allclose(beta, [1.0, 26 / 13, 26 / 6, 26 / 1], rtol=1e-6)  # column 3: the 1-example client
    for cap in (1.0, 3.0, 100.0):
        np.testing.assert_allclose(F.rank_rarity(mask, SIZES, valid, cap), np.minimum(beta, cap), rtol=1e-6)


def test_unbounded_beta_in_a_cross_device_round():
    """One small client holding the top columns: β = 1/its data share (91 at 1.1% of the round's data)."""
    sizes = jnp.array([10.0] + [100.0] * 9)
    ranks = np.array([16] + [8] * 9)
    beta = F.rank_rarity(F.rank_mask(ranks, 16), sizes, jnp.ones(10, bool))
    assert float(beta[15]) == pytest.approx(91.0, rel=1e-6) and float(beta[0]) == pytest.approx(1.0)
    assert float(F.rank_rarity(F.rank_mask(ranks, 16), sizes, jnp.ones(10, bool), 4.0)[15]) == 4.0


@pytest.mark.parametrize("cap", [None, 1.0, 3.0])
def test_capped_rb_lora_matches_numpy(cap):
    G, mask, scale, B, A = factors()
    want = np_rb_lora(B, A, RANKS, scale, SIZES, cap)
    got = F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=SIZES, beta_cap=cap)
    assert np.linalg.norm(np.asarray(got, np.float64) - want) <= 1e-5 * np.linalg.norm(want)
    alg = F.make_algorithm("rb_lora", R_MAX, beta_cap=cap)
    assert alg.options.beta_cap == cap
    state = alg.init({"m": G.shape}).replace(G={"m": G}, dec={"m": F.svd(G, R_MAX)})
    new, _ = alg.aggregate(state, {"m": B}, {"m": A}, mask, scale, SIZES)
    assert np.linalg.norm(np.asarray(new.G["m"], np.float64) - want) <= 1e-5 * np.linalg.norm(want)


def test_cap_of_one_is_flexlora_and_a_large_cap_changes_nothing():
    """β ≥ 1 always: cap 1 gives every component its data share (FlexLoRA); a cap above every β is RB-LoRA."""
    G, mask, scale, B, A = factors(1)
    flex = F.flexlora_aggregate(G, B, A, mask, scale, num_examples=SIZES)
    np.testing.assert_allclose(F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=SIZES, beta_cap=1.0), flex,
                               atol=1e-6)
    np.testing.assert_array_equal(F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=SIZES, beta_cap=1e6),
                                  F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=SIZES))
    assert float(jnp.linalg.norm(F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=SIZES) - flex)) > 1e-2


@pytest.mark.parametrize("cap", [0.99, -1.0, float("nan"), "3", True])
def test_bad_cap_is_refused_by_name(cap):
    with pytest.raises(ValueError, match=rf"algorithm 'rb_lora': beta_cap must be None or a finite number >= 1, "
                                         rf"got beta_cap={cap!r}"):
        F.make_algorithm("rb_lora", R_MAX, {"beta_cap": cap})
    G, mask, scale, B, A = factors()
    with pytest.raises(ValueError, match=r"beta_cap must be None or a finite number >= 1"):
        F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=SIZES, beta_cap=cap)


def test_default_is_the_published_rule():
    assert F.make_algorithm("rb_lora", R_MAX).options.beta_cap is None
    assert agg.check_beta_cap(None) is None and agg.check_beta_cap(2) == 2.0


def test_cached_runs_keep_their_digest_and_a_cap_changes_it():
    """``beta_cap`` at its default stays out of the results caches' config digest (docs/results/results_smollm2_3rounds.jsonl)."""
    import json

    import yaml

    from fedhl_jax.experiments import methods_suite as M
    from fedhl_jax.experiments import results_suite as R
    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "configs" / "results_smollm2_3rounds.yaml").read_text())
    cells = {c["id"]: c for c in M.cells(spec)}
    rows = [json.loads(line) for line in (REPO / "docs" / "results" / "results_smollm2_3rounds.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rb_lora" in r["id"] and r["id"] in cells]
    if not rows:
        pytest.skip("no RB-LoRA run in the committed cache")
    for row in rows:
        ov = M.run_overrides(spec, cells[row["id"]], row["seed"])
        assert R.config_digest(spec["base"], ov, row["seed"]) == row["config"], row["id"]
        capped = dict(ov, **{"fed.options.beta_cap": 4.0})
        assert R.config_digest(spec["base"], capped, row["seed"]) != row["config"]
