"""raFLoRA: rank partitions averaged over their effective contributors, against a float64 NumPy reference
that cuts the partitions literally (one loop per partition and client)."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import fedhl_jax as F
from fedhl_jax import engine
from fedhl_jax.algorithms.raflora import partition_bounds, partition_weights, raflora_update
from fedhl_jax.local import make_optimizer
from tests.test_engine import ALPHA, D_IN, D_OUT, K, LR, M, lsq_loss, problem, state_at
from tests.test_engine import RANKS as ENGINE_RANKS
from tests.test_engine import inputs as engine_inputs
from tests.test_fedhl_momentum import R_MAX, RANKS, SHAPES, SIZES, trained  # the same small two-module round
from tests.test_fedhl_rb import rel, rounds

N_HYP, D_OUT_HYP, D_IN_HYP, R_HYP = 5, 7, 6, 5  # the fixed shapes of the property tests


def np_raflora(B, A, ranks, scale, base):
    """float64 Eq. 8, literally: cut the rank axis at the distinct ranks, and average each partition
    ``[lo, hi)`` over the clients with ``r_k ≥ hi``, the base weights renormalised among them.

    Args:
      B, A: the kept clients' factors (``[n, d_out, ≥r_k]``, ``[n, ≥r_k, d_in]``); ranks, scale, base: ``[n]``.
    """
    B, A = np.asarray(B, np.float64), np.asarray(A, np.float64)
    base, ranks = np.asarray(base, np.float64), np.asarray(ranks)
    out, lo = np.zeros((B.shape[1], A.shape[2])), 0
    for hi in sorted(set(ranks.tolist())):
        contributors = [k for k in range(len(ranks)) if ranks[k] >= hi]
        total = sum(base[k] for k in contributors)
        for k in contributors:
            out += base[k] / total * float(scale[k]) * B[k][:, lo:hi] @ A[k][lo:hi]
        lo = hi
    return out


def np_truncate_to(G, r):
    U, S, Vt = np.linalg.svd(np.asarray(G, np.float64), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


def test_registered_in_the_dense_family():
    alg = F.make_algorithm("raflora", R_MAX, {"weighting": "uniform"}, split="left")
    assert alg.options.weighting == "uniform" and alg.options.split == "left"
    assert alg.per_rank_eval and not alg.homogeneous and alg.name == "raflora"
    assert alg.state_layout == "dense/2" and sorted(vars(alg.init(SHAPES))) == ["G", "dec", "round"]


@pytest.mark.parametrize("options, msg", [
    ({"weighting": "optimal"}, r"algorithm 'raflora': unknown weighting 'optimal'; expected one of "
                               r"\('data_size', 'uniform'\)"),
    ({"beta_cap": 2.0}, r"algorithm 'raflora': unknown option 'beta_cap'; valid options: split, svd_method, weighting"),
])
def test_bad_options_are_refused_by_name(options, msg):
    with pytest.raises(ValueError, match=msg):
        F.make_algorithm("raflora", R_MAX, options)


def test_partitions_of_a_known_round():
    # ranks 1, 2, 4, 3 (and a rank-4 client left out): partitions [0,1) [1,2) [2,3) [3,4)
    ranks = jnp.array([1, 2, 4, 3, 4])
    valid = jnp.array([True, True, True, True, False])
    np.testing.assert_array_equal(partition_bounds(ranks, valid, 5), [1, 2, 3, 4, 0])
    # only ranks 2 and 4 kept: columns 0, 1 end at 2, columns 2, 3 at 4
    np.testing.assert_array_equal(partition_bounds(ranks, jnp.array([False, True, True, False, False]), 5),
                                  [2, 2, 4, 4, 0])
    w = partition_weights(ranks, jnp.array([3.0, 1.0, 2.0, 5.0, 7.0]), valid, 5)
    want = np.array([[3, 1, 2, 5, 0], [0, 1, 2, 5, 0], [0, 0, 2, 5, 0], [0, 0, 2, 0, 0], [0] * 5], np.float64).T
    want = want / np.where(want.sum(0) > 0, want.sum(0), 1)
    np.testing.assert_allclose(w, want, rtol=1e-6)


@jax.jit
def _aggregate_one(G, B, A, ranks, scale, base, valid):
    mask = F.rank_mask(ranks, R_HYP)
    return raflora_update(G, B, A, mask, scale, partition_weights(ranks, base, valid, R_HYP), jnp.any(valid))


@settings(deadline=None, max_examples=30)
@given(ranks=st.lists(st.integers(1, R_HYP), min_size=N_HYP, max_size=N_HYP),
       sizes=st.lists(st.floats(0.5, 200.0), min_size=N_HYP, max_size=N_HYP),
       dropped=st.lists(st.booleans(), min_size=N_HYP, max_size=N_HYP),
       uniform=st.booleans(), seed=st.integers(0, 2**16))
def test_update_matches_float64_numpy(ranks, sizes, dropped, uniform, seed):
    rng = np.random.default_rng(seed)
    ranks, valid = np.array(ranks), ~np.array(dropped)
    valid[rng.integers(N_HYP)] = True  # at least one client kept
    base = np.ones(N_HYP) if uniform else np.array(sizes)
    B = rng.normal(size=(N_HYP, D_OUT_HYP, R_HYP)).astype(np.float32)  # padding columns hold noise too
    A = rng.normal(size=(N_HYP, R_HYP, D_IN_HYP)).astype(np.float32)
    scale = np.asarray(F.lora_scale(ranks, 8.0))
    got = _aggregate_one(jnp.zeros((D_OUT_HYP, D_IN_HYP)), B, A, jnp.asarray(ranks), scale,
                         jnp.asarray(base, jnp.float32), jnp.asarray(valid))
    want = np_raflora(B[valid], A[valid], ranks[valid], scale[valid], base[valid])
    assert rel(got, want) <= 1e-5, rel(got, want)


@pytest.mark.parametrize("weighting", ["data_size", "uniform"])
def test_algorithm_round_matches_float64_numpy(weighting):
    alg = F.make_algorithm("raflora", R_MAX, weighting=weighting)
    state, _ = rounds(alg, 2)[-1]  # G ≠ 0
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B, A = trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(9)), mask, 9)
    new, info = jax.jit(alg.aggregate)(state, B, A, mask, scale, SIZES)
    base = np.asarray(SIZES, np.float64) if weighting == "data_size" else np.ones(len(RANKS))
    np.testing.assert_allclose(info["p"], base / base.sum(), rtol=1e-6)
    for k in SHAPES:
        want = np_raflora(B[k], A[k], RANKS, scale, base)
        assert rel(new.G[k], want) <= 1e-5, (k, rel(new.G[k], want))
        np.testing.assert_allclose(new.dec[k].S, np.linalg.svd(want, compute_uv=False)[:R_MAX], rtol=1e-5, atol=1e-6)
    assert bool(info["applied"]) and int(new.round) == 3


@pytest.mark.parametrize("weighting", ["data_size", "uniform"])
def test_jit_matches_eager(weighting):
    alg = F.make_algorithm("raflora", R_MAX, weighting=weighting)
    for (s, i), (s_j, i_j) in zip(rounds(alg, 3), rounds(alg, 3, jit=True)):
        for k in SHAPES:
            np.testing.assert_allclose(s.G[k], s_j.G[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(i["w"], i_j["w"], rtol=1e-6)


def test_the_rule_is_rb_lora_with_beta_uncapped():
    """Every column of a partition has the same contributors, so Eq. 8's weight of client k on column j
    is n_k / Σ_{l: r_l > j} n_l = α_k β_j; with one rank for every client it is FlexLoRA."""
    for (s, _), (s_rb, _) in zip(rounds(F.make_algorithm("raflora", R_MAX), 3),
                                 rounds(F.make_algorithm("rb_lora", R_MAX), 3)):
        for k in SHAPES:
            np.testing.assert_allclose(s.G[k], s_rb.G[k], rtol=1e-5, atol=1e-6)
    same = np.array([3, 3, 3, 3])
    for (s, _), (s_fx, _) in zip(rounds(F.make_algorithm("raflora", R_MAX), 2, ranks=same),
                                 rounds(F.make_algorithm("flexlora", R_MAX), 2, ranks=same)):
        for k in SHAPES:
            np.testing.assert_allclose(s.G[k], s_fx.G[k], rtol=1e-5, atol=1e-6)
    # heterogeneous ranks: FlexLoRA shrinks the columns only some clients hold, raFLoRA does not
    (s, _), = rounds(F.make_algorithm("raflora", R_MAX), 1)
    (s_fx, _), = rounds(F.make_algorithm("flexlora", R_MAX), 1)
    assert all(float(jnp.linalg.norm(s.G[k] - s_fx.G[k])) > 1e-2 * float(jnp.linalg.norm(s.G[k])) for k in SHAPES)


def test_untrained_round_keeps_g_up_to_the_largest_rank_held():
    alg = F.make_algorithm("raflora", R_MAX)
    state, _ = rounds(alg, 2)[-1]
    ranks = np.array([1, 2, 3, 3])  # nobody holds column 3
    mask, scale = F.rank_mask(ranks, R_MAX), F.lora_scale(ranks, 8.0)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(5))
    new, info = alg.aggregate(state, start.B, start.A, mask, scale, SIZES)
    np.testing.assert_array_equal(np.asarray(info["w"])[:, 3], 0.0)
    for k in SHAPES:
        want = np_truncate_to(state.G[k], 3)
        assert rel(new.G[k], want) <= 1e-5, (k, rel(new.G[k], want))


@pytest.mark.parametrize("bad", [2, 0])  # the only rank-4 client, the only rank-1 client
def test_a_diverging_client_is_left_out(bad):
    alg = F.make_algorithm("raflora", R_MAX)
    state, _ = rounds(alg, 1)[-1]
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B, A = trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(1)), mask, 1)
    broken = {k: a.at[bad, 0, 0].set(jnp.inf) for k, a in A.items()}
    with pytest.warns(RuntimeWarning, match=rf"clients \[{bad}\]"):
        new, info = alg.aggregate(state, B, broken, mask, scale, SIZES)
        jax.effects_barrier()
    keep = np.delete(np.arange(len(RANKS)), bad)
    w = np.asarray(info["w"])
    assert bool(info["applied"]) and float(info["p"][bad]) == 0.0 and np.all(w[bad] == 0)
    held = [float(np.any(RANKS[keep] > j)) for j in range(R_MAX)]  # a column nobody kept holds sums to 0
    np.testing.assert_allclose(w.sum(axis=0), held, rtol=1e-6)
    for k in SHAPES:
        want = np_raflora(B[k][keep], A[k][keep], RANKS[keep], scale[keep], np.asarray(SIZES)[keep])
        assert rel(new.G[k], want) <= 1e-5


def np_engine_round(G0, X, Y, sizes):
    """One round of the engine's problem in float64: balanced truncation, K SGD steps, then Eq. 8."""
    U, S, Vt = np.linalg.svd(G0, full_matrices=False)
    Bs, As, scale = [], [], []
    for i, r in enumerate(ENGINE_RANKS):
        s = ALPHA / r
        B = U[:, :r] * np.sqrt(S[:r]) / np.sqrt(s)
        A = np.sqrt(S[:r])[:, None] * Vt[:r] / np.sqrt(s)
        for _ in range(K):
            dW = (X[i] @ (s * B @ A).T - Y[i]).T @ X[i] / M  # dL/dW of 0.5 mean ||W x - y||²
            B, A = B - LR * s * dW @ A.T, A - LR * s * B.T @ dW
        pad = R_MAX - r
        Bs.append(np.pad(B, ((0, 0), (0, pad))))
        As.append(np.pad(A, ((0, pad), (0, 0))))
        scale.append(s)
    return np_raflora(np.stack(Bs), np.stack(As), ENGINE_RANKS, scale, sizes)


