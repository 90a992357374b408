"""Evaluation metrics: agreement with scikit-learn, ECE by hand, thresholds, bootstrap coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)

from clinical_moe import metrics as M


def scores(n: int = 400, seed: int = 0, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 1)))
    return y, (np.round(p, 2) if ties else p)  # rounding creates ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_estimates_match_sklearn(seed):
    y, p = scores(seed=seed)
    out = M.score_with_ci(y, p, threshold=0.3, n_boot=0)
    assert out["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert out["auprc"]["value"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert out["brier"]["value"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert out["f1"]["value"] == pytest.approx(f1_score(y, p >= 0.3), abs=1e-12)
    assert math.isnan(out["auroc"]["ci_low"])


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_resample_metrics_match_sklearn_with_weights(seed):
    """Each bootstrap row is a weighted sample: it must equal sklearn with those weights."""
    y, p = scores(seed=seed)
    W = M.bootstrap_weights(y, 5, seed=seed)
    assert (W.sum(1) == len(y)).all()
    assert (W[:, y == 1].sum(1) == (y == 1).sum()).all(), "stratified: prevalence kept"
    got = {m: M._weighted("binary", m, W, y, p, 0.3) for m in ("auroc", "auprc", "brier", "f1")}
    for b, w in enumerate(W):
        assert got["auroc"][b] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-10)
        assert got["auprc"][b] == pytest.approx(
            average_precision_score(y, p, sample_weight=w), abs=1e-10
        )
        assert got["brier"][b] == pytest.approx(brier_score_loss(y, p, sample_weight=w), abs=1e-10)
        assert got["f1"][b] == pytest.approx(f1_score(y, p >= 0.3, sample_weight=w), abs=1e-10)


def test_ece_on_a_hand_computed_case():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.15, 0.45, 0.75, 0.85, 0.95])
    # 10 bins: [0.1, 0.15] -> bin 1, mean p .125, mean y 0 -> |.125| * 2/6
    # 0.45 -> bin 4: |0.45 - 1| * 1/6; 0.75 -> bin 7: |0.75 - 1| * 1/6;
    # 0.85 -> bin 8: |0.85 - 1| * 1/6; 0.95 -> bin 9: |0.95 - 0| * 1/6
    expected = (0.125 * 2 + 0.55 + 0.25 + 0.15 + 0.95) / 6
    assert M.ece(y, p) == pytest.approx(expected, abs=1e-12)
    assert M.ece(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0  # perfectly calibrated
    assert M.ece(y, p, n_bins=1) == pytest.approx(abs(p.mean() - y.mean()))


def test_best_threshold_maximises_validation_f1():
    y, p = scores(seed=4, ties=False)
    t = M.best_threshold(y, p)
    cuts = np.unique(p)[:, None]  # (K, 1): every candidate threshold at once
    pred = p[None, :] >= cuts
    tp = (pred & (y == 1)).sum(1)
    brute = float(np.max(2 * tp / (pred.sum(1) + (y == 1).sum())))
    assert f1_score(y, p >= t) == pytest.approx(brute, abs=1e-12)
    assert M.best_threshold(np.zeros(5), np.linspace(0, 1, 5)) == 0.5  # undefined -> 0.5
    assert M.best_threshold(np.zeros(4), np.ones((4, 3)) / 3, "multiclass") is None


def test_bootstrap_ci_covers_a_known_auroc():
    """Binormal scores with separation d have AUROC = Phi(d / sqrt 2); 95% CIs should cover it."""
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(100):
        y = np.r_[np.ones(60), np.zeros(140)]
        p = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 140)]
        ci = M.score_with_ci(y, p, n_boot=300, seed=rep, metrics=("auroc",))["auroc"]
        assert ci["ci_low"] < ci["value"] < ci["ci_high"]
        covered += ci["ci_low"] <= truth <= ci["ci_high"]
    assert covered >= 85, f"coverage {covered}/100"


def test_bootstrap_is_seeded():
    y, p = scores(seed=5)
    a = M.score_with_ci(y, p, n_boot=200, seed=1)
    b = M.score_with_ci(y, p, n_boot=200, seed=1)
    c = M.score_with_ci(y, p, n_boot=200, seed=2)
    assert a == b
    assert a["auroc"]["ci_low"] != c["auroc"]["ci_low"]


def test_multilabel_and_multiclass_are_macro_averages():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 3)) < 0.3).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random((300, 3)), 0, 1)
    out = M.score_with_ci(y, p, "multilabel", threshold=[0.4, 0.5, 0.6], n_boot=50)
    assert out["auroc"]["value"] == pytest.approx(
        np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(3)])
    )
    assert out["brier"]["value"] == pytest.approx(
        np.mean([brier_score_loss(y[:, c], p[:, c]) for c in range(3)])
    )
    assert out["f1"]["value"] == pytest.approx(
        f1_score(y, p >= np.array([0.4, 0.5, 0.6]), average="macro")
    )
    assert out["auroc"]["ci_low"] < out["auroc"]["value"] < out["auroc"]["ci_high"]
    yc = rng.integers(0, 3, 300)
    pc = rng.dirichlet(np.ones(3), 300)
    out = M.score_with_ci(yc, pc, "multiclass", n_boot=50)
    assert out["auroc"]["value"] == pytest.approx(roc_auc_score(yc, pc, multi_class="ovr"))
    assert out["f1"]["value"] == pytest.approx(f1_score(yc, pc.argmax(1), average="macro"))
    assert out["brier"]["value"] == pytest.approx(((pc - np.eye(3)[yc]) ** 2).sum(1).mean())
