"""Truncation: Eckart–Young optimality, masks, splits, σ = 0 directions, SVD variants."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedhl_jax as F
from fedhl_jax.truncation import zero_directions
from tests.conftest import np_tail, np_truncate

SHAPES = [(7, 5), (5, 9)]  # d_out ≠ d_in both ways: a transposed SVD fails one of them
floats = st.floats(-3, 3, allow_nan=False, width=32)


def matrices(shape):
    return hnp.arrays(np.float32, shape, elements=floats)


def test_rank_mask_prefix():
    m = np.asarray(F.rank_mask([1, 3, 4], 4))
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert m.shape == (3, 4)


@pytest.mark.parametrize("ranks,msg", [([0, 2], "rank 0"), ([2, -1], "rank -1"), ([2, 5], "rank 5 exceeds r_max=4")])
def test_rank_mask_rejects_bad_ranks(ranks, msg):
    with pytest.raises(ValueError, match=msg):
        F.rank_mask(ranks, 4)


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_eckart_young_optimal(shape, data):
    G = data.draw(matrices(shape))
    r_max = min(shape)
    ranks = np.arange(1, r_max + 1)
    mask = F.rank_mask(ranks, r_max)
    scale = F.lora_scale(ranks, 16.0)
    B, A = F.truncate(jnp.asarray(G), mask, scale)
    err = np.asarray(F.truncation_error(jnp.asarray(G), ranks))
    norm2 = float(np.sum(np.asarray(G, np.float64) ** 2)) + 1e-6
    for i, r in enumerate(ranks):
        approx = float(scale[i]) * np.asarray(B[i], np.float64) @ np.asarray(A[i], np.float64)
        assert np.linalg.matrix_rank(approx, tol=1e-4 * max(1.0, np.sqrt(norm2))) <= r
        tail = np_tail(G, r)
        # ‖G − X‖² = Σ_{j>r} σ_j² for a rank-r X is exactly Eckart–Young optimality.
        np.testing.assert_allclose(np.sum((G - approx) ** 2), tail, atol=2e-5 * norm2)
        np.testing.assert_allclose(err[i], tail, atol=2e-5 * norm2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_truncate_matches_numpy_oracle(shape, split):
    rng = np.random.default_rng(0)
    # Well-separated spectrum so that G_r is unique.
    U, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
    V, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
    k = min(shape)
    G = (U[:, :k] * (2.0 ** -np.arange(k))) @ V[:, :k].T
    ranks = np.array([1, 2, k, 3, 1])
    r_max = k
    mask = F.rank_mask(ranks, r_max)
    scale = F.lora_scale(ranks, 8.0)
    B, A = F.truncate(jnp.asarray(G, jnp.float32), mask, scale, split=split)
    for i, r in enumerate(ranks):
        got = float(scale[i]) * np.asarray(B[i], np.float64) @ np.asarray(A[i], np.float64)
        np.testing.assert_allclose(got, np_truncate(G, r), atol=1e-5)
        # Columns/rows past the rank are exactly zero.
        assert np.all(np.asarray(B[i])[:, r:] == 0) and np.all(np.asarray(A[i])[r:] == 0)
    if split == "balanced":
        # B = U√Σ/√s and A = √ΣVᵀ/√s have equal column/row norms.
        np.testing.assert_allclose(np.linalg.norm(B[2], axis=0), np.linalg.norm(A[2], axis=1), rtol=1e-4)


def test_zero_singular_directions_are_trainable():
    """At G₀ = 0: B is zero, A's active rows come from the seeded LoRA initialiser."""
    G = jnp.zeros((6, 10))
    ranks = np.array([1, 2, 4])
    mask = F.rank_mask(ranks, 4)
    scale = F.lora_scale(ranks, 4.0)
    B, A = F.truncate(G, mask, scale, key=jax.random.PRNGKey(3))
    assert np.all(np.asarray(B) == 0)
    for i, r in enumerate(ranks):
        assert np.all(np.abs(np.asarray(A[i, :r])) > 0)
        assert np.all(np.asarray(A[i, r:]) == 0)
        assert np.all(np.abs(np.asarray(A[i, :r])) <= 1 / np.sqrt(10) + 1e-7)
    B2, A2 = F.truncate(G, mask, scale, key=jax.random.PRNGKey(3))
    chex.assert_trees_all_equal((B, A), (B2, A2))  # seeded
    _, A3 = F.truncate(G, mask, scale, key=jax.random.PRNGKey(4))
    assert not np.allclose(A, A3)