def test_engine_round_matches_float64_numpy():
    G0, X, Y = problem()
    alg = F.make_algorithm("raflora", R_MAX)
    step = engine.make_round_step(alg, lsq_loss, make_optimizer("sgd", LR, trainable=alg.trainable))
    inp = engine_inputs(X, Y)
    state, info = jax.jit(step)(state_at(alg, G0), {"w": jnp.zeros((D_OUT, D_IN))}, inp)
    want = np_engine_round(G0, X, Y, np.asarray(inp.num_examples, np.float64))
    assert rel(state.G["w"], want) <= 1e-5, rel(state.G["w"], want)
    assert info["losses"].shape == (len(ENGINE_RANKS), K) and bool(info["applied"])


def test_accepted_by_the_config_and_the_evidence_suite():
    import copy

    from fedhl_jax.config import TrainConfig, from_dict
    from fedhl_jax.errors import ConfigError
    from fedhl_jax.experiments import evidence_suite as E
    from fedhl_jax.experiments import results_suite as R
    from tests.test_evidence_suite import SPEC

    spec = copy.deepcopy(SPEC)
    spec["methods"]["raflora"] = {"fed.algorithm": "raflora"}
    for setting in E.setting_names(spec):
        for lr in E.candidate_rates(spec):
            cfg = from_dict(TrainConfig, R.merge_overrides(spec["base"], dict(E.overrides(spec, setting, "raflora", lr),
                                                                              seed=1)))
            assert cfg.fed.algorithm == "raflora"
            assert cfg.fed.options == {"split": "balanced", "svd_method": "exact", "weighting": "data_size"}
    bad = R.merge_overrides(spec["base"], {"fed.algorithm": "raflora", "fed.options.beta_cap": 2.0})
    with pytest.raises(ConfigError, match=r"fed.options.beta_cap is not an option of fed.algorithm='raflora'"):
        from_dict(TrainConfig, bad)
