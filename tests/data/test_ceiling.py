"""The ceiling (observed_risk): it must equal the posterior that simulation of the story gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clinical_moe.data.synthetic import sample_truth
from clinical_moe.data.synthetic.ceiling import MODALITIES
from clinical_moe.data.synthetic.observer import (
    add_observed_risk,
    ceiling_risk,
    evidence_from_truth,
)
from clinical_moe.missingness import mcar, pattern_mask


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    stays = sample_truth(6000, 3)
    return stays[stays["in_ihm48"] == 1].reset_index(drop=True)


@pytest.fixture(scope="module")
def evidence(cohort):
    return evidence_from_truth(cohort)


def _calibrated(risk: np.ndarray, truth: np.ndarray, bins: int = 8) -> None:
    """E[true risk | ceiling] = ceiling: per quantile bin, within 4 standard errors."""
    for rows in np.array_split(np.argsort(risk, kind="stable"), bins):
        gap = truth[rows].mean() - risk[rows].mean()
        se = truth[rows].std() / np.sqrt(len(rows))
        assert abs(gap) < 4 * se + 0.01, (len(rows), gap, se)


def test_sample_truth_has_observed_risk(cohort):
    r = cohort["observed_risk"].to_numpy()
    assert np.isfinite(r).all() and (r > 0).all() and (r < 1).all()
    # the posterior mean preserves the mean of the true risk
    assert abs(r.mean() - cohort["true_risk"].mean()) < 0.01


@pytest.mark.parametrize("pattern", [("cxr",), ("notes",), ("cxr", "notes")])
def test_discrete_observation_matches_simulation(cohort, evidence, pattern):
    """Patterns without EHR reveal discrete data: each group's mean true risk is the ceiling."""
    shown = pattern_mask(evidence.natural, pattern, MODALITIES)
    risk, note = ceiling_risk(evidence, shown, "pattern", pattern=pattern)
    assert note == "exact"
    keys = pd.DataFrame(
        np.concatenate(
            [shown, evidence.natural[:, 1:2], evidence.findings, evidence.devices, evidence.bands],
            1,
        )
    )
    keys.loc[~shown[:, 1], 1:] = -1  # CXR data only count when the CXR is shown
    keys[100] = np.where(shown[:, 1] | shown[:, 3], evidence.n_cxr, -1)
    group = keys.astype(str).agg("|".join, axis=1)
    truth = cohort["true_risk"].to_numpy()
    checked = 0
    for _, rows in pd.Series(np.arange(len(group))).groupby(group.to_numpy()):
        if len(rows) < 150:
            continue
        r = risk[rows.to_numpy()]
        assert np.ptp(r) < 1e-12 or "notes" in pattern  # mentions split notes groups further
        t = truth[rows.to_numpy()]
        assert abs(t.mean() - r.mean()) < 4 * t.std() / np.sqrt(len(t)) + 0.01
        checked += 1
    assert checked >= 2


def test_natural_and_mcar_are_calibrated(cohort, evidence):
    truth = cohort["true_risk"].to_numpy()
    _calibrated(cohort["observed_risk"].to_numpy(), truth)
    shown = mcar(evidence.natural, 0.5, 0, ids=evidence.stay_id)
    risk, _ = ceiling_risk(evidence, shown, "mcar", rate=0.5)
    _calibrated(risk, truth)
    ecg_only = pattern_mask(evidence.natural, ("ecg",), MODALITIES)
    _calibrated(ceiling_risk(evidence, ecg_only, "pattern", pattern=("ecg",))[0], truth)


def test_ceiling_orders(cohort, evidence):
    y = cohort["label_mortality"].to_numpy()
    natural = roc_auc_score(y, cohort["observed_risk"])
    oracle = roc_auc_score(y, cohort["true_risk"])
    assert natural <= oracle
    # MCAR at rate 0 is the natural mask and the natural ceiling
    shown0 = mcar(evidence.natural, 0.0, 0, ids=evidence.stay_id)
    r0, _ = ceiling_risk(evidence, shown0, "mcar", rate=0.0)
    np.testing.assert_allclose(r0, cohort["observed_risk"], atol=1e-12)
    # hiding a modality lowers the ceiling AUROC
    no_ecg = ("ehr", "cxr", "notes")
    r_no_ecg, _ = ceiling_risk(
        evidence, pattern_mask(evidence.natural, no_ecg, MODALITIES), "pattern", pattern=no_ecg
    )
    assert roc_auc_score(y, r_no_ecg) < natural - 0.01
    half = mcar(evidence.natural, 0.5, 0, ids=evidence.stay_id)
    assert roc_auc_score(y, ceiling_risk(evidence, half, "mcar", rate=0.5)[0]) < natural


def test_uninformative_pattern_is_near_prior(cohort, evidence):
    """A model without EHR or CXR that never sees its only modality knows the prior only."""
    mods = ("ecg",)
    shown = np.zeros((len(evidence), 1), bool)
    risk, _ = ceiling_risk(evidence, shown, "pattern", modalities=mods, pattern=())
    assert np.ptp(risk) < 1e-12  # one value for everyone
    assert abs(risk[0] - cohort["true_risk"].mean()) < 0.015


def test_mnar_label_and_content(cohort, evidence):
    y = cohort["label_mortality"].to_numpy()
    from clinical_moe.missingness import mnar

    shown = mnar(evidence.natural, 0.5, 0, labels=y, ids=evidence.stay_id, strength=1.0)
    risk, note = ceiling_risk(evidence, shown, "mnar", rate=0.5, labels=y)
    assert "exact" in note and np.isfinite(risk).all()
    _calibrated(risk, y.astype(float), bins=4)  # P(y = 1 | observation) is calibrated for y
    nan, why = ceiling_risk(evidence, shown, "mnar_content", rate=0.5)
    assert np.isnan(nan).all() and "no ceiling" in why


def test_add_observed_risk_from_recorded_studies(cohort):
    """With truth/studies the recorded CXR findings are used: an opacity proves pulmonary."""
    stays = cohort[cohort["n_cxr"] == 1].head(20).drop(columns=["observed_risk"])
    sid = int(stays["stay_id"].iloc[0])

    def with_finding(opacity: bool) -> float:
        studies = pd.DataFrame(
            [{"modality": "cxr", "study_id": 1, "stay_id": sid, "in_window": True,
              "opacity": opacity, "effusion": False, "devices": False, "hr": np.nan}]
        )  # fmt: skip
        out = add_observed_risk(stays, studies)
        assert np.isfinite(out["observed_risk"]).all()
        return float(out.loc[out["stay_id"] == sid, "observed_risk"].iloc[0])

    assert with_finding(True) > with_finding(False) + 0.02
