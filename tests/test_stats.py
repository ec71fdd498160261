"""Paired bootstrap intervals, the t distribution and the paired t-test (experiments/stats.py)."""

import math

import numpy as np
import pytest

from fedhl_jax.experiments import stats as S

# Two-sided 5% and 1% critical values of Student's t (standard tables).
T_TABLE = [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (2.228, 10, 0.05), (2.086, 20, 0.05),
           (63.657, 1, 0.01), (4.604, 4, 0.01), (3.169, 10, 0.01), (1.960, 1e7, 0.05), (2.576, 1e7, 0.01)]


@pytest.mark.parametrize("t, df, p", T_TABLE)
def test_t_p_values_match_the_table(t, df, p):
    assert S.t_two_sided_p(t, df) == pytest.approx(p, rel=2e-3)
    assert S.t_two_sided_p(-t, df) == S.t_two_sided_p(t, df)


def test_t_p_value_closed_forms():
    """df = 1 is Cauchy: p = 1 − 2·atan(|t|)/π; df = 2: p = 1 − |t|/√(2 + t²)."""
    for t in (0.0, 0.3, 1.0, 2.5, 40.0):
        assert S.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
        assert S.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12, abs=1e-15)
    assert S.t_two_sided_p(math.inf, 3) == 0.0


@pytest.mark.parametrize("a, b", [(1, 1), (2.5, 1), (1, 3.5), (0.5, 0.5), (7, 0.5), (30, 40)])
def test_betainc_closed_forms_and_symmetry(a, b):
    for x in (0.0, 1e-6, 0.1, 0.37, 0.5, 0.9, 1 - 1e-9, 1.0):
        got = S.betainc(a, b, x)
        assert 0 <= got <= 1
        assert got + S.betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)  # I_x(a,b) = 1 − I_{1−x}(b,a)
        if b == 1:
            assert got == pytest.approx(x**a, rel=1e-12, abs=1e-300)
        if a == 1:
            assert got == pytest.approx(1 - (1 - x) ** b, rel=1e-12, abs=1e-15)
        if a == b == 0.5:
            assert got == pytest.approx(2 / math.pi * math.atan2(math.sqrt(x), math.sqrt(1 - x)), rel=1e-12, abs=1e-15)


def test_betainc_matches_scipy_where_installed():
    special = pytest.importorskip("scipy.special")
    rng = np.random.default_rng(0)
    for a, b, x in zip(rng.uniform(0.1, 50, 200), rng.uniform(0.1, 50, 200), rng.uniform(0, 1, 200)):
        assert S.betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-9, abs=1e-14)


def test_paired_t_test_by_hand():
    a = np.array([[1.0, 1.2], [0.9, 1.1], [1.3, 1.5], [1.0, 1.0]])
    b = np.array([[0.8, 1.0], [0.9, 0.9], [1.0, 1.1], [0.95, 0.95]])
    d = (a - b).mean(axis=1)  # per-seed means: 0.2, 0.1, 0.35, 0.05
    t = d.mean() / (d.std(ddof=1) / 2)
    res = S.paired_t_test(a, b)
    assert res.df == 3 and res.mean == pytest.approx(d.mean()) and res.t == pytest.approx(t)
    assert res.p == pytest.approx(S.t_two_sided_p(t, 3))
    stats = pytest.importorskip("scipy.stats")
    assert res.p == pytest.approx(float(stats.ttest_rel(a.mean(1), b.mean(1)).pvalue), rel=1e-9)


def test_t_critical_and_t_interval():
    # Table values of the two-sided 95% and 99% points, and the t-interval of a known sample.
    for df, want in ((1, 12.706204736), (2, 4.302652730), (11, 2.200985160), (30, 2.042272456)):
        assert S.t_critical(df) == pytest.approx(want, rel=1e-8)
    assert S.t_critical(4, level=0.99) == pytest.approx(4.604094871, rel=1e-8)
    x = np.array([0.3, -0.1, 0.2, 0.4, 0.0])
    got = S.t_interval(x)
    half = 2.776445105 * x.std(ddof=1) / math.sqrt(5)
    assert got.mean == pytest.approx(0.16) and got.level == 0.95
    assert (got.low, got.high) == pytest.approx((0.16 - half, 0.16 + half), rel=1e-8)
    assert S.t_two_sided_p((got.high - got.mean) / (x.std(ddof=1) / math.sqrt(5)), 4) == pytest.approx(0.05)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 7.5, 100):
        assert S.t_critical(df, level=0.9) == pytest.approx(float(stats.t.ppf(0.95, df)), rel=1e-9)
    with pytest.raises(ValueError, match=r"at least 2 finite values, got \[0.1\]"):
        S.t_interval([0.1])
    with pytest.raises(ValueError, match="df must be > 0, got df=0"):
        S.t_critical(0)


