"""What a handful of seeds and a 500-item test split can resolve: t-intervals, McNemar, bootstrap.

* :func:`t_quantile` and :func:`t_interval`: the 95% confidence interval of a mean difference
  over ``n`` paired seeds, ``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (Student t, ``n - 1``
  degrees of freedom). The t quantile is computed here (the regularized incomplete beta function
  by its continued fraction, inverted by bisection): 4.303 for 2 degrees of freedom, 2.776 for 4.
* :func:`mcnemar_exact`: two runs scored on the same test items; ``b`` items only the first got
  right, ``c`` only the second. The exact two-sided p-value is that of ``min(b, c)`` or fewer
  heads in ``b + c`` fair coin flips, doubled (capped at 1).
* :func:`paired_bootstrap`: the percentile interval of a mean over test items, the items
  resampled with replacement from a fixed seed (the same interval on every machine).

The seeds' interval covers training noise (data order, initial draws); the item-level tests cover
the test set's sampling error given those runs. A difference is *resolved* when its interval
excludes zero. Seeds whose differences are all equal (:func:`no_spread`) get no interval and no
p-value: their spread is no estimate of the noise, so they resolve nothing.
"""

from __future__ import annotations

import math
import statistics

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
SPREAD_TOLERANCE = 1e-9


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``).

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` not positive.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t quantile: degrees of freedom must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def no_spread(values: list[float]) -> bool:
    """Whether two or more values are equal up to rounding (accuracy differences such as
    0.658 - 0.648 and 0.668 - 0.658 differ only in the last bits). Their sample standard
    deviation is then no estimate of the noise: a t-interval of (near) zero width and a p-value
    of ~1e-14 would be artefacts of two lucky seeds, not evidence."""
    if len(values) < 2:
        return False
    return statistics.stdev(values) <= SPREAD_TOLERANCE * max(1.0, max(abs(v) for v in values))


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of ``values`` (Student t, ``n - 1`` degrees
    of freedom); ``None`` with fewer than two values, or when they have no spread
    (:func:`no_spread`): the data then say nothing about the noise, so no interval."""
    if len(values) < 2 or no_spread(values):
        return None
    mean = statistics.fmean(values)
    half = t_quantile(0.5 + level / 2.0, len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean - half, mean + half


def t_test_p(values: list[float]) -> float | None:
    """Two-sided one-sample t-test p-value of ``mean(values) == 0`` (``n - 1`` degrees of
    freedom); ``None`` with fewer than two values or no spread (:func:`no_spread`)."""
    if len(values) < 2 or no_spread(values):
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    t = abs(mean) / (sd / math.sqrt(len(values)))
    return min(1.0, 2.0 * (1.0 - t_cdf(t, len(values) - 1)))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: ``b`` items right only in the first run, ``c`` only in
    the second (1.0 when they never disagree)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(
    diffs: list[float],
    level: float = LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile interval of the mean of per-item ``diffs`` (items resampled with replacement,
    ``resamples`` times, from ``seed``); ``None`` without items."""
    if not diffs:
        return None
    import numpy as np

    values = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # bounded memory: 500 resamples at a time
        stop = min(start + 500, resamples)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)