def test_partially_zero_spectrum():
    """Rank-2 G, clients up to rank 4: the two σ = 0 directions get init rows, s·B·A = G."""
    rng = np.random.default_rng(1)
    G = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 6))
    mask = F.rank_mask([4], 4)
    scale = F.lora_scale([4], 4.0)
    dec = F.svd(jnp.asarray(G, jnp.float32), 4)
    np.testing.assert_array_equal(np.asarray(zero_directions(dec.S, G.shape)), [False, False, True, True])
    B, A = F.truncate_from_svd(dec, mask, scale, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(scale[0]) * np.asarray(B[0]) @ np.asarray(A[0]), G, atol=1e-5)
    assert np.all(np.asarray(B[0, :, 2:]) == 0) and np.all(np.abs(np.asarray(A[0, 2:])) > 0)


def test_rslora_scale():
    np.testing.assert_allclose(F.lora_scale([4, 16], 8.0, rslora=True), [4.0, 2.0])
    np.testing.assert_allclose(F.lora_scale([4, 16], 8.0), [2.0, 0.5])


def test_truncate_jit_matches_eager():
    G = jax.random.normal(jax.random.PRNGKey(0), (9, 6))
    mask = F.rank_mask([1, 3, 6], 6)
    scale = F.lora_scale([1, 3, 6], 6.0)
    eager = F.truncate(G, mask, scale)
    jitted = jax.jit(F.truncate)(G, mask, scale)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)


def test_one_svd_serves_all_clients():
    """truncate_from_svd only slices: its jaxpr has no SVD, whatever the client count."""
    dec = F.svd(jax.random.normal(jax.random.PRNGKey(0), (16, 12)), 4)
    for n in (2, 50):
        mask = F.rank_mask(np.full(n, 3), 4)
        jaxpr = jax.make_jaxpr(lambda d, m, s: F.truncate_from_svd(d, m, s))(dec, mask, jnp.ones(n))
        assert "svd" not in str(jaxpr)


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_randomized_svd_close_to_exact(shape):
    rng = np.random.default_rng(0)
    k = min(shape)
    U, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
    V, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
    G = jnp.asarray((U * (0.8 ** np.arange(k))) @ V.T, jnp.float32)
    exact = F.svd(G, 8)
    approx = F.svd(G, 8, method="randomized", key=jax.random.PRNGKey(1), oversample=10, n_iter=3)
    np.testing.assert_allclose(approx.S, exact.S, rtol=1e-3)
    np.testing.assert_allclose(approx.tail, exact.tail, rtol=1e-3, atol=1e-5)


def _decaying(rng, shape, rate=0.8):
    k = min(shape)
    U, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
    V, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
    return (U * (rate ** np.arange(k))) @ V.T


def test_svd_all_randomized_is_svd_module_by_module():
    """Same-shape modules share a batched factorization, and each module's result is its own
    ``svd`` with its own key (three modules of one shape, one of another, one all zero)."""
    rng = np.random.default_rng(3)
    shapes = {"l0.q": (40, 32), "l1.q": (40, 32), "l0.down": (24, 40), "l2.q": (40, 32), "l0.k": (40, 32)}
    G = {k: jnp.asarray(_decaying(rng, s, 0.7 + 0.05 * i), jnp.float32) for i, (k, s) in enumerate(shapes.items())}
    G["l0.k"] = jnp.zeros((40, 32), jnp.float32)
    keys = {k: jax.random.PRNGKey(10 + i) for i, k in enumerate(G)}
    got = F.svd_all(G, 6, method="randomized", keys=keys)
    assert list(got) == list(G)  # the modules' order is kept
    for k, g in G.items():
        want = F.svd(g, 6, method="randomized", key=keys[k])
        chex.assert_trees_all_close(got[k].S, want.S, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got[k].tail, want.tail, rtol=1e-5, atol=1e-6)
        # Singular vectors up to sign, compared through the rank-6 approximation they build.
        chex.assert_trees_all_close((got[k].U * got[k].S) @ got[k].Vt, (want.U * want.S) @ want.Vt, atol=1e-5)
        ref = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)  # float64 reference
        np.testing.assert_allclose(np.asarray(got[k].S), ref[:6], rtol=1e-4, atol=1e-6)
        # The same range finder in float64 NumPy, from the same sketch: the batched code is Halko's.
        omega = np.asarray(jax.random.normal(keys[k], (g.shape[1], min(6 + 20, min(g.shape))), jnp.float32), np.float64)
        U64, S64, Vt64, tail64 = _range_finder_np(np.asarray(g, np.float64), omega, 6, n_iter=3)
        np.testing.assert_allclose(np.asarray(got[k].S), S64, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[k].tail), tail64, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray((got[k].U * got[k].S) @ got[k].Vt), (U64 * S64) @ Vt64, atol=1e-5)


