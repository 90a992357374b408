"""Faithfulness of modality attributions against the synthetic corpus's generative truth.

**The issue-12 target** is computed against the *ideal observer* (:mod:`.observer`: the same
modality game played by the Bayes-optimal model, exact from the generative story) on
single-factor stays (:mod:`.single_factor`, :mod:`.groups`): ``single_factor_carrier_top1_abs``
of the Shapley values, >= 0.90, oracle 1; and I2MoE's synergy weight (:mod:`.synergy`). The
figures below, against a linear split of the outcome logit, are kept as *secondary* ones (their
notes say so): the linear split ignores that the baseline is the log-odds of the mean risk, and
its groups do not isolate single-factor stays.

The synthetic corpus (SYNTHETIC.md, :mod:`clinical_moe.data.synthetic.latents`) draws four latent
factors per admission and makes in-hospital death a logistic function of them::

    logit = b0 + b_sev*severity + b_card*cardiac + b_pulm*pulmonary + b_inf*infection
          + b_pxi*pulmonary*infection + b_age*(age - 65)/15

and ``truth/effects.json`` says which modality carries which factor ("strong" or "weak"). A
faithful attribution of the mortality log-odds should follow these effects. Definitions:

- **True per-modality effect** of stay s: each term above, centred on its mean over the corpus's
  stays (attributions are relative to the prevalence baseline ``v(empty)``, so a stay without a
  factor gets a negative effect), is split among the modalities the stay *has* that carry it, in
  proportion to carrier weights (strong = 1, weak = 0.25, otherwise 0.5). The interaction term goes
  half to the carriers of ``pulmonary`` and half to those of ``infection``; the age term goes to
  the EHR (age is one of its static features). A term none of whose carriers is present is
  invisible to the model and is dropped.
- **Groups** (:mod:`.groups`): ``cardiac_only`` (ECG expected on top), ``pulmonary_only`` (CXR)
  and ``synergy`` (pulmonary x infection: CXR and EHR together), with at least ``min_n`` (50)
  stays where the split allows; ``faithfulness_groups`` states each definition as used.
- **Ranking figures** per method and group, each a mean over the group's stays with a seeded
  percentile bootstrap CI (:mod:`.stats`):

  - ``<group>_<carriers>_top<c>_signed``: share of stays whose carrier(s) have the largest
    signed attribution(s) among the present modalities (a modality can "win" this because the
    others are negative);
  - ``<group>_<carriers>_top<c>_abs``: the same ranking by |attribution|;
  - ``<group>_<carriers>_share``: mean share of the carrier(s) in the total |attribution| of the
    present modalities;
  - ``<group>_agree_true_top1_abs``: share of stays whose top modality by |attribution| is the
    true effects' top modality by |.| (oracle 1 by construction: the figure a faithful method can
    reach on every group).

  ``chance`` is what a random ranking (or an even split of |attribution|) gives and ``oracle``
  what the true effects themselves give under the same figure: below 1 where the truth puts
  another modality first (e.g. ECG's negative effect of ``cardiac = 0`` on a pulmonary-only stay
  outweighs CXR's in |.|, or severity outweighs a small factor).
- **Spearman**: rank correlation between true effects and attributions over all (stay, present
  modality) pairs (``spearman_pooled``) and the mean over stays with >= 3 present modalities of the
  per-stay correlation (``spearman_per_stay``, with a CI).
- I2MoE: the mean synergy weight of synergy-driven stays against the other stays that have CXR
  and EHR, and the difference with a two-sample bootstrap CI; it should be above 0
  (:mod:`.synergy`).
- A group with fewer than ``min_n`` stays carries a "small n" warning in ``note``.
- ``observer_agreement`` (:mod:`.agreement`): per method and modality, the bias, slope,
  correlation and residual SD of the attributions against the observer's, and for EHR their
  slope in age: which modality is off when the target fails.
- ``coalition_agreement`` (:mod:`.agreement`): per coalition of modalities, the bias and SD of
  the head's log-odds when it sees only that coalition against the observer's, over all stays
  and over the single-factor stays: which missing-modality path is off.

Real MIMIC has no truth: every figure is then reported as "not available".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from clinical_moe.attribution.agreement import agreement_rows, coalition_rows
from clinical_moe.attribution.groups import GROUP_COLUMNS, GROUP_SPECS, MIN_N, assign_groups
from clinical_moe.attribution.observer import observer_attributions
from clinical_moe.attribution.ranking import carrier_share, carriers_on_top, chance_top
from clinical_moe.attribution.single_factor import single_factor_rows
from clinical_moe.attribution.stats import N_BOOT, SUMMARY_COLUMNS, bootstrap_mean_ci
from clinical_moe.attribution.stats import summary_row as _row
from clinical_moe.attribution.synergy import synergy_rows

__all__ = ["faithfulness", "find_truth", "load_truth", "synergy_rows", "true_effects"]

FACTORS = ("severity", "cardiac", "pulmonary", "infection")
WEIGHTS = {"strong": 1.0, "weak": 0.25}
METHODS = ("shapley", "ig", "ablation")


def find_truth(cache_summary: dict) -> tuple[Path | None, str]:
    """The ``truth/`` folder of the corpus a cache was built from, or None and the reason."""
    root = cache_summary.get("data_root")
    if not root:
        return None, "the cache does not record its data root"
    truth = Path(root) / "truth"
    if not (truth / "stays.csv.gz").is_file() or not (truth / "effects.json").is_file():
        return None, f"no generative truth at {truth} (real data has none)"
    labels = [c.lower() for c in cache_summary.get("label_columns", [])]
    if cache_summary.get("task") not in (None, "ihm48") or labels not in ([], ["mortality"]):
        return None, "the truth describes in-hospital mortality; this run predicts another task"
    return truth, ""


def load_truth(truth_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """``truth/stays.csv.gz`` (latent factors per stay) and ``truth/effects.json``."""
    truth_dir = Path(truth_dir)
    stays = pd.read_csv(
        truth_dir / "stays.csv.gz", usecols=["stay_id", "age", *FACTORS, "true_risk"]
    )
    return stays, json.loads((truth_dir / "effects.json").read_text())


def carriers(effects: dict, modalities: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``factor -> {modality: weight}`` from ``effects.json`` (+ age -> EHR)."""
    out: dict[str, dict[str, float]] = {f: {} for f in (*FACTORS, "age")}
    for m, facts in effects.get("modality_effects", {}).items():
        if m not in modalities:
            continue
        for factor, text in facts.items():
            if factor in out:
                word = str(text).split()[0].lower() if text else ""
                out[factor][m] = WEIGHTS.get(word, 0.5)
    if "ehr" in modalities:
        out["age"]["ehr"] = 1.0
    return out