def test_paired_t_test_degenerate_and_bad_inputs():
    assert S.paired_t_test(np.ones((3, 2)), np.ones((3, 2))).p == 1.0
    res = S.paired_t_test(np.ones((3, 2)), np.zeros((3, 2)))
    assert res.t == math.inf and res.p == 0.0
    with pytest.raises(ValueError, match="needs at least 2 seeds, got 1"):
        S.paired_t_test(np.ones((1, 5)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"same shape, got \(3, 2\) and \(3, 3\)"):
        S.paired_t_test(np.ones((3, 2)), np.ones((3, 3)))
    bad = np.ones((3, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="loss_b holds a non-finite value nan at seed 1, example 2"):
        S.paired_bootstrap_ci(np.ones((3, 4)), bad)
    with pytest.raises(ValueError, match="level must be a number in \\(0, 1\\), got level=95"):
        S.paired_bootstrap_ci(np.ones(4), np.ones(4), level=95)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 100, got n_boot=10"):
        S.paired_bootstrap_ci(np.ones(4), np.ones(4), n_boot=10)


def coverage(rng, trials, n_seeds, n_examples, seed_sd, example_sd, true=0.1):
    hits = 0
    for t in range(trials):
        d = true + seed_sd * rng.normal(size=(n_seeds, 1)) + example_sd * rng.normal(size=(n_seeds, n_examples))
        iv = S.paired_bootstrap_ci(d + 1.0, np.ones_like(d), n_boot=1000, seed=t)
        hits += iv.low <= true <= iv.high
    return hits / trials


def test_bootstrap_coverage_on_synthetic_data():
    """95% intervals cover the true mean difference about 95% of the time (fixed seeds).

    One seed: the percentile bootstrap over examples (0.927 here). Ten seeds with a seed effect:
    the two-level scheme is a little conservative, since resampling examples within resampled
    seeds counts the example noise again (0.97 here)."""
    rng = np.random.default_rng(0)
    assert 0.89 <= coverage(rng, 300, 1, 100, 0.0, 1.0) <= 0.98
    assert 0.92 <= coverage(rng, 200, 10, 50, 0.2, 1.0) <= 1.0


def test_bootstrap_is_deterministic_and_paired():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 200)) * 5  # a large per-example effect shared by both methods
    a, b = base + 0.05 + 0.1 * rng.normal(size=base.shape), base
    one, two = S.paired_bootstrap_ci(a, b, seed=7), S.paired_bootstrap_ci(a, b, seed=7)
    assert one == two and S.paired_bootstrap_ci(a, b, seed=8) != one
    assert one.mean == pytest.approx((a - b).mean()) and one.low < one.mean < one.high
    assert one.low > 0 and S.decision(one, ("A", "B")) == "A > B"  # pairing cancels the shared effect
    assert S.decision(S.paired_bootstrap_ci(b, a), ("A", "B")) == "A < B"


def test_not_decided_when_the_interval_holds_zero():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    iv = S.paired_bootstrap_ci(a, b)
    assert iv.low < 0 < iv.high and S.decision(iv) == S.NOT_DECIDED == "not decided"
    assert S.decision(S.Interval(0.1, 0.0, 0.2, 0.95)) == "not decided"  # a bound at 0 decides nothing
    assert S.decision(S.Interval(-0.1, -0.2, -0.01, 0.95)) == "a < b"


# Newcombe (1998), Statistics in Medicine 17: the worked examples of the single-proportion paper
# (Table I, method 3, Wilson's score interval) and of the difference paper (Table II, method 10).
WILSON = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611)),
          ((1, 29), (0.0061, 0.1718))]
NEWCOMBE = [((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090)),
            ((6, 7, 2, 7), (0.0582, 0.8062))]


@pytest.mark.parametrize("counts, bounds", WILSON)
def test_wilson_interval_matches_newcombes_table(counts, bounds):
    ci = S.wilson_ci(*counts)
    assert ci.mean == counts[0] / counts[1] and ci.level == 0.95
    assert (ci.low, ci.high) == pytest.approx(bounds, abs=6e-5)


@pytest.mark.parametrize("counts, bounds", NEWCOMBE)
def test_newcombe_difference_interval_matches_the_paper(counts, bounds):
    k1, n1, k2, n2 = counts
    ci = S.newcombe_diff_ci(k1, n1, k2, n2)
    assert ci.mean == pytest.approx(k1 / n1 - k2 / n2)
    assert (ci.low, ci.high) == pytest.approx(bounds, abs=6e-5)
    flipped = S.newcombe_diff_ci(k2, n2, k1, n1)  # a − b mirrors b − a
    assert (flipped.low, flipped.high) == pytest.approx((-ci.high, -ci.low))


def test_proportion_intervals_name_bad_counts():
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, n=10\], got k=11"):
        S.wilson_ci(11, 10)
    with pytest.raises(ValueError, match=r"n must be a positive integer, got n=0"):
        S.newcombe_diff_ci(0, 0, 1, 2)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, n=200\], got k=3.5"):
        S.wilson_ci(3.5, 200)
