"""FedHL-RB: rank-balanced component changes on FedHL's full-rank G, against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedhl_jax as F
from fedhl_jax import aggregation as agg
from fedhl_jax.algorithms.fedhl_rb import fedhl_rb_update
from tests.test_fedhl_momentum import R_MAX, RANKS, SHAPES, SIZES, trained  # the same small two-module round



def rounds(alg, n, ranks=RANKS, jit=False):
    """``n`` rounds from ``init`` with fixed inputs and the given ranks; the states and infos of every round."""
    mask, scale = F.rank_mask(ranks, R_MAX), F.lora_scale(ranks, 8.0)
    step = jax.jit(alg.aggregate) if jit else alg.aggregate
    state, out = alg.init(SHAPES), []
    for t in range(n):
        state, info = step(state, *trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(t)), mask, t),
                           mask, scale, SIZES)
        out.append((state, info))
    return out


def np_rarity(ranks, sizes, cap=None):
    """float64 β_j = Σn / Σ_{k: r_k > j} n_k (0 where nobody holds column j), capped."""
    sizes = np.asarray(sizes, np.float64)
    held = np.array([sizes[ranks > j].sum() for j in range(R_MAX)])
    beta = np.where(held > 0, sizes.sum() / np.where(held > 0, held, 1), 0.0)
    return beta if cap is None else np.minimum(beta, cap)


def np_fedhl_rb(G, B, A, ranks, scale, sizes, cap=None):
    """float64, component by component: G + Σ_j β_j Σ_{i: r_i > j} α_i (s_i b_j a_jᵀ − σ_j u_j v_jᵀ)."""
    G = np.asarray(G, np.float64)
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    alpha = np.asarray(sizes, np.float64) / np.sum(np.asarray(sizes, np.float64))
    beta = np_rarity(ranks, sizes, cap)
    out = G.copy()
    for i, r in enumerate(ranks):
        Bi, Ai = np.asarray(B[i], np.float64), np.asarray(A[i], np.float64)
        for j in range(r):
            change = float(scale[i]) * np.outer(Bi[:, j], Ai[j]) - S[j] * np.outer(U[:, j], Vt[j])
            out += alpha[i] * beta[j] * change
    return out


def rel(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def test_registered_in_the_dense_family():
    alg = F.make_algorithm("fedhl_rb", R_MAX, {"beta_cap": 3.0})
    assert alg.options.beta_cap == 3.0 and alg.per_rank_eval and not alg.homogeneous
    assert alg.state_layout == "dense/2" and sorted(vars(alg.init(SHAPES))) == ["G", "dec", "round"]


@pytest.mark.parametrize("cap", [None, 1.5])
def test_matches_float64_numpy(cap):
    alg = F.make_algorithm("fedhl_rb", R_MAX, beta_cap=cap)
    state, _ = rounds(alg, 2)[-1]  # G ≠ 0, with a tail past r_max
    assert all(float(state.dec[k].tail[R_MAX]) > 1e-3 for k in SHAPES)
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B, A = trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(9)), mask, 9)
    new, info = jax.jit(alg.aggregate)(state, B, A, mask, scale, SIZES)
    np.testing.assert_allclose(info["beta"], np_rarity(RANKS, SIZES, cap), rtol=1e-6)
    assert cap is None or float(np.max(np_rarity(RANKS, SIZES))) > cap  # the cap binds
    for k in SHAPES:
        want = np_fedhl_rb(state.G[k], B[k], A[k], RANKS, scale, SIZES, cap)
        assert rel(new.G[k], want) <= 1e-5, (k, rel(new.G[k], want))
        G0 = np.asarray(state.G[k], np.float64)  # the round's change alone, looser: float32 SVD of G
        assert rel(np.asarray(new.G[k], np.float64) - G0, want - G0) <= 2e-4
        np.testing.assert_allclose(new.dec[k].S, np.linalg.svd(want, compute_uv=False)[:R_MAX], rtol=1e-5, atol=1e-6)
    assert int(new.round) == 3


def handed_back(alg, state):
    """The round in which every client returns exactly the factors it was handed: ``(state, info)``."""
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(5))
    return alg.aggregate(state, start.B, start.A, mask, scale, SIZES)


def test_untrained_round_is_a_fixed_point_tail_included():
    alg = F.make_algorithm("fedhl_rb", R_MAX)
    state, _ = rounds(alg, 2)[-1]
    new, info = handed_back(alg, state)
    assert bool(info["applied"])
    for k in SHAPES:
        np.testing.assert_allclose(new.G[k], state.G[k], atol=1e-5)
    # RB-LoRA from the same state drops the tail past the largest rank held
    rb, _ = handed_back(F.make_algorithm("rb_lora", R_MAX), state)
    assert any(float(jnp.linalg.norm(rb.G[k] - state.G[k])) > 1e-2 for k in SHAPES)


@pytest.mark.parametrize("jit", [False, True])
def test_one_rank_for_all_is_fedhl_with_data_size_weights(jit):
    ranks = np.array([3, 3, 3, 3])
    ours = rounds(F.make_algorithm("fedhl_rb", R_MAX), 3, ranks=ranks, jit=jit)
    ref = rounds(F.fedhl(R_MAX, weighting="data_size"), 3, ranks=ranks, jit=jit)
    for (s, i), (s_ref, i_ref) in zip(ours, ref):
        for k in SHAPES:
            np.testing.assert_allclose(s.G[k], s_ref.G[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(i["p"], i_ref["p"], rtol=1e-6)


def test_heterogeneous_ranks_differ_from_fedhl_and_round_one_is_rb_lora():
    """From G₀ = 0 nothing is subtracted, so the first round is RB-LoRA's; later rounds keep the tail."""
    (s, _), = rounds(F.make_algorithm("fedhl_rb", R_MAX), 1)
    (s_rb, _), = rounds(F.make_algorithm("rb_lora", R_MAX), 1)
    (s_hl, _), = rounds(F.fedhl(R_MAX, weighting="data_size"), 1)
    for k in SHAPES:
        np.testing.assert_allclose(s.G[k], s_rb.G[k], rtol=1e-5, atol=1e-6)
        assert float(jnp.linalg.norm(s.G[k] - s_hl.G[k])) > 1e-2 * float(jnp.linalg.norm(s.G[k]))


