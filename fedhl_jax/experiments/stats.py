"""Paired comparisons of two methods: bootstrap confidence intervals and t-tests (pure NumPy).

Two methods ``a`` and ``b`` are evaluated on the same examples under the same seeds, so their
per-example losses pair up: ``d[s, e] = loss_a[s, e] − loss_b[s, e]`` for seed ``s`` and example
``e`` (``[S, E]``). Everything here works on those differences; whatever a seed or an example
shares between the two methods cancels in them.

* :func:`paired_bootstrap_ci`: a two-level percentile bootstrap of the mean difference. Each
  replicate draws ``S`` seeds with replacement, then, for each drawn seed, ``E`` of that seed's
  examples with replacement, and takes the mean of the per-seed means of the drawn differences.
  Resampling seeds carries the run-to-run variance (initialisation, client sampling, data order);
  resampling examples within a seed carries the evaluation-set variance. The interval is the
  ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the replicates. With one seed it is the
  percentile bootstrap over examples; with several it is a little conservative when the seeds
  differ little (the example noise is counted in the spread of the per-seed means too: 97% coverage
  of a nominal 95% interval on synthetic data, tests/test_stats.py).
* :func:`paired_t_test`: the two-sided paired t-test over seeds, on the per-seed mean differences
  ``d̄_s`` (``S − 1`` degrees of freedom). The Student t distribution comes from the regularized
  incomplete beta function (:func:`betainc`), ``P(|T| > t) = I_{ν/(ν + t²)}(ν/2, 1/2)``.
* :func:`wilson_ci` and :func:`newcombe_diff_ci`: intervals of a proportion (e.g. exact match,
  ``k`` of ``n`` questions right) and of the difference of two independent proportions (Wilson's score
  interval; Newcombe 1998, method 10). Two runs scored on the same questions pair up, so the
  unpaired difference interval is conservative when their scores correlate; it is for records that
  kept only the count.
* :func:`decision`: "not decided" when the interval holds 0, otherwise which method is lower.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

NOT_DECIDED = "not decided"
#: Bootstrap replicates drawn at once (it fixes the draw order, so it is not an argument).
BOOT_CHUNK = 1000


class Interval(NamedTuple):
    """A mean difference and its confidence interval.

    Attributes:
      mean: the observed mean difference (mean over seeds of the per-seed mean over examples).
      low, high: the interval's bounds.
      level: its confidence level (e.g. 0.95).
    """

    mean: float
    low: float
    high: float
    level: float


class TTest(NamedTuple):
    """A paired t-test over seeds.

    Attributes:
      mean: mean over seeds of the per-seed mean difference.
      t: the t statistic ``mean / (sd / √S)`` (``sd`` with ``S − 1`` in the denominator).
      df: degrees of freedom ``S − 1``.
      p: the two-sided p-value.
    """

    mean: float
    t: float
    df: int
    p: float


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got level={level!r}")
    return float(level)


def differences(loss_a, loss_b) -> np.ndarray:
    """The paired differences ``loss_a − loss_b`` as float64 ``[S, E]``.

    Args:
      loss_a, loss_b: per-example losses of the two methods, ``[S, E]`` (seeds × examples) or
        ``[E]`` (one seed); the same shape, every value finite.

    Raises:
      ValueError: naming the mismatching shapes, an empty axis, or the first non-finite value.
    """
    a, b = np.asarray(loss_a, np.float64), np.asarray(loss_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired losses must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"paired losses must be [seeds, examples] or [examples] and non-empty, got shape {a.shape}")
    for name, x in (("loss_a", a), ("loss_b", b)):
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            s, e = bad[0]
            raise ValueError(f"{name} holds a non-finite value {float(x[s, e])!r} at seed {s}, example {e}")
    return a - b


def paired_bootstrap_ci(loss_a, loss_b, *, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> Interval:
    """Two-level paired percentile bootstrap of ``mean(loss_a − loss_b)`` (module docstring).

    Args:
      loss_a, loss_b: ``[S, E]`` or ``[E]`` per-example losses on the same examples and seeds.
      level: confidence level in ``(0, 1)``.
      n_boot: number of bootstrap replicates (≥ 100).
      seed: seed of the resampling (the result is a function of the inputs and ``seed``; the
        replicates are drawn ``BOOT_CHUNK`` at a time, memory ``BOOT_CHUNK · S · E`` float64).

    Returns:
      ``Interval(mean, low, high, level)``.

    Raises:
      ValueError: bad shapes or values (:func:`differences`), ``level`` or ``n_boot``.
    """
    level = _check_level(level)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer >= 100, got n_boot={n_boot!r}")
    d = differences(loss_a, loss_b)  # [S, E]
    S, E = d.shape
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, BOOT_CHUNK):
        k = min(BOOT_CHUNK, n_boot - start)
        seeds = rng.integers(0, S, size=(k, S))  # [k, S] the drawn seeds
        examples = rng.integers(0, E, size=(k, S, E))  # [k, S, E] examples drawn within each
        reps.append(d[seeds[:, :, None], examples].mean(axis=(1, 2)))  # equal E: mean of per-seed means
    reps = np.concatenate(reps)
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(d.mean()), float(low), float(high), level)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 ≤ x ≤ 1``.

    Its continued fraction (modified Lentz), on ``I_x(a, b)`` when ``x < (a + 1)/(a + b + 2)`` and
    on ``1 − I_{1−x}(b, a)`` otherwise, where it converges fast; relative accuracy about 1e-14.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a!r}, b={b!r}")
    if not 0 <= x <= 1:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x!r}")
    if x == 0 or x == 1:
        return float(x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1 - x) / b


def _beta_cf(a: float, b: float, x: float, *, tol: float = 1e-15, max_iter: int = 10000) -> float:
    """The continued fraction of ``I_x(a, b)`` (Numerical Recipes' ``betacf``), by modified Lentz."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < tol:
            return h
    raise ArithmeticError(f"betainc's continued fraction did not converge for a={a}, b={b}, x={x}")


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| ≥ |t|)`` for Student's t with ``df > 0`` degrees of freedom: ``I_{df/(df + t²)}(df/2, 1/2)``."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got df={df!r}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_critical(df: float, *, level: float = 0.95) -> float:
    """The two-sided critical value of Student's t: ``c`` with ``P(|T| ≥ c) = 1 − level`` (bisection on
    :func:`t_two_sided_p`, to about 1e-12)."""
    level = _check_level(level)
    if not df > 0:
        raise ValueError(f"df must be > 0, got df={df!r}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 1 - level:  # p falls as |t| grows
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1 - level else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def t_interval(x, *, level: float = 0.95) -> Interval:
    """The mean of ``x`` (``[n]``, ``n ≥ 2``, e.g. one difference per run) and its t interval,
    ``mean ± t_critical(n − 1) · sd / √n``."""
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"a t interval needs at least 2 finite values, got {x.tolist()!r}")
    level = _check_level(level)
    mean, half = float(x.mean()), t_critical(x.size - 1, level=level) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, level)


