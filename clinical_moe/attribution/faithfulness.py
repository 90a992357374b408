"""Faithfulness of modality attributions against the synthetic corpus's generative truth.

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
- **Cardiac-only stays**: ``cardiac = 1``, ``pulmonary = 0``, ``infection = 0`` and
  ``|severity| <= severity_max`` (default 0.5 SD), restricted to stays that have the ECG and at
  least one other modality. The figure is the share of them whose ECG attribution is the largest
  (signed: the factor raises the risk) among their present modalities; ``chance`` is the mean of
  ``1 / number of present modalities`` and ``oracle`` the share the true effects themselves reach
  (below 1 where a small severity or the age outweighs the factor: pulmonary's coefficient is
  small). **Pulmonary-only** is the analogue for ``pulmonary`` / CXR.
- **Spearman**: rank correlation between true effects and attributions over all (stay, present
  modality) pairs (``spearman_pooled``) and the mean over stays with >= 3 present modalities of the
  per-stay correlation (``spearman_per_stay``).
- I2MoE: the mean synergy weight of stays with ``pulmonary = infection = 1`` that have CXR and EHR,
  against the other stays; the synergy expert should weigh more where the interaction acts.

Real MIMIC has no truth: every figure is then reported as "not available".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

FACTORS = ("severity", "cardiac", "pulmonary", "infection")
WEIGHTS = {"strong": 1.0, "weak": 0.25}
GROUPS = {"cardiac_only": ("cardiac", "ecg"), "pulmonary_only": ("pulmonary", "cxr")}
METHODS = ("shapley", "ig", "ablation")
SUMMARY_COLUMNS = ["method", "metric", "value", "n_stays", "chance", "oracle", "note"]


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


def stay_groups(stays: pd.DataFrame, severity_max: float = 0.5) -> pd.Series:
    """``stay_id -> "cardiac_only" | "pulmonary_only" | "other"`` (see the module docstring)."""
    x = stays.set_index("stay_id")
    calm = x["severity"].abs() <= severity_max
    group = pd.Series("other", index=x.index)
    for name, (factor, _) in GROUPS.items():
        others = [f for f in ("cardiac", "pulmonary", "infection") if f != factor]
        sel = (x[factor] == 1) & calm & (x[others] == 0).all(axis=1)
        group[sel] = name
    return group


def faithfulness(
    per_stay: pd.DataFrame,
    truth_dir: str | Path | None,
    modalities: tuple[str, ...],
    interactions: pd.DataFrame | None = None,
    reason: str = "",
    severity_max: float = 0.5,
) -> dict[str, pd.DataFrame]:
    """Faithfulness figures of every attribution method in ``per_stay``.

    Args:
        per_stay: ``stay_id``, ``has_<m>`` and ``<method>_<m>`` columns.
        truth_dir: The corpus's ``truth/`` folder, or None (no truth).
        modalities: Modality order.
        interactions: I2MoE per-stay weights (``stay_id``, ``synergy``), if any.
        reason: Why there is no truth (shown when ``truth_dir`` is None).
        severity_max: ``|severity|`` bound of the single-factor groups.

    Returns:
        ``faithfulness`` (method, metric, value, n_stays, chance, note) and
        ``faithfulness_per_stay`` (group, true effects, per-stay Spearman per method).
    """
    if truth_dir is None:
        row = {
            "method": "all",
            "metric": "status",
            "value": np.nan,
            "n_stays": 0,
            "chance": np.nan,
            "oracle": np.nan,
            "note": f"not available: {reason or 'no generative truth'}",
        }
        return {
            "faithfulness": pd.DataFrame([row], columns=SUMMARY_COLUMNS),
            "faithfulness_per_stay": pd.DataFrame(columns=["stay_id", "group"]),
        }
    stays, effects = load_truth(truth_dir)
    stays = stays.drop_duplicates("stay_id")
    known = per_stay[per_stay["stay_id"].isin(stays["stay_id"])]
    has_cols = [f"has_{m}" for m in modalities]
    truth = true_effects(stays, effects, known[["stay_id", *has_cols]], modalities)
    df = known.merge(truth, on="stay_id")
    df["group"] = df["stay_id"].map(stay_groups(stays, severity_max)).fillna("other")
    has = df[has_cols].to_numpy(bool)
    true = df[[f"true_{m}" for m in modalities]].to_numpy(float)
    rows = []
    methods = [
        m
        for m in METHODS
        if all(f"{m}_{x}" in df for x in modalities)
        and np.isfinite(df[[f"{m}_{x}" for x in modalities]].to_numpy(float)).any()
    ]
    for method in methods:
        attr = df[[f"{method}_{m}" for m in modalities]].to_numpy(float)
        for name, (_, modality) in GROUPS.items():
            if modality not in modalities:
                continue
            j = modalities.index(modality)
            sel = (df["group"] == name).to_numpy() & has[:, j] & (has.sum(1) >= 2)
            top = np.where(has, np.nan_to_num(attr, nan=-np.inf), -np.inf)[sel].argmax(1) == j
            best = np.where(has, true, -np.inf)[sel].argmax(1) == j
            rows.append(
                {
                    "method": method,
                    "metric": f"{name}_{modality}_top1",
                    "value": float(top.mean()) if sel.any() else np.nan,
                    "n_stays": int(sel.sum()),
                    "chance": float((1.0 / has[sel].sum(1)).mean()) if sel.any() else np.nan,
                    "oracle": float(best.mean()) if sel.any() else np.nan,
                    "note": "",
                }
            )
        ok = has & np.isfinite(attr)
        rho = spearmanr(true[ok], attr[ok]).statistic if ok.sum() >= 3 else np.nan
        rows.append(
            {
                "method": method,
                "metric": "spearman_pooled",
                "value": float(rho),
                "n_stays": int(ok.any(1).sum()),
                "chance": 0.0,
                "oracle": 1.0,
                "note": "stay x modality",
            }
        )
        per = np.full(len(df), np.nan)
        for i in np.flatnonzero(ok.sum(1) >= 3):
            t, a = true[i, ok[i]], attr[i, ok[i]]
            if np.ptp(t) > 0 and np.ptp(a) > 0:
                per[i] = spearmanr(t, a).statistic
        df[f"spearman_{method}"] = per
        rows.append(
            {
                "method": method,
                "metric": "spearman_per_stay",
                "value": float(np.nanmean(per)) if np.isfinite(per).any() else np.nan,
                "n_stays": int(np.isfinite(per).sum()),
                "chance": 0.0,
                "oracle": 1.0,
                "note": "mean over stays with >= 3 modalities",
            }
        )
    rows += _synergy_rows(stays, interactions, df, modalities)
    keep = [
        "stay_id",
        "group",
        *[f"true_{m}" for m in modalities],
        *[f"spearman_{m}" for m in methods],
    ]
    return {
        "faithfulness": pd.DataFrame(rows, columns=SUMMARY_COLUMNS),
        "faithfulness_per_stay": df[keep].reset_index(drop=True),
    }


def _synergy_rows(stays, interactions, df, modalities) -> list[dict]:
    if interactions is None or "synergy" not in getattr(interactions, "columns", ()):
        return []
    if not {"cxr", "ehr"} <= set(modalities):
        return []
    x = interactions.merge(stays[["stay_id", "pulmonary", "infection"]], on="stay_id")
    x = x.merge(df[["stay_id", "has_cxr", "has_ehr"]], on="stay_id")
    both = (x["pulmonary"] == 1) & (x["infection"] == 1) & x["has_cxr"] & x["has_ehr"]
    out = []
    for name, sel in (("synergy_weight_pulm_x_inf", both), ("synergy_weight_other", ~both)):
        out.append(
            {
                "method": "i2moe",
                "metric": name,
                "value": float(x.loc[sel, "synergy"].mean()) if sel.any() else np.nan,
                "n_stays": int(sel.sum()),
                "chance": np.nan,
                "oracle": np.nan,
                "note": "",
            }
        )
    return out
