"""How each modality's attribution agrees with the ideal observer's: what to read when a target fails.

The single-factor target (:mod:`.single_factor`) says *whether* the carrier comes first; these
rows say *which* modality's attributions are off and how, over every attributed stay that has
the modality (group ``observer_agreement``, one set per method and modality):

- ``agreement_<m>_bias``: mean of (head - observer), with a bootstrap CI. A head that gives a
  modality systematically more negative (or positive) credit than its content warrants.
- ``agreement_<m>_slope``: least-squares slope of the head's attribution on the observer's; 1 is
  calibrated, below 1 under-uses the modality's evidence.
- ``agreement_<m>_r``: Pearson correlation (how much of the observer's ranking is kept).
- ``agreement_<m>_resid_sd``: SD of (head - observer): the noise that decides near ties.
- ``agreement_<m>_age_slope``: slope of (head - observer) on age per 15 years, EHR only (read from
  the truth table): a head that ignores age leaves the observer's age effect here. The check
  that found the unstandardised age input (issue 12).

Shapley and IG are compared with the observer's Shapley values (log-odds); drop-one ablation with
the observer's drop-one ablation (risk).

Beneath the Shapley values are the coalition values they are made of: ``v(S)``, the head's
log-odds when it sees only the modalities in S. :func:`coalition_rows` compares them with the
observer's ``v*(S)`` (group ``coalition_agreement``), over every stay that has S and over the
single-factor stays: ``coalition_<stays>_<S>_bias`` (mean of head - observer, bootstrap CI) and
``coalition_<stays>_<S>_resid_sd``. A missing-modality path that is off shows here as one biased
coalition (for example ``ecg`` alone: the head's ECG-only answer), where the Shapley values
spread the error over every modality.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clinical_moe.attribution.stats import N_BOOT, bootstrap_mean_ci, summary_row

GROUP = "observer_agreement"
COALITION_GROUP = "coalition_agreement"


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope of y on x, Pearson r); NaN when x or y is constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    c = np.cov(x, y)
    return float(c[0, 1] / c[0, 0]), float(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]))


def agreement_rows(
    df: pd.DataFrame,
    methods: list[str],
    modalities: tuple[str, ...],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[dict]:
    """Rows of :data:`GROUP` for every method and modality present in ``df``.

    Args:
        df: One row per stay: ``has_<m>``, ``<method>_<m>``, ``observer_shapley_<m>``,
            ``observer_ablation_<m>`` and optionally ``age`` (years).
        methods: Attribution methods in ``df``.
        modalities: Modality order.
        n_boot: Bootstrap resamples of the bias CI.
        seed: Bootstrap seed.
    """
    rows = []
    for method in methods:
        kind = "ablation" if method == "ablation" else "shapley"
        for m in modalities:
            a = df[f"{method}_{m}"].to_numpy(float)
            o = df[f"observer_{kind}_{m}"].to_numpy(float)
            ok = df[f"has_{m}"].to_numpy(bool) & np.isfinite(a) & np.isfinite(o)
            n = int(ok.sum())
            if n < 3:
                continue
            d = a[ok] - o[ok]
            slope, r = _fit(o[ok], a[ok])
            unit = "log-odds" if kind == "shapley" else "risk"
            figures = [
                ("bias", bootstrap_mean_ci(d, n_boot, seed), f"head - observer, {unit}"),
                ("slope", (slope, np.nan, np.nan), "head on observer; 1 = calibrated"),
                ("r", (r, np.nan, np.nan), "Pearson, head vs observer"),
                ("resid_sd", (float(d.std()), np.nan, np.nan), f"SD of head - observer, {unit}"),
            ]
            if m == "ehr" and "age" in df:
                age = df["age"].to_numpy(float)[ok]
                fine = np.isfinite(age)
                age_slope, _ = _fit((age[fine] - 65.0) / 15.0, d[fine])
                figures.append(
                    ("age_slope", (age_slope, np.nan, np.nan), "head - observer per 15 years")
                )
            for name, stats, note in figures:
                metric = f"agreement_{m}_{name}"
                rows.append(summary_row(method, GROUP, metric, stats, n, np.nan, 0.0, note))
    return rows


def coalition_rows(
    df: pd.DataFrame,
    single_factor: np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[dict]:
    """Rows of :data:`COALITION_GROUP`: the head's ``v(S)`` against the observer's, per coalition.

    Args:
        df: One row per stay with ``coalition_<S>`` (the head's, from ``per_stay``) and
            ``observer_coalition_<S>`` columns (NaN where the stay lacks part of S).
        single_factor: ``bool[len(df)]``, the single-factor stays.
        n_boot: Bootstrap resamples of the bias CI.
        seed: Bootstrap seed.
    """
    rows = []
    names = [c.removeprefix("observer_coalition_") for c in df if c.startswith("observer_coal")]
    for name in names:
        if f"coalition_{name}" not in df:
            continue
        d = (df[f"coalition_{name}"] - df[f"observer_coalition_{name}"]).to_numpy(float)
        for stays, sel in (("all", np.ones(len(df), bool)), ("single_factor", single_factor)):
            d_sel = d[sel & np.isfinite(d)]
            n = len(d_sel)
            if n < 3:
                continue
            for figure, stats in (
                ("bias", bootstrap_mean_ci(d_sel, n_boot, seed)),
                ("resid_sd", (float(d_sel.std()), np.nan, np.nan)),
            ):
                metric = f"coalition_{stays}_{name}_{figure}"
                note = "head - observer, log-odds" if figure == "bias" else "SD, log-odds"
                rows.append(
                    summary_row("shapley", COALITION_GROUP, metric, stats, n, np.nan, 0.0, note)
                )
    return rows
