"""Aggregation rules on one module against float64 NumPy oracles."""

import warnings

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedhl_jax as F
from tests.conftest import np_tail, np_truncate

D_OUT, D_IN, R_MAX = 7, 5, 4  # d_out ≠ d_in on purpose
RANKS = np.array([1, 2, 4, 3, 2])


def setup(seed=0, ranks=RANKS, r_max=R_MAX, d_out=D_OUT, d_in=D_IN, noise=0.3):
    """A random G, the clients' broadcast factors and 'trained' factors (broadcast + noise)."""
    rng = np.random.default_rng(seed)
    G = jnp.asarray(rng.normal(size=(d_out, d_in)), jnp.float32)
    mask = F.rank_mask(ranks, r_max)
    scale = F.lora_scale(ranks, 8.0)
    B0, A0 = F.truncate(G, mask, scale)
    B = B0 + noise * jnp.asarray(rng.normal(size=B0.shape), jnp.float32) * mask[:, None, :]
    A = A0 + noise * jnp.asarray(rng.normal(size=A0.shape), jnp.float32) * mask[:, :, None]
    return G, mask, scale, B0, A0, B, A


def np_fedhl(G, B, A, ranks, scale, eps, power=2.0, eps_mode="absolute", sizes=None, weighting="optimal"):
    """float64 oracle of FedHL's aggregation."""
    G = np.asarray(G, np.float64)
    err = np.array([np_tail(G, r) for r in ranks])
    x = err**power
    e = eps * x.mean() if eps_mode == "relative" else eps
    w = {"optimal": 1 / (x + e), "uniform": np.ones_like(x)}.get(weighting)
    if weighting == "data_size":
        w = np.asarray(sizes, np.float64)
    if weighting == "optimal_data_size":
        w = np.asarray(sizes, np.float64) / (x + e)
    p = w / w.sum()
    upd = sum(p[i] * (float(scale[i]) * np.asarray(B[i], np.float64)[:, :r] @ np.asarray(A[i], np.float64)[:r]
                      - np_truncate(G, r)) for i, r in enumerate(ranks))
    return G + upd, p