def test_update_function_on_one_module_matches_the_reference():
    rng = np.random.default_rng(3)
    G = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B0, A0 = F.truncate(G, mask, scale)
    B = B0 + 0.2 * jnp.asarray(rng.normal(size=B0.shape), jnp.float32)  # padding columns hold noise too
    A = A0 + 0.2 * jnp.asarray(rng.normal(size=A0.shape), jnp.float32)
    p = agg.data_weights(SIZES, jnp.ones(4, bool))
    beta = F.rank_rarity(mask, SIZES, jnp.ones(4, bool))
    got = fedhl_rb_update(G, F.svd(G, R_MAX), B, A, mask, scale, p, beta)
    assert rel(got, np_fedhl_rb(G, B, A, RANKS, scale, SIZES)) <= 1e-5


def test_a_diverging_client_is_left_out():
    alg = F.make_algorithm("fedhl_rb", R_MAX)
    state, _ = rounds(alg, 1)[-1]
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B, A = trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(1)), mask, 1)
    bad = {k: b.at[2, 0, 0].set(jnp.nan) for k, b in B.items()}  # the only rank-4 client
    with pytest.warns(RuntimeWarning, match=r"clients \[2\]"):
        new, info = alg.aggregate(state, bad, A, mask, scale, SIZES)
        jax.effects_barrier()
    keep = np.array([0, 1, 3])
    assert bool(info["applied"]) and float(info["p"][2]) == 0.0
    np.testing.assert_allclose(info["beta"], np_rarity(RANKS[keep], SIZES[keep]), rtol=1e-6)  # column 3: nobody
    for k in SHAPES:
        want = np_fedhl_rb(state.G[k], B[k][keep], A[k][keep], RANKS[keep], scale[keep], SIZES[keep])
        assert rel(new.G[k], want) <= 1e-5


@pytest.mark.parametrize("cap", [0.5, float("inf"), "2", True])
def test_bad_beta_cap_is_refused_by_name(cap):
    with pytest.raises(ValueError, match=rf"algorithm 'fedhl_rb': beta_cap must be None or a finite number >= 1, "
                                         rf"got beta_cap={cap!r}"):
        F.make_algorithm("fedhl_rb", R_MAX, {"beta_cap": cap})