def true_effects(
    stays: pd.DataFrame, effects: dict, present: pd.DataFrame, modalities: tuple[str, ...]
) -> pd.DataFrame:
    """Per-stay true effect per modality (see the module docstring).

    Args:
        stays: The truth table (all stays of the corpus; used for centring too).
        effects: ``effects.json``.
        present: ``stay_id`` + ``has_<m>`` columns of the attributed stays.
        modalities: Modality order.

    Returns:
        ``stay_id`` + ``true_<m>`` columns (0 for absent modalities) for the stays in ``present``.
    """
    coef = effects["outcome"]["coefficients"]
    x = stays.set_index("stay_id")
    terms = {f: x[f].astype(float) for f in FACTORS}
    terms["age"] = (x["age"].astype(float) - 65.0) / 15.0
    inter = x["pulmonary"].astype(float) * x["infection"].astype(float)
    contrib = {f: coef.get(f, 0.0) * (v - v.mean()) for f, v in terms.items() if f != "age"}
    contrib["age"] = coef.get("age_per_15y_over_65", 0.0) * (terms["age"] - terms["age"].mean())
    c_int = coef.get("pulmonary_x_infection", 0.0) * (inter - inter.mean())
    carry = carriers(effects, modalities)
    parts = [(f, contrib[f], 1.0) for f in contrib]
    parts += [("pulmonary", c_int, 0.5), ("infection", c_int, 0.5)]
    p = present.set_index("stay_id")
    has = p[[f"has_{m}" for m in modalities]].to_numpy(bool)  # (N, M)
    out = np.zeros(has.shape)
    for factor, values, share in parts:
        w = np.array([carry[factor].get(m, 0.0) for m in modalities])[None, :] * has  # (N, M)
        total = w.sum(1, keepdims=True)
        v = values.reindex(p.index).to_numpy(float)[:, None] * share  # (N, 1)
        out += np.divide(w * v, total, out=np.zeros_like(w), where=total > 0)
    return pd.DataFrame(
        {"stay_id": p.index, **{f"true_{m}": out[:, i] for i, m in enumerate(modalities)}}
    )


