"""Percentile bootstrap confidence intervals for the faithfulness figures.

Every interval here is a seeded percentile bootstrap (Efron & Tibshirani 1993, ch. 13): the stays
of a group are resampled with replacement ``n_boot`` times, the statistic is recomputed on each
resample, and the interval is the ``alpha / 2`` and ``1 - alpha / 2`` percentiles of the
replicates. Means are computed for all resamples at once from multinomial resample counts, so
2,000 resamples of a few thousand stays take milliseconds. The same seed and the same values give
the same interval.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
ALPHA = 0.05


def _replicate_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot]`` means of ``x`` over resamples with replacement."""
    n = len(x)
    chunk = max(1, 2_000_000 // n)  # bound the (chunk, n) count matrices
    out = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size)  # (size, n)
        out.append(counts @ x / n)
    return np.concatenate(out)


def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def bootstrap_mean_ci(
    values, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile bootstrap CI (NaNs dropped).

    For 0/1 values (e.g. "the carrying modality ranked first") this is a rate and its interval.

    Args:
        values: Per-stay values (any shape, flattened).
        n_boot: Resamples (0 gives a NaN interval).
        seed: Seed of the resamples.
        alpha: 1 - confidence level.

    Returns:
        ``(mean, ci_low, ci_high)``; all NaN when there is no finite value.
    """
    x = _clean(values)
    if not len(x):
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n_boot <= 0:
        return mean, math.nan, math.nan
    reps = _replicate_means(x, n_boot, np.random.default_rng(seed))
    lo, hi = np.percentile(reps, [50 * alpha, 100 - 50 * alpha])
    return mean, float(lo), float(hi)


def bootstrap_diff_ci(
    a, b, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` of two independent groups with a percentile bootstrap CI.

    Each group is resampled on its own (a two-sample bootstrap), so the interval reflects the
    size of both groups.

    Args:
        a: Values of the first group (e.g. synergy weights of synergy-driven stays).
        b: Values of the second group (e.g. the other stays).
        n_boot: Resamples (0 gives a NaN interval).
        seed: Seed of the resamples.
        alpha: 1 - confidence level.

    Returns:
        ``(difference, ci_low, ci_high)``; all NaN when either group has no finite value.
    """
    xa, xb = _clean(a), _clean(b)
    if not len(xa) or not len(xb):
        return math.nan, math.nan, math.nan
    diff = float(xa.mean() - xb.mean())
    if n_boot <= 0:
        return diff, math.nan, math.nan
    rng = np.random.default_rng(seed)
    reps = _replicate_means(xa, n_boot, rng) - _replicate_means(xb, n_boot, rng)  # (n_boot,)
    lo, hi = np.percentile(reps, [50 * alpha, 100 - 50 * alpha])
    return diff, float(lo), float(hi)


def bootstrap_stratified_diff_ci(
    a, b, strata_a, strata_b, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` within strata, averaged with weights ``n_a`` per stratum, with a CI.

    The difference is computed inside each stratum that both groups occupy (e.g. a missingness
    pattern, so that a head whose weights depend on the pattern is not credited or blamed for
    the groups' different patterns) and averaged with the first group's counts; each group of
    each stratum is resampled on its own.

    Args:
        a: Values of the first group.
        b: Values of the second group.
        strata_a: Stratum label of each value of ``a``.
        strata_b: Stratum label of each value of ``b``.
        n_boot: Resamples (0 gives a NaN interval).
        seed: Seed of the resamples.
        alpha: 1 - confidence level.

    Returns:
        ``(difference, ci_low, ci_high)``; all NaN when no stratum holds both groups.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    sa, sb = np.asarray(strata_a), np.asarray(strata_b)
    rng = np.random.default_rng(seed)
    diff, reps, total = 0.0, np.zeros(max(n_boot, 0)), 0
    for s in np.unique(sa):
        xa, xb = _clean(a[sa == s]), _clean(b[sb == s])
        if not len(xa) or not len(xb):
            continue
        w = len(xa)
        diff += w * (xa.mean() - xb.mean())
        if n_boot > 0:
            reps += w * (_replicate_means(xa, n_boot, rng) - _replicate_means(xb, n_boot, rng))
        total += w
    if not total:
        return math.nan, math.nan, math.nan
    if n_boot <= 0:
        return diff / total, math.nan, math.nan
    lo, hi = np.percentile(reps / total, [50 * alpha, 100 - 50 * alpha])
    return float(diff / total), float(lo), float(hi)


#: Columns of the faithfulness summary table (one row per method, group and metric).
SUMMARY_COLUMNS = [
    "method",
    "group",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n_stays",
    "chance",
    "oracle",
    "note",
]


def summary_row(method, group, metric, stats, n, chance=np.nan, oracle=np.nan, note="") -> dict:
    """One :data:`SUMMARY_COLUMNS` row; ``stats`` is ``(value, ci_low, ci_high)``."""
    value, lo, hi = stats
    return dict(
        zip(SUMMARY_COLUMNS, (method, group, metric, value, lo, hi, n, chance, oracle, note))
    )