@pytest.mark.parametrize("weighting", ["optimal", "uniform", "data_size", "optimal_data_size"])
@pytest.mark.parametrize("eps_mode", ["absolute", "relative"])
def test_fedhl_matches_numpy(weighting, eps_mode):
    G, mask, scale, _, _, B, A = setup()
    sizes = jnp.array([10.0, 3, 7, 1, 5])
    got, p = F.fedhl_aggregate(G, B, A, mask, scale, eps=0.5, num_examples=sizes, weighting=weighting,
                               eps_mode=eps_mode)
    want, p_want = np_fedhl(G, B, A, RANKS, scale, 0.5, eps_mode=eps_mode, sizes=sizes, weighting=weighting)
    np.testing.assert_allclose(p, p_want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_fedhl_power_option():
    G, mask, scale, _, _, B, A = setup(1)
    got, p = F.fedhl_aggregate(G, B, A, mask, scale, eps=0.1, power=1.0, eps_mode="absolute")
    want, p_want = np_fedhl(G, B, A, RANKS, scale, 0.1, power=1.0)
    np.testing.assert_allclose(p, p_want, rtol=2e-4)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_padding_invariance():
    """A client padded to r_max (garbage in the pad) gives the ΔW of the same client at r_max = r."""
    G, mask, scale, _, _, B, A = setup(2)
    dec = F.svd(G, R_MAX)
    rng = np.random.default_rng(9)
    off = 1.0 - mask
    Bg = B + jnp.asarray(rng.normal(size=B.shape), jnp.float32) * off[:, None, :] * 1e3
    Ag = A + jnp.asarray(rng.normal(size=A.shape), jnp.float32) * off[:, :, None] * 1e3
    padded = np.asarray(F.client_deltas(dec, Bg, Ag, mask, scale))
    for i, r in enumerate(RANKS):
        dec_r = F.svd(G, int(r))
        unpadded = F.client_deltas(dec_r, B[i:i + 1, :, :r], A[i:i + 1, :r], F.rank_mask([r], int(r)), scale[i:i + 1])
        np.testing.assert_allclose(padded[i], unpadded[0], atol=1e-5)
        oracle = float(scale[i]) * np.asarray(B[i], np.float64)[:, :r] @ np.asarray(A[i], np.float64)[:r] - np_truncate(G, r)
        np.testing.assert_allclose(padded[i], oracle, atol=1e-4)


def test_weighted_delta_equals_dense_sum():
    G, mask, scale, _, _, B, A = setup(3)
    dec = F.svd(G, R_MAX)
    p = jnp.array([0.1, 0.2, 0.3, 0.15, 0.25])
    dense = jnp.einsum("n,noi->oi", p, F.client_deltas(dec, B, A, mask, scale))
    np.testing.assert_allclose(F.weighted_delta(dec, B, A, mask, scale, p), dense, atol=1e-5)


def test_zero_updates_leave_fedhl_unchanged_but_not_flexlora():
    G, mask, scale, B0, A0, _, _ = setup(4)
    G_fedhl, _ = F.fedhl_aggregate(G, B0, A0, mask, scale, eps=1e-3)
    np.testing.assert_allclose(G_fedhl, G, atol=1e-5)
    G_flex = F.flexlora_aggregate(G, B0, A0, mask, scale, num_examples=jnp.ones(len(RANKS)))
    # FlexLoRA drops each client's tail G − G_r: the truncation bias.
    bias = float(jnp.linalg.norm(G_flex - G))
    expected = np.linalg.norm(np.mean([np_truncate(G, r) for r in RANKS], axis=0) - np.asarray(G, np.float64))
    assert bias > 0.1 * float(jnp.linalg.norm(G))
    np.testing.assert_allclose(bias, expected, rtol=1e-4)


def test_flexlora_matches_numpy():
    G, mask, scale, _, _, B, A = setup(5)
    sizes = np.array([4.0, 1, 2, 3, 10])
    got = F.flexlora_aggregate(G, B, A, mask, scale, num_examples=jnp.asarray(sizes))
    p = sizes / sizes.sum()
    want = sum(p[i] * float(scale[i]) * np.asarray(B[i], np.float64)[:, :r] @ np.asarray(A[i], np.float64)[:r]
               for i, r in enumerate(RANKS))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_permutation_invariance():
    G, mask, scale, _, _, B, A = setup(6)
    perm = np.array([3, 0, 4, 2, 1])
    sizes = jnp.array([1.0, 2, 3, 4, 5])
    g1, p1 = F.fedhl_aggregate(G, B, A, mask, scale, eps=0.1, num_examples=sizes, weighting="optimal_data_size")
    g2, p2 = F.fedhl_aggregate(G, B[perm], A[perm], mask[perm], scale[perm], eps=0.1, num_examples=sizes[perm],
                               weighting="optimal_data_size")
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    np.testing.assert_allclose(p1[perm], p2, atol=1e-6)
    f1 = F.flexlora_aggregate(G, B, A, mask, scale, num_examples=sizes)
    f2 = F.flexlora_aggregate(G, B[perm], A[perm], mask[perm], scale[perm], num_examples=sizes[perm])
    np.testing.assert_allclose(f1, f2, atol=1e-5)


errors_st = hnp.arrays(np.float32, (6,), elements=st.one_of(st.just(0.0), st.floats(0, 1e4, width=32)))


@settings(max_examples=200, deadline=None)
@given(errors=errors_st, eps=st.floats(1e-12, 1e3), mode=st.sampled_from(["absolute", "relative"]),
       power=st.sampled_from([1.0, 2.0]))
def test_weights_are_a_distribution(errors, eps, mode, power):
    p = np.asarray(F.fedhl_weights(jnp.asarray(errors), eps=eps, eps_mode=mode, power=power))
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
    # Monotone: a smaller truncation error never gets a smaller weight.
    order = np.argsort(errors, kind="stable")
    assert np.all(np.diff(p[order]) <= 1e-6)


def test_weight_explosion_when_error_vanishes():
    """r̂ = 0 for one client: with a tiny absolute ε it takes (almost) all the weight."""
    p = np.asarray(F.fedhl_weights(jnp.array([0.0, 1.0, 2.0]), eps=1e-8))
    assert p[0] > 0.999999 and np.isfinite(p).all()
    p_rel = np.asarray(F.fedhl_weights(jnp.array([0.0, 1.0, 2.0]), eps=1.0, eps_mode="relative"))
    assert 0.5 < p_rel[0] < 0.9  # relative ε tempers the explosion
    p_all_zero = np.asarray(F.fedhl_weights(jnp.zeros(4), eps=1e-3, eps_mode="relative"))
    np.testing.assert_allclose(p_all_zero, 0.25)


def test_full_rank_fedhl_is_weighted_fedavg():
    """Every client at full rank: G_r = G, so FedHL is FedAvg of the full updates W_i − G."""
    k = min(D_OUT, D_IN)
    ranks = np.full(4, k)
    G, mask, scale, _, _, B, A = setup(7, ranks=ranks, r_max=k)
    sizes = jnp.array([1.0, 5, 2, 2])
    got, p = F.fedhl_aggregate(G, B, A, mask, scale, eps=1e-3, num_examples=sizes, weighting="optimal_data_size")
    W = np.einsum("n,nor,nri->noi", np.asarray(scale, np.float64), np.asarray(B, np.float64), np.asarray(A, np.float64))
    w = np.asarray(sizes) / np.sum(sizes)
    want = np.asarray(G, np.float64) + np.einsum("n,noi->oi", w, W - np.asarray(G, np.float64)[None])
    np.testing.assert_allclose(p, w, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_flora_stack_product():
    _, mask, scale, _, _, B, A = setup(8)
    p = jnp.array([0.3, 0.1, 0.2, 0.25, 0.15])
    Bs, As = F.flora_stack(B, A, mask, scale, p)
    assert Bs.shape == (D_OUT, len(RANKS) * R_MAX) and As.shape == (len(RANKS) * R_MAX, D_IN)
    want = sum(float(p[i]) * float(scale[i]) * np.asarray(B[i], np.float64)[:, :r] @ np.asarray(A[i], np.float64)[:r]
               for i, r in enumerate(RANKS))
    np.testing.assert_allclose(np.asarray(Bs, np.float64) @ np.asarray(As, np.float64), want, atol=1e-5)


def test_jit_matches_eager():
    G, mask, scale, _, _, B, A = setup(9)
    f = lambda *a: F.fedhl_aggregate(*a, eps=0.01)
    chex.assert_trees_all_close(f(G, B, A, mask, scale), jax.jit(f)(G, B, A, mask, scale), atol=1e-5)
    g = lambda *a: F.flexlora_aggregate(*a, num_examples=jnp.ones(5))
    chex.assert_trees_all_close(g(G, B, A, mask, scale), jax.jit(g)(G, B, A, mask, scale), atol=1e-5)


def test_float64_agreement():
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        G = jnp.asarray(rng.normal(size=(6, 9)))
        ranks = np.array([1, 3, 5])
        mask = F.rank_mask(ranks, 5, dtype=jnp.float64)
        scale = F.lora_scale(ranks, 4.0, dtype=jnp.float64)
        B0, A0 = F.truncate(G, mask, scale)
        B = B0 + 0.1 * jnp.asarray(rng.normal(size=B0.shape)) * mask[:, None, :]
        A = A0 + 0.1 * jnp.asarray(rng.normal(size=A0.shape)) * mask[:, :, None]
        got, p = F.fedhl_aggregate(G, B, A, mask, scale, eps=0.3, eps_mode="absolute")
        assert got.dtype == jnp.float64
        want, p_want = np_fedhl(G, B, A, ranks, scale, 0.3, eps_mode="absolute")
        np.testing.assert_allclose(got, want, atol=1e-10)
        np.testing.assert_allclose(p, p_want, atol=1e-12)


def test_nonfinite_client_left_out_with_warning():
    G, mask, scale, _, _, B, A = setup(11)
    B_bad = B.at[1, 0, 0].set(jnp.nan)
    with pytest.warns(RuntimeWarning, match=r"clients \[1\]"):
        got, p = F.fedhl_aggregate(G, B_bad, A, mask, scale, eps=0.1)
        jax.effects_barrier()
    assert float(p[1]) == 0.0
    np.testing.assert_allclose(float(jnp.sum(p)), 1.0, rtol=1e-6)
    keep = np.array([0, 2, 3, 4])
    want, _ = F.fedhl_aggregate(G, B[keep], A[keep], mask[keep], scale[keep], eps=0.1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.warns(RuntimeWarning, match=r"clients \[3\]"):
        f = F.flexlora_aggregate(G, B, A.at[3, 0, 0].set(jnp.inf), mask, scale, num_examples=jnp.ones(5))
        jax.effects_barrier()
    assert np.all(np.isfinite(f))


def test_every_client_nonfinite_leaves_state_unchanged():
    G, mask, scale, _, _, B, A = setup(12)
    with pytest.warns(RuntimeWarning, match="no client left"):
        got, p = F.fedhl_aggregate(G, jnp.full_like(B, jnp.nan), A, mask, scale, eps=0.1)
        flex = F.flexlora_aggregate(G, jnp.full_like(B, jnp.nan), A, mask, scale, num_examples=jnp.ones(5))
        jax.effects_barrier()
    np.testing.assert_array_equal(got, G)
    np.testing.assert_array_equal(flex, G)
    np.testing.assert_array_equal(p, 0.0)


def test_nan_in_masked_columns_is_ignored():
    G, mask, scale, _, _, B, A = setup(13)
    B_pad = B.at[0, :, 3].set(jnp.nan)  # client 0 has rank 1: column 3 is padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, p = F.fedhl_aggregate(G, B_pad, A, mask, scale, eps=0.1)
        jax.effects_barrier()
    want, _ = F.fedhl_aggregate(G, B, A, mask, scale, eps=0.1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert float(p[0]) > 0


def test_bad_inputs_name_the_value():
    G, mask, scale, _, _, B, A = setup(14)
    with pytest.raises(ValueError, match="eps=0"):
        F.fedhl_aggregate(G, B, A, mask, scale, eps=0)
    with pytest.raises(ValueError, match="eps=-1"):
        F.fedhl_aggregate(G, B, A, mask, scale, eps=-1.0)
    with pytest.raises(ValueError, match=r"B has shape \(5, 5, 4\)"):
        F.fedhl_aggregate(G, B[:, :5], A, mask, scale, eps=1.0)
    with pytest.raises(ValueError, match=r"A has shape"):
        F.flexlora_aggregate(G, B, A[:, :, :3], mask, scale)
    with pytest.raises(ValueError, match="unknown weighting 'best'"):
        F.fedhl_aggregate(G, B, A, mask, scale, eps=1.0, weighting="best")
    with pytest.raises(ValueError, match="needs num_examples"):
        F.fedhl_aggregate(G, B, A, mask, scale, eps=1.0, weighting="data_size")
    with pytest.raises(ValueError, match=r"scale has shape \(3,\)"):
        F.fedhl_aggregate(G, B, A, mask, scale[:3], eps=1.0)


# --------------------------------------------------------------------------- RB-LoRA and balanced weights


def np_rb_lora(B, A, ranks, scale, sizes):
    """float64 oracle of RB-LoRA: rank-one components averaged over the clients holding them."""
    sizes = np.asarray(sizes, np.float64)
    out = 0.0
    for r in range(max(ranks)):
        holders = [k for k, rk in enumerate(ranks) if rk > r]
        tot = sum(sizes[k] for k in holders)
        for k in holders:
            b = np.asarray(B[k], np.float64)[:, r]
            a = np.asarray(A[k], np.float64)[r]
            out = out + sizes[k] / tot * float(scale[k]) * np.outer(b, a)
    return out


def test_rb_lora_matches_numpy():
    G, mask, scale, _, _, B, A = setup()
    sizes = jnp.array([10.0, 3, 7, 1, 5])
    got = F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=sizes)
    np.testing.assert_allclose(got, np_rb_lora(B, A, RANKS, scale, sizes), atol=2e-5)
    # the tree-level algorithm applies the same rule to every module
    alg = F.make_algorithm("rb_lora", R_MAX)
    state = alg.init({"m": G.shape})
    state = state.replace(G={"m": G}, dec={"m": F.svd(G, R_MAX)})
    new, _ = alg.aggregate(state, {"m": B}, {"m": A}, mask, scale, sizes)
    np.testing.assert_allclose(new.G["m"], np_rb_lora(B, A, RANKS, scale, sizes), atol=2e-5)


def test_rank_rarity_weights_of_holders_sum_to_one():
    mask = F.rank_mask(RANKS, R_MAX)
    sizes = jnp.array([10.0, 3, 7, 1, 5])
    valid = jnp.array([True, True, True, False, True])
    beta = np.asarray(F.rank_rarity(mask, sizes, valid), np.float64)
    alpha = np.where(valid, sizes, 0) / np.sum(np.where(valid, sizes, 0))
    held = np.asarray(mask, bool) & np.asarray(valid)[:, None]
    np.testing.assert_allclose((alpha[:, None] * held * beta[None]).sum(0), 1.0, rtol=1e-6)


def test_rb_lora_keeps_untrained_truncations_flexlora_shrinks_them():
    """Clients that return G's truncations unchanged: RB-LoRA gives back G_{r_max held}."""
    G, mask, scale, B0, A0, _, _ = setup()
    sizes = jnp.array([10.0, 3, 7, 1, 5])
    rb = F.rb_lora_aggregate(G, B0, A0, mask, scale, num_examples=sizes)
    np.testing.assert_allclose(rb, np_truncate(G, int(RANKS.max())), atol=1e-5)
    flex = F.flexlora_aggregate(G, B0, A0, mask, scale, num_examples=sizes)
    assert np.linalg.norm(np.asarray(flex) - np_truncate(G, int(RANKS.max()))) > 0.1


def test_rb_lora_is_flexlora_with_homogeneous_ranks():
    ranks = np.array([3, 3, 3])
    G, mask, scale, _, _, B, A = setup(ranks=ranks)
    sizes = jnp.array([2.0, 5, 1])
    chex.assert_trees_all_close(F.rb_lora_aggregate(G, B, A, mask, scale, num_examples=sizes),
                                F.flexlora_aggregate(G, B, A, mask, scale, num_examples=sizes), atol=1e-6)


def np_balanced(err, sizes, power=2.0):
    x = np.asarray(err, np.float64) ** power
    n = np.asarray(sizes, np.float64)
    m = (n * x).sum() / n.sum()
    w = n / (x + m) if m > 0 else n
    return w / w.sum()


def test_balanced_weights_match_numpy_and_fedhl_uses_them():
    G, mask, scale, _, _, B, A = setup()
    sizes = jnp.array([10.0, 3, 7, 1, 5])
    err = np.array([np_tail(G, r) for r in RANKS])
    np.testing.assert_allclose(F.balanced_weights(jnp.asarray(err, jnp.float32), sizes), np_balanced(err, sizes),
                               rtol=2e-5)
    got, p = F.fedhl_aggregate(G, B, A, mask, scale, num_examples=sizes, weighting="balanced")
    np.testing.assert_allclose(p, np_balanced(err, sizes), rtol=2e-4, atol=1e-6)
    p64 = np_balanced(err, sizes)
    want = np.asarray(G, np.float64) + sum(
        p64[i] * (float(scale[i]) * np.asarray(B[i], np.float64)[:, :r] @ np.asarray(A[i], np.float64)[:r]
                  - np_truncate(G, r)) for i, r in enumerate(RANKS))
    np.testing.assert_allclose(got, want, atol=2e-4)


@settings(deadline=None, max_examples=40)
@given(hnp.arrays(np.float64, 6, elements=st.floats(0, 1e3)), hnp.arrays(np.float64, 6, elements=st.floats(1, 100)),
       st.floats(1e-6, 1e6))
def test_balanced_weights_properties(err, sizes, c):
    p = np.asarray(F.balanced_weights(jnp.asarray(err, jnp.float32), jnp.asarray(sizes, jnp.float32)), np.float64)
    assert np.all(p > 0) and abs(p.sum() - 1) < 1e-5
    # scale-free: no ε to tune
    pc = np.asarray(F.balanced_weights(jnp.asarray(err * c, jnp.float32), jnp.asarray(sizes, jnp.float32)))
    np.testing.assert_allclose(pc, p, rtol=1e-3, atol=1e-7)
    # no client is driven to ~0: (p_i/n_i)/(p_j/n_j) ≥ q_i/(1+q_i), q_i = n_i/Σn
    q = sizes / sizes.sum()
    ratio = (p / sizes)[:, None] / (p / sizes)[None, :]
    assert np.all(ratio >= (q / (1 + q))[:, None] * (1 - 1e-4))


def test_balanced_weights_equal_errors_are_data_size():
    sizes = jnp.array([4.0, 1, 3, 2])
    for e in (0.0, 2.5):
        np.testing.assert_allclose(F.balanced_weights(jnp.full((4,), e), sizes), np.asarray(sizes) / 10, rtol=1e-6)
    # an invalid client gets 0 and the others are renormalised
    p = F.balanced_weights(jnp.array([1.0, 2, 3, 4]), sizes, valid=jnp.array([True, False, True, True]))
    assert float(p[1]) == 0.0 and abs(float(p.sum()) - 1) < 1e-6
