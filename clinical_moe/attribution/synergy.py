"""I2MoE's synergy weight on synergy-driven stays against the other stays (issue 12).

Synergy-driven stays are those where the outcome's ``pulmonary x infection`` term fires
(``pulmonary = infection = 1``) and the stay has the CXR and the EHR that reveal the two
factors. The ideal observer (:mod:`.observer`) confirms the definition: its Shapley interaction
index of CXR and EHR is large and positive on these stays and negative on the others (observing
one factor without the other *removes* the expected interaction), and
``observer_interaction_difference`` reports it. The comparison set is every other stay with CXR
and EHR, so the contrast is not "has CXR" against "has not".

Rows (method ``i2moe``):

- ``synergy_weight_pulm_x_inf`` / ``synergy_weight_other``: mean weights with CIs;
- ``synergy_weight_difference``: the difference, two-sample bootstrap CI (the issue's target);
- ``synergy_weight_difference_within_pattern``: the same inside each missingness pattern,
  averaged with the synergy stays' counts (the head's weights depend strongly on the pattern);
- ``synergy_weight_spearman_observer_interaction``: rank correlation over all CXR + EHR stays
  between the weight and the observer's CXR x EHR interaction (a weight that tracks synergy
  correlates positively);
- ``observer_interaction_difference``: the check of the group definition (log-odds).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from clinical_moe.attribution.stats import (
    N_BOOT,
    bootstrap_diff_ci,
    bootstrap_mean_ci,
    bootstrap_stratified_diff_ci,
    summary_row,
)


def _row(group, metric, stats, n, chance=np.nan, note="") -> dict:
    return summary_row("i2moe", group, metric, stats, n, chance, np.nan, note)


def synergy_rows(
    stays: pd.DataFrame,
    interactions: pd.DataFrame | None,
    df: pd.DataFrame,
    modalities: tuple[str, ...],
    min_n: int = 50,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[dict]:
    """I2MoE synergy weight of synergy-driven stays against the other stays with CXR and EHR.

    Args:
        stays: Truth table (``stay_id``, ``pulmonary``, ``infection``).
        interactions: Per-stay weights (``stay_id``, ``synergy``, optional ``pattern``); None or
            no ``synergy`` column gives no rows.
        df: ``stay_id``, ``has_cxr``, ``has_ehr`` of the attributed stays, and optionally
            ``observer_interaction_cxr_ehr`` (:mod:`.observer`).
        modalities: Modality order (needs ``cxr`` and ``ehr``).
        min_n: Groups below this size get a warning.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        Rows of the ``faithfulness`` table (see the module docstring).
    """
    if interactions is None or "synergy" not in getattr(interactions, "columns", ()):
        return []
    if not {"cxr", "ehr"} <= set(modalities):
        return []
    keep = [c for c in ("stay_id", "synergy", "pattern") if c in interactions]
    x = interactions[keep].drop_duplicates("stay_id")
    x = x.merge(stays[["stay_id", "pulmonary", "infection"]], on="stay_id")
    cols = ["stay_id", "has_cxr", "has_ehr"]
    cols += [c for c in ("observer_interaction_cxr_ehr",) if c in df]
    x = x.merge(df[cols], on="stay_id")
    pair = x["has_cxr"].astype(bool) & x["has_ehr"].astype(bool)
    both = (x["pulmonary"] == 1) & (x["infection"] == 1) & pair
    other = pair & ~both
    a, b = x.loc[both, "synergy"].to_numpy(float), x.loc[other, "synergy"].to_numpy(float)
    small = f"small n (< {min_n}): read the CI"
    note_a = small if len(a) < min_n else "pulmonary = infection = 1, has CXR and EHR"
    note_b = small if len(b) < min_n else "not both factors, has CXR and EHR"
    diff_note = f"TARGET (issue 12): CI above 0; synergy-driven minus other ({len(a)} vs {len(b)})"
    if min(len(a), len(b)) < min_n:
        diff_note = f"{small}; {diff_note}"
    rows = [
        _row(
            "synergy",
            "synergy_weight_pulm_x_inf",
            bootstrap_mean_ci(a, n_boot, seed),
            len(a),
            note=note_a,
        ),
        _row(
            "other", "synergy_weight_other", bootstrap_mean_ci(b, n_boot, seed), len(b), note=note_b
        ),
        _row(
            "synergy",
            "synergy_weight_difference",
            bootstrap_diff_ci(a, b, n_boot, seed),
            len(a),
            0.0,
            diff_note,
        ),
    ]
    if "pattern" in x:
        pa, pb = x.loc[both, "pattern"].to_numpy(), x.loc[other, "pattern"].to_numpy()
        stats = bootstrap_stratified_diff_ci(a, b, pa, pb, n_boot, seed)
        note = "inside each missingness pattern, weighted by the synergy stays' counts"
        rows.append(
            _row("synergy", "synergy_weight_difference_within_pattern", stats, len(a), 0.0, note)
        )
    if "observer_interaction_cxr_ehr" in x:
        inter = x["observer_interaction_cxr_ehr"].to_numpy(float)
        w = x["synergy"].to_numpy(float)
        ok = pair.to_numpy() & np.isfinite(inter) & np.isfinite(w)
        rho = spearmanr(w[ok], inter[ok]).statistic if ok.sum() >= 3 else np.nan
        rows.append(
            _row(
                "pair",
                "synergy_weight_spearman_observer_interaction",
                (float(rho), np.nan, np.nan),
                int(ok.sum()),
                0.0,
                "all stays with CXR and EHR; > 0 if the weight tracks the true synergy",
            )
        )
        ia, ib = inter[both.to_numpy()], inter[other.to_numpy()]
        rows.append(
            _row(
                "synergy",
                "observer_interaction_difference",
                bootstrap_diff_ci(ia, ib, n_boot, seed),
                len(ia),
                0.0,
                "check of the group: ideal observer's CXR x EHR interaction (log-odds), "
                "synergy-driven minus other",
            )
        )
    return rows
