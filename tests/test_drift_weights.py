"""The ε-free weightings' closed forms against a numerical minimiser of their objectives (float64).

``balanced``: ``p ∝ n/(x + m)`` minimises ``Σ p² (x + m)/n``; ``drift_sampling``:
``p ∝ 1/(x + m/q)`` minimises FedHL's drift plus FedAvg's sampling term ``Σ p² x + Σ p² m/q``
(``x = r̂^power``, ``q = n/Σn``, ``m = Σ q x``), both subject to ``Σ p = 1``.
"""

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import fedhl_jax as F
from fedhl_jax import aggregation as agg

ERR = np.array([0.3, 2.0, 0.05, 1.2, 0.7])
SIZES = np.array([10.0, 3, 7, 1, 5])


def simplex_projection(v):
    """Euclidean projection onto {p ≥ 0, Σ p = 1} (sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0)


def minimise(c, iters=20000):
    """argmin over the simplex of Σ c_i p_i² by projected gradient descent (float64)."""
    p = np.full(len(c), 1 / len(c))
    step = 1 / (2 * c.max())
    for _ in range(iters):
        p = simplex_projection(p - step * 2 * c * p)
    return p


def terms(err, sizes, power=2.0):
    x = np.asarray(err, np.float64) ** power
    n = np.asarray(sizes, np.float64)
    q = n / n.sum()
    return x, n, q, (q * x).sum()


def objective_balanced(err, sizes):
    x, n, _, m = terms(err, sizes)
    return (x + m) / n  # c_i of Σ c_i p_i²


def objective_drift_sampling(err, sizes):
    x, _, q, m = terms(err, sizes)
    return x + m / q  # drift Σ p² x plus sampling Σ p² σ²/n with σ²/n_i = m/q_i


@pytest.mark.parametrize("err, sizes", [(ERR, SIZES), (ERR[::-1] * 40, SIZES[[2, 0, 4, 1, 3]]),
                                        (np.array([1.0, 1e-3, 3.0, 0.2]), np.array([1.0, 50, 2, 8]))])
def test_closed_forms_are_the_numerical_minimisers(err, sizes):
    e, n = jnp.asarray(err, jnp.float32), jnp.asarray(sizes, jnp.float32)
    for weights, c in ((agg.balanced_weights, objective_balanced(err, sizes)),
                       (agg.drift_sampling_weights, objective_drift_sampling(err, sizes))):
        want = minimise(c)
        got = np.asarray(weights(e, n), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
        assert (c * got**2).sum() <= (c * want**2).sum() * (1 + 1e-5)


def test_balanced_does_not_minimise_drift_plus_sampling():
    """The mismatch: the balanced weights leave drift + sampling measurably above its minimum."""
    c = objective_drift_sampling(ERR, SIZES)
    bal = np.asarray(agg.balanced_weights(jnp.asarray(ERR), jnp.asarray(SIZES)), np.float64)
    best = minimise(c)
    assert (c * bal**2).sum() > 1.05 * (c * best**2).sum()
    assert np.abs(bal - best).max() > 0.05


@settings(deadline=None, max_examples=40)
@given(hnp.arrays(np.float64, 6, elements=st.floats(0, 1e3)), hnp.arrays(np.float64, 6, elements=st.floats(1, 100)),
       st.floats(1e-6, 1e6))
def test_drift_sampling_properties(err, sizes, c):
    e, n = jnp.asarray(err, jnp.float32), jnp.asarray(sizes, jnp.float32)
    p = np.asarray(agg.drift_sampling_weights(e, n), np.float64)
    assert np.all(p > 0) and abs(p.sum() - 1) < 1e-5
    np.testing.assert_allclose(agg.drift_sampling_weights(e * c, n), p, rtol=1e-3, atol=1e-7)  # scale-free
    ratio = (p / sizes)[:, None] / (p / sizes)[None, :]
    assert np.all(ratio >= 0.5 * (1 - 1e-4))  # at most a factor 2 from the data-size weights


def test_drift_sampling_equal_and_zero_errors():
    n = jnp.array([4.0, 1, 3, 2])
    q = np.asarray(n) / 10
    np.testing.assert_allclose(agg.drift_sampling_weights(jnp.full((4,), 2.5), n), q / (1 + q) / (q / (1 + q)).sum(),
                               rtol=1e-6)
    np.testing.assert_allclose(agg.drift_sampling_weights(jnp.zeros(4), n), q, rtol=1e-6)  # no drift: data sizes
    p = agg.drift_sampling_weights(jnp.array([1.0, 2, 3, 4]), n, valid=jnp.array([True, False, True, True]))
    keep = [0, 2, 3]
    np.testing.assert_allclose(np.asarray(p)[keep], minimise(objective_drift_sampling(np.array([1.0, 3, 4]),
                                                                                       np.asarray(n)[keep])),
                               rtol=1e-5, atol=1e-8)
    assert float(p[1]) == 0.0


def test_fedhl_takes_the_weighting_by_name():
    rng = np.random.default_rng(0)
    ranks, r_max = np.array([1, 2, 4, 3, 2]), 4
    G = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
    mask, scale = F.rank_mask(ranks, r_max), F.lora_scale(ranks, 8.0)
    B, A = F.truncate(G, mask, scale)
    sizes = jnp.asarray(SIZES, jnp.float32)
    _, p = F.fedhl_aggregate(G, B, A, mask, scale, num_examples=sizes, weighting="drift_sampling")
    err = np.asarray(F.svd(G, r_max).tail, np.float64)[ranks]
    np.testing.assert_allclose(p, minimise(objective_drift_sampling(err, SIZES)), rtol=1e-4, atol=1e-7)
    alg = F.make_algorithm("fedhl", r_max, weighting="drift_sampling")
    state = alg.init({"m": G.shape}).replace(G={"m": G}, dec={"m": F.svd(G, r_max)})
    _, info = alg.aggregate(state, {"m": B}, {"m": A}, mask, scale, sizes)
    np.testing.assert_allclose(info["p"], p, rtol=1e-6)
    with pytest.raises(ValueError, match="weighting='drift_sampling' needs num_examples"):
        F.fedhl_aggregate(G, B, A, mask, scale, weighting="drift_sampling")