def _range_finder_np(G, omega, r, n_iter):
    """Halko et al. 2011, Alg. 4.4 (subspace iteration) then 5.1, in float64 NumPy."""
    Q, _ = np.linalg.qr(G @ omega)
    for _ in range(n_iter):
        Z, _ = np.linalg.qr(G.T @ Q)
        Q, _ = np.linalg.qr(G @ Z)
    Ub, S, Vt = np.linalg.svd(Q.T @ G, full_matrices=False)
    head = np.concatenate([[0.0], np.cumsum(S[:r] ** 2)])
    return (Q @ Ub)[:, :r], S[:r], Vt[:r], np.maximum(np.sum(G * G) - head, 0.0)


def test_svd_all_exact_and_jit():
    rng = np.random.default_rng(4)
    G = {"a": jnp.asarray(rng.normal(size=(9, 7)), jnp.float32), "b": jnp.asarray(rng.normal(size=(9, 7)), jnp.float32)}
    got = jax.jit(lambda g: F.svd_all(g, 3))(G)
    for k in G:
        chex.assert_trees_all_close(got[k].tail, F.svd(G[k], 3).tail, rtol=1e-5)
    keys = {k: jax.random.PRNGKey(0) for k in G}
    eager = F.svd_all(G, 3, method="randomized", keys=keys)
    jitted = jax.jit(lambda g, ks: F.svd_all(g, 3, method="randomized", keys=ks))(G, keys)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)


def test_svd_all_batches_same_shapes():
    """One batched QR chain and one SVD per shape, whatever the number of modules."""
    G = {f"l{i}.{m}": jnp.ones(s, jnp.float32) for i in range(6) for m, s in (("q", (16, 12)), ("down", (12, 16)))}
    keys = {k: jax.random.PRNGKey(i) for i, k in enumerate(G)}

    def calls(jaxpr, counts):  # primitive call sites, through nested jaxprs (jit, custom_jvp, ...)
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        calls(inner, counts)
        return counts

    batched = calls(jax.make_jaxpr(lambda g: F.svd_all(g, 4, method="randomized", keys=keys, n_iter=2))(G).jaxpr, {})
    assert (batched["svd"], batched["qr"]) == (2, 2 * (1 + 2 * 2))  # two shapes, 1 + 2·n_iter QRs each
    single = calls(jax.make_jaxpr(lambda g: F.svd(g["l0.q"], 4, method="randomized", key=keys["l0.q"], n_iter=2))(G).jaxpr, {})
    assert (single["svd"], single["qr"]) == (1, 1 + 2 * 2)  # what each of 12 modules would cost alone


def test_svd_all_bad_input():
    G = {"a": jnp.zeros((5, 4)), "b": jnp.zeros((5, 4))}
    with pytest.raises(ValueError, match="one PRNG key per module"):
        F.svd_all(G, 2, method="randomized", keys={"a": jax.random.PRNGKey(0)})
    with pytest.raises(ValueError, match="r_max=6"):
        F.svd_all(G, 6, method="randomized", keys={k: jax.random.PRNGKey(0) for k in G})


def test_bad_r_max_and_shapes():
    with pytest.raises(ValueError, match="r_max=6"):
        F.svd(jnp.zeros((5, 4)), 6)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5\)"):
        F.svd(jnp.zeros((3, 4, 5)), 2)
    with pytest.raises(ValueError, match="unknown split 'diag'"):
        F.truncate(jnp.ones((4, 4)), F.rank_mask([2], 2), jnp.ones(1), split="diag")
    with pytest.raises(ValueError, match="rank 7 exceeds min"):
        F.check_ranks([2, 7], dims=(8, 6))
