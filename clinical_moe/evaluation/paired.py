"""Paired AUROC differences between the compared runs, with bootstrap CIs.

Every run of an evaluation is scored on the same stays under the same mask at each point, and the
bootstrap resamples of a point depend on its stays only (:func:`~clinical_moe.evaluation.grid.
_point_seed`), so the resamples are shared by the runs. Here each resample scores both runs, and
the percentile interval of the per-resample difference is the paired 95% CI: narrower than what
two separate intervals suggest, because the stays that are hard for one run are usually hard for
the other. A CI that excludes 0 says the two runs differ on these stays (no multiplicity
correction across points).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from clinical_moe.metrics import _weighted, auroc, bootstrap_weights

PAIRED_COLUMNS = [
    "point",
    "run_a",
    "run_b",
    "auroc_a",
    "auroc_b",
    "diff",
    "ci_low",
    "ci_high",
    "n",
    "n_pos",
]


def paired_auroc_rows(
    point: str,
    y: np.ndarray,
    probs: dict[str, np.ndarray],
    task: str,
    n_boot: int,
    seed,
    alpha: float = 0.05,
) -> list[dict]:
    """AUROC(a) - AUROC(b) for every pair of runs at one point, with a paired bootstrap CI.

    Args:
        point: Label of the point (e.g. ``"mcar@0.50"``).
        y: Labels of the scored stays.
        probs: Run name -> probabilities on the same stays, in the order of the comparison.
        task: binary | multilabel | multiclass (macro AUROC for the latter two).
        n_boot: Resamples (0 gives NaN intervals).
        seed: Seed of the resamples: the point's seed, so they are the ones of the per-run CIs.
        alpha: 1 - confidence level.

    Returns:
        One row per pair (a listed before b) with the columns of :data:`PAIRED_COLUMNS`.
    """
    y = np.asarray(y)
    n = len(y)
    n_pos = int(np.sum(y)) if task != "multiclass" else None
    W = bootstrap_weights(y, n_boot, seed, task) if n_boot > 0 and n else None
    point_est, reps = {}, {}
    for name, p in probs.items():
        point_est[name] = auroc(y, p, task) if n else math.nan
        if W is not None:
            reps[name] = _weighted(task, "auroc", W, y, np.asarray(p, dtype=np.float64), None)
    rows = []
    for a, b in itertools.combinations(probs, 2):
        lo = hi = math.nan
        if W is not None:
            d = reps[a] - reps[b]
            if np.isfinite(d).any():
                lo, hi = (float(v) for v in np.nanpercentile(d, [50 * alpha, 100 - 50 * alpha]))
        rows.append(
            {
                "point": point,
                "run_a": a,
                "run_b": b,
                "auroc_a": float(point_est[a]),
                "auroc_b": float(point_est[b]),
                "diff": float(point_est[a] - point_est[b]),
                "ci_low": lo,
                "ci_high": hi,
                "n": n,
                "n_pos": n_pos,
            }
        )
    return rows