def group_rows(
    method: str,
    attr: np.ndarray,
    true: np.ndarray,
    has: np.ndarray,
    groups: np.ndarray,
    modalities: tuple[str, ...],
    min_n: int = MIN_N,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[dict]:
    """Ranking figures of one attribution method on every group (see the module docstring).

    Args:
        method: Method name (a column prefix of the per-stay table).
        attr: ``(N, M)`` attributions.
        true: ``(N, M)`` true effects.
        has: ``(N, M)`` presence.
        groups: ``(N,)`` group names (:func:`~clinical_moe.attribution.groups.assign_groups`).
        modalities: Modality order.
        min_n: Groups below this size get a warning in ``note``.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        Rows of the ``faithfulness`` table.
    """
    rows = []
    for spec in GROUP_SPECS:
        if not set(spec.carriers) <= set(modalities):
            continue
        idx = [modalities.index(m) for m in spec.carriers]
        c = len(idx)
        sel = groups == spec.name
        if c > 1:  # with only the carriers present the pair is on top by construction
            sel &= has.sum(1) > c
        k = has[sel].sum(1)
        name = f"{spec.name}_{'_'.join(spec.carriers)}"
        n = int(sel.sum())
        note = f"small n (< {min_n}): read the CI" if n < min_n else ""
        a, t, h = attr[sel], true[sel], has[sel]
        p_top = float(chance_top(k, c).mean()) if n else np.nan
        for label, va, vt, chance in (
            ("signed", a, t, p_top),
            ("abs", np.abs(a), np.abs(t), p_top),
        ):
            hit = carriers_on_top(va, h, idx)
            oracle = float(carriers_on_top(vt, h, idx).mean()) if n else np.nan
            stats = bootstrap_mean_ci(hit, n_boot, seed)
            rows.append(
                _row(method, spec.name, f"{name}_top{c}_{label}", stats, n, chance, oracle, note)
            )
        # Agreement with the truth's own ranking: reachable (1.0) by a perfectly faithful method
        # even where the truth puts another modality first (e.g. ECG's "no cardiac disease").
        top_a = np.where(h, np.abs(a), -np.inf).argmax(1)  # (n,)
        top_t = np.where(h, np.abs(t), -np.inf).argmax(1)  # (n,)
        stats = bootstrap_mean_ci((top_a == top_t).astype(float), n_boot, seed)
        chance = float((1.0 / np.maximum(k, 1)).mean()) if n else np.nan
        rows.append(
            _row(method, spec.name, f"{spec.name}_agree_true_top1_abs", stats, n, chance, 1.0, note)
        )
        share = carrier_share(a, h, idx)
        oracle = float(np.nanmean(carrier_share(t, h, idx))) if n else np.nan
        chance = float((c / k).mean()) if n else np.nan
        stats = bootstrap_mean_ci(share, n_boot, seed)
        rows.append(_row(method, spec.name, f"{name}_share", stats, n, chance, oracle, note))
    return rows


def faithfulness(
    per_stay: pd.DataFrame,
    truth_dir: str | Path | None,
    modalities: tuple[str, ...],
    interactions: pd.DataFrame | None = None,
    reason: str = "",
    severity_max: float | None = None,
    min_n: int = MIN_N,
    n_boot: int = N_BOOT,
    seed: int = 0,
    dropout: float = 0.0,
) -> dict[str, pd.DataFrame]:
    """Faithfulness figures of every attribution method in ``per_stay``.

    Args:
        per_stay: ``stay_id``, ``has_<m>`` and ``<method>_<m>`` columns.
        truth_dir: The corpus's ``truth/`` folder, or None (no truth).
        modalities: Modality order.
        interactions: I2MoE per-stay weights (``stay_id``, ``synergy``), if any.
        reason: Why there is no truth (shown when ``truth_dir`` is None).
        severity_max: A fixed ``|severity|`` bound of the single-factor groups; None widens it
            from 0.5 SD until each group has ``min_n`` stays (:mod:`.groups`).
        min_n: Target group size; smaller groups are flagged.
        n_boot: Bootstrap resamples of every CI.
        seed: Bootstrap seed.
        dropout: The attributed model's ``train.modality_dropout``: the ideal observer plays
            the game under the mechanism the head was trained on (:mod:`.observer`).

    Returns:
        ``faithfulness`` (:data:`SUMMARY_COLUMNS`), ``faithfulness_groups`` (the definitions
        used and the group sizes) and ``faithfulness_per_stay`` (group, true effects, per-stay
        Spearman per method).
    """
    if truth_dir is None:
        row = _row(
            "all",
            "",
            "status",
            (np.nan,) * 3,
            0,
            note=f"not available: {reason or 'no generative truth'}",
        )
        return {
            "faithfulness": pd.DataFrame([row], columns=SUMMARY_COLUMNS),
            "faithfulness_groups": pd.DataFrame(columns=GROUP_COLUMNS),
            "faithfulness_per_stay": pd.DataFrame(columns=["stay_id", "group"]),
        }
    stays, effects = load_truth(truth_dir)
    stays = stays.drop_duplicates("stay_id")
    known = per_stay[per_stay["stay_id"].isin(stays["stay_id"])].drop_duplicates("stay_id")
    has_cols = [f"has_{m}" for m in modalities]
    truth = true_effects(stays, effects, known[["stay_id", *has_cols]], modalities)
    df = known.merge(truth, on="stay_id")
    group, definitions = assign_groups(
        stays, df[["stay_id", *has_cols]], modalities, min_n, severity_max
    )
    df["group"] = df["stay_id"].map(group).fillna("other")
    has = df[has_cols].to_numpy(bool)
    true = df[[f"true_{m}" for m in modalities]].to_numpy(float)
    groups = df["group"].to_numpy()
    rows = []
    methods = [
        m
        for m in METHODS
        if all(f"{m}_{x}" in df for x in modalities)
        and np.isfinite(df[[f"{m}_{x}" for x in modalities]].to_numpy(float)).any()
    ]
    for method in methods:
        attr = df[[f"{method}_{m}" for m in modalities]].to_numpy(float)
        rows += group_rows(method, attr, true, has, groups, modalities, min_n, n_boot, seed)
        ok = has & np.isfinite(attr)
        varies = ok.sum() >= 3 and np.ptp(true[ok]) > 0 and np.ptp(attr[ok]) > 0
        rho = spearmanr(true[ok], attr[ok]).statistic if varies else np.nan
        n_ok = int(ok.any(1).sum())
        rows.append(
            _row(
                method,
                "all",
                "spearman_pooled",
                (float(rho), np.nan, np.nan),
                n_ok,
                0.0,
                1.0,
                "stay x modality",
            )
        )
        per = np.full(len(df), np.nan)
        for i in np.flatnonzero(ok.sum(1) >= 3):
            t, a = true[i, ok[i]], attr[i, ok[i]]
            if np.ptp(t) > 0 and np.ptp(a) > 0:
                per[i] = spearmanr(t, a).statistic
        df[f"spearman_{method}"] = per
        stats = bootstrap_mean_ci(per, n_boot, seed)
        note = "mean over stays with >= 3 modalities"
        rows.append(
            _row(
                method,
                "all",
                "spearman_per_stay",
                stats,
                int(np.isfinite(per).sum()),
                0.0,
                1.0,
                note,
            )
        )
    for r in rows:  # everything above is against the linear split
        r["note"] = "; ".join(x for x in ("secondary (linear-split truth)", r["note"]) if x)
    obs_cols: list[str] = []
    obs, why = observer_attributions(truth_dir, df[["stay_id", *has_cols]], modalities, dropout)
    if obs is not None:
        obs_cols = [c for c in obs if c != "stay_id"]
        df = df.merge(obs, on="stay_id", how="left")
        factors = stays[["stay_id", "cardiac", "pulmonary", "infection", "age"]]
        sf = df.merge(factors, on="stay_id", how="left")
        target, sf_defs, label = single_factor_rows(sf, methods, modalities, min_n, n_boot, seed)
        single = label.str.startswith("single_factor").to_numpy()
        rows = (
            target
            + agreement_rows(sf, methods, modalities, n_boot, seed)
            + coalition_rows(sf, single, n_boot, seed)
            + rows
        )
        definitions = pd.concat([sf_defs, definitions], ignore_index=True)
        df["single_factor_group"] = label.to_numpy()
        obs_cols.append("single_factor_group")
    else:
        rows.insert(0, _row("all", "", "observer", (np.nan,) * 3, 0, note=f"no target: {why}"))
    rows += synergy_rows(stays, interactions, df, modalities, min_n, n_boot, seed)
    keep = [
        "stay_id",
        "group",
        *[f"true_{m}" for m in modalities],
        *[f"spearman_{m}" for m in methods],
        *obs_cols,
    ]
    return {
        "faithfulness": pd.DataFrame(rows, columns=SUMMARY_COLUMNS),
        "faithfulness_groups": definitions,
        "faithfulness_per_stay": df[keep].reset_index(drop=True),
    }
