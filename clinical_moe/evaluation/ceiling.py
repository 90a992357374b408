"""The ceiling of every evaluation point: what an observer of the shown modalities can reach.

On a synthetic corpus, each point's mask changes what is revealed, so the ceiling (the posterior
risk of :mod:`clinical_moe.data.synthetic.ceiling`) is recomputed per point and scored on the
point's stays, beside the oracle (the true risk). Real data has no truth and no ceiling.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from clinical_moe.config import EvalConfig
from clinical_moe.evaluation.context import EvalContext, load_ceiling_evidence, load_truth


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(score)
    y, score = np.asarray(y)[ok], score[ok]
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


def ceiling_table(specs, masks, index, ctx: EvalContext, cfg: EvalConfig, test, seed) -> tuple:
    """The ceiling and oracle AUROC of every point on its scored stays (synthetic corpora only).

    Why: an AUROC means little without what an observer of the same shown modalities could
    reach; the ceiling is recomputed for each point's mask (it changes what is revealed).

    Returns:
        (``DataFrame[point, ceiling_auroc, oracle_auroc, n, ceiling_note]``, point -> refs dict,
        note). Empty on real data or a non-binary task.
    """
    ev, note = load_ceiling_evidence(test, ctx.ids)
    y_all = ctx.labels
    if ev is None or np.ndim(y_all) != 1 or len(np.unique(y_all)) > 2:
        return pd.DataFrame(), {}, note
    from clinical_moe.data.synthetic.observer import ceiling_risk

    sim = ctx.simulator_context(cfg.mar_covariate, cfg.strength)
    truth, _ = load_truth(test)
    true_risk = (
        pd.Series(ctx.ids).map(dict(zip(truth["stay_id"], truth["true_risk"]))).to_numpy(float)
        if truth is not None
        else np.full(len(ctx.ids), np.nan)
    )
    rows_out, refs, done = [], {}, {}
    for spec in specs:
        mask = masks[index[spec.label]]
        key = (index[spec.label], spec.mechanism, spec.rate, spec.pattern)
        if key not in done:
            done[key] = ceiling_risk(
                ev, mask, spec.mechanism, modalities=ctx.modalities, present=ctx.present,
                rate=spec.rate, pattern=spec.pattern, covariate=sim["covariate"],
                labels=y_all, strength=cfg.strength,
            )  # fmt: skip
        risk, exact = done[key]
        rows = mask.any(1)
        c = _auroc(y_all[rows], risk[rows])
        o = _auroc(y_all[rows], true_risk[rows])
        refs[spec.label] = {"ceiling_auroc": c, "oracle_auroc": o}
        rows_out.append(
            {"point": spec.label, "ceiling_auroc": c, "oracle_auroc": o,
             "ceiling_over_oracle": c / o if o else math.nan, "n": int(rows.sum()),
             "ceiling_note": exact}
        )  # fmt: skip
    return pd.DataFrame(rows_out), refs, note
