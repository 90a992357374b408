"""Faithfulness figures that can be read: group sizes, bootstrap CIs, |.| vs signed top-1, synergy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from clinical_moe.attribution.faithfulness import faithfulness
from clinical_moe.attribution.groups import assign_groups
from clinical_moe.attribution.stats import bootstrap_diff_ci, bootstrap_mean_ci
from clinical_moe.data.synthetic.latents import effects_description

MODS = ("ehr", "cxr", "ecg", "notes")


def _write_truth(root, stays: pd.DataFrame):
    (root / "truth").mkdir(parents=True, exist_ok=True)
    stays.to_csv(root / "truth" / "stays.csv.gz", index=False)
    (root / "truth" / "effects.json").write_text(json.dumps(effects_description()))
    return root / "truth"


def _stays(n: int, seed: int = 0, **fixed) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "stay_id": np.arange(n) + 1,
            "age": np.full(n, 65.0),
            "severity": rng.normal(size=n),
            "cardiac": rng.integers(0, 2, n),
            "pulmonary": rng.integers(0, 2, n),
            "infection": rng.integers(0, 2, n),
            "true_risk": rng.random(n),
        }
    )
    for k, v in fixed.items():
        df[k] = v
    return df


def _present(n: int, **absent) -> pd.DataFrame:
    df = pd.DataFrame({"stay_id": np.arange(n) + 1, **{f"has_{m}": True for m in MODS}})
    for m, rows in absent.items():
        df.loc[rows, f"has_{m}"] = False
    return df


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 500, 5000):
        hits = (rng.random(n) < 0.7).astype(float)
        mean, lo, hi = bootstrap_mean_ci(hits, seed=1)
        assert lo <= mean <= hi and mean == pytest.approx(hits.mean())
        assert abs((hi - lo) - 2 * 1.96 * np.sqrt(0.21 / n)) < 0.5 * (hi - lo)  # ~ normal width
        widths.append(hi - lo)
        assert bootstrap_mean_ci(hits, seed=1) == (mean, lo, hi)  # seeded
    assert widths[0] > 2 * widths[1] > 4 * widths[2]
    assert np.isnan(bootstrap_mean_ci([np.nan])[1])
    d, lo, hi = bootstrap_diff_ci(np.ones(30), np.zeros(40))
    assert (d, lo, hi) == (1.0, 1.0, 1.0)


def test_synergy_difference_ci_excludes_zero_only_where_the_weight_rises(tmp_path):
    n = 800
    stays = _stays(n, seed=3)
    truth = _write_truth(tmp_path, stays)
    per = _present(n)
    per["shapley_ehr"] = per["shapley_cxr"] = per["shapley_ecg"] = per["shapley_notes"] = 0.1
    both = ((stays["pulmonary"] == 1) & (stays["infection"] == 1)).to_numpy()
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 0.05, n)
    rises = pd.DataFrame({"stay_id": per["stay_id"], "synergy": 0.1 + 0.04 * both + noise})
    flat = pd.DataFrame({"stay_id": per["stay_id"], "synergy": 0.1 + noise})
    for inter, excludes in ((rises, True), (flat, False)):
        f = faithfulness(per, truth, MODS, interactions=inter)["faithfulness"]
        row = f.set_index("metric").loc["synergy_weight_difference"]
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
        assert bool(row["ci_low"] > 0) == excludes
        assert row["ci_low"] <= 0 <= row["ci_high"] or excludes
        assert row["n_stays"] == both.sum() >= 50 and "small n" not in row["note"]


def test_abs_top1_differs_from_signed_top1_when_the_others_are_negative(tmp_path):
    n = 120  # 60 cardiac-only stays, then 60 others
    stays = _stays(n, seed=1)
    stays.loc[:59, ["cardiac", "pulmonary", "infection", "severity"]] = [1, 0, 0, 0.0]
    stays.loc[60:, "cardiac"] = 0
    truth = _write_truth(tmp_path, stays)
    per = _present(n)
    # ECG slightly positive, every other modality clearly negative: ECG "wins" the signed ranking
    for m, v in {"ehr": -1.0, "cxr": -0.9, "ecg": 0.2, "notes": -0.8}.items():
        per[f"shapley_{m}"] = v
    f = faithfulness(per, truth, MODS)
    rows = f["faithfulness"].set_index("metric")
    signed, absolute = (
        rows.loc["cardiac_only_ecg_top1_signed"],
        rows.loc["cardiac_only_ecg_top1_abs"],
    )
    assert signed["value"] == 1.0 and absolute["value"] == 0.0
    assert signed["n_stays"] == 60 and "small n" not in signed["note"]  # >= 50: no warning
    share = rows.loc["cardiac_only_ecg_share"]
    assert share["value"] == pytest.approx(0.2 / 2.9)
    assert share["chance"] == pytest.approx(0.25)
    assert share["oracle"] > 0.5  # the truth puts most of the weight on the ECG
    # the same attributions with ECG clearly on top by |.| win both
    per["shapley_ecg"] = 2.0
    rows = faithfulness(per, truth, MODS)["faithfulness"].set_index("metric")
    assert rows.loc["cardiac_only_ecg_top1_abs", "value"] == 1.0
    assert rows.loc["cardiac_only_ecg_top1_abs", "ci_low"] == 1.0


def test_groups_widen_the_severity_bound_until_they_hold_min_n_stays():
    n = 2000
    stays = _stays(n, seed=5)
    present = _present(n, cxr=slice(0, 1500))
    group, defs = assign_groups(stays, present, MODS, min_n=50)
    defs = defs.set_index("group")
    for name in ("cardiac_only", "pulmonary_only", "synergy"):
        assert (group == name).sum() == defs.loc[name, "n_stays"]
    assert defs.loc["cardiac_only", "n_stays"] >= 50
    assert defs.loc["cardiac_only", "severity_max"] == 0.5  # enough stays at the tight bound
    # only 500 stays have the CXR: the pulmonary-only bound had to widen, and says so
    assert defs.loc["pulmonary_only", "severity_max"] > 0.5
    assert (
        f"<= {defs.loc['pulmonary_only', 'severity_max']:g} SD"
        in (defs.loc["pulmonary_only", "definition"])
    )
    x = stays.set_index("stay_id")
    sel = group[group == "pulmonary_only"].index
    assert (x.loc[sel, "pulmonary"] == 1).all() and (x.loc[sel, "infection"] == 0).all()
    assert present.set_index("stay_id").loc[sel, "has_cxr"].all()
    # impossible to reach: the widest bound is used and the group is flagged
    _, small = assign_groups(stays.head(100), present.head(100), MODS, min_n=50)
    assert small["warning"].str.startswith("small n").all()
    assert np.isinf(small.set_index("group").loc["cardiac_only", "severity_max"])


def test_agreement_with_the_true_top1_is_one_for_the_truth_and_chance_for_noise():
    from clinical_moe.attribution.faithfulness import group_rows

    rng = np.random.default_rng(0)
    mods = ("ehr", "cxr", "ecg", "notes")
    n = 400
    true = rng.normal(size=(n, 4))
    has = np.ones((n, 4), bool)
    groups = np.array(["cardiac_only"] * n)

    def agree(attr):
        rows = group_rows("m", attr, true, has, groups, mods, n_boot=50)
        return next(r for r in rows if r["metric"] == "cardiac_only_agree_true_top1_abs")

    exact = agree(true * 3.0)
    assert exact["value"] == 1.0 and exact["oracle"] == 1.0
    noise = agree(rng.normal(size=(n, 4)))
    assert abs(noise["value"] - 0.25) < 0.08 and noise["chance"] == 0.25
    assert noise["ci_low"] <= noise["value"] <= noise["ci_high"]