def paired_t_test(loss_a, loss_b) -> TTest:
    """Two-sided paired t-test over seeds on the per-seed mean differences ``d̄_s``.

    Args:
      loss_a, loss_b: ``[S, E]`` per-example losses (``S ≥ 2`` seeds), or ``[S]`` per-seed losses
        given as ``[S, 1]``.

    Returns:
      ``TTest(mean, t, df, p)``. All ``d̄_s`` equal: ``p = 0`` if they are non-zero (``t = ±inf``),
      ``p = 1`` if they are all zero (``t = 0``).

    Raises:
      ValueError: fewer than 2 seeds, or bad shapes or values (:func:`differences`).
    """
    d = differences(loss_a, loss_b).mean(axis=1)  # [S]
    S = d.shape[0]
    if S < 2:
        raise ValueError(f"a paired t-test over seeds needs at least 2 seeds, got {S}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(S))
    return TTest(mean, t, S - 1, t_two_sided_p(t, S - 1))


def _check_count(k, n) -> tuple[int, int]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got n={n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, n={n}], got k={k!r}")
    return int(k), int(n)


def wilson_ci(k: int, n: int, *, level: float = 0.95) -> Interval:
    """Wilson's score interval of a proportion ``k / n``.

    ``(p̂ + z²/2n ± z·√(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the ``(1 + level)/2`` normal
    quantile (Newcombe 1998, "Two-sided confidence intervals for the single proportion", method 3).

    Args:
      k: successes (e.g. questions answered exactly), ``0 ≤ k ≤ n``.
      n: trials.
      level: confidence level in ``(0, 1)``.

    Returns:
      ``Interval(k / n, low, high, level)``.

    Raises:
      ValueError: ``k`` or ``n`` not integers with ``0 ≤ k ≤ n``, ``n ≥ 1``; a bad ``level``.
    """
    level = _check_level(level)
    k, n = _check_count(k, n)
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n)), level)


def newcombe_diff_ci(k1: int, n1: int, k2: int, n2: int, *, level: float = 0.95) -> Interval:
    """The interval of ``k1/n1 − k2/n2`` for independent proportions from their Wilson intervals.

    ``[d − √((p̂₁ − l₁)² + (u₂ − p̂₂)²), d + √((u₁ − p̂₁)² + (p̂₂ − l₂)²)]`` (Newcombe 1998, "Interval
    estimation for the difference between independent proportions", method 10).

    Args:
      k1, n1, k2, n2: the two counts.
      level: confidence level in ``(0, 1)``.

    Returns:
      ``Interval(p̂₁ − p̂₂, low, high, level)``.

    Raises:
      ValueError: as :func:`wilson_ci`.
    """
    a, b = wilson_ci(k1, n1, level=level), wilson_ci(k2, n2, level=level)
    d = a.mean - b.mean
    return Interval(d, d - math.hypot(a.mean - a.low, b.high - b.mean),
                    d + math.hypot(a.high - a.mean, b.mean - b.low), a.level)


def decision(interval: Interval, names: tuple[str, str] = ("a", "b")) -> str:
    """What an interval of ``a − b`` decides: ``"not decided"`` when it holds 0, else ``"a < b"``
    (``a``'s loss is lower) or ``"a > b"``, with the methods' ``names``."""
    if interval.low <= 0 <= interval.high:
        return NOT_DECIDED
    return f"{names[0]} {'<' if interval.high < 0 else '>'} {names[1]}"
