"""Faithfulness against a hand-made synthetic truth: effects, groups, top-1 shares, Spearman."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from clinical_moe.attribution import faithfulness, find_truth, true_effects
from clinical_moe.data.synthetic.latents import OUTCOME_COEF, effects_description

MODS = ("ehr", "cxr", "ecg", "notes")


@pytest.fixture
def corpus(tmp_path):
    """A corpus root with ``truth/``: 40 stays with known factors, ages and modalities."""
    rng = np.random.default_rng(0)
    n = 40
    stays = pd.DataFrame(
        {
            "stay_id": 1000 + np.arange(n),
            "age": np.full(n, 65.0),
            "severity": np.abs(rng.normal(size=n)) + 0.6,
            "cardiac": rng.integers(0, 2, n),
            "pulmonary": rng.integers(0, 2, n),
            "infection": rng.integers(0, 2, n),
            "true_risk": rng.random(n),
        }
    )
    # planted single-factor stays (the others are too severe): 0-4 cardiac only, 5-9 pulmonary
    # only, 10 cardiac only but too severe
    stays.loc[0:10, ["severity", "cardiac", "pulmonary", "infection"]] = 0
    stays.loc[0:4, "cardiac"] = 1
    stays.loc[5:9, "pulmonary"] = 1
    stays.loc[10, ["cardiac", "severity"]] = [1, 0.9]
    (tmp_path / "truth").mkdir()
    stays.to_csv(tmp_path / "truth" / "stays.csv.gz", index=False)
    (tmp_path / "truth" / "effects.json").write_text(json.dumps(effects_description()))
    has = np.ones((n, 4), bool)
    has[5:, 2] = rng.random(n - 5) < 0.5  # ECG for all cardiac-only stays
    has[11:, 1] = rng.random(n - 11) < 0.5  # CXR for all pulmonary-only stays
    has[12, 1:] = False  # an EHR-only stay
    present = pd.DataFrame(
        {"stay_id": stays["stay_id"], **{f"has_{m}": has[:, i] for i, m in enumerate(MODS)}}
    )
    return tmp_path, stays, present


def _per_stay(truth: pd.DataFrame, present: pd.DataFrame, sign: float) -> pd.DataFrame:
    """Attributions equal to (sign x) the true effects, for every method."""
    df = present.copy()
    for method in ("shapley", "ig", "ablation"):
        for m in MODS:
            df[f"{method}_{m}"] = sign * truth[f"true_{m}"].to_numpy()
    return df


def test_true_effects_split_each_term_among_present_carriers(corpus):
    root, stays, present = corpus
    effects = json.loads((root / "truth" / "effects.json").read_text())
    truth = true_effects(stays, effects, present, MODS)
    assert np.all(
        truth[[f"true_{m}" for m in MODS]].to_numpy()[
            ~present[[f"has_{m}" for m in MODS]].to_numpy()
        ]
        == 0
    )
    # stay 12 has only the EHR: it carries severity, infection, age and the infection half of the
    # interaction; cardiac and pulmonary are invisible
    s = stays.set_index("stay_id")
    c = OUTCOME_COEF
    inter = s["pulmonary"] * s["infection"]
    row = s.loc[1012]
    expect = (
        c["severity"] * (row.severity - s.severity.mean())
        + c["infection"] * (row.infection - s.infection.mean())
        + 0.5 * c["pulmonary_x_infection"] * (inter[1012] - inter.mean())
    )
    got = truth.set_index("stay_id").loc[1012]
    np.testing.assert_allclose(got["true_ehr"], expect, rtol=1e-9)
    # a stay with every modality: ECG carries only cardiac
    row0 = s.loc[1000]
    np.testing.assert_allclose(
        got_ecg := truth.set_index("stay_id").loc[1000, "true_ecg"],
        c["cardiac"] * (row0.cardiac - s.cardiac.mean()),
    )
    assert got_ecg > 0


def test_oracle_attribution_is_faithful_and_its_reverse_is_not(corpus):
    root, stays, present = corpus
    effects = json.loads((root / "truth" / "effects.json").read_text())
    truth = true_effects(stays, effects, present, MODS)
    # the hand-made 40 stays cannot reach 50 per group: fix the severity bound (no widening)
    good = faithfulness(_per_stay(truth, present, 1.0), root / "truth", MODS, severity_max=0.5)
    bad = faithfulness(_per_stay(truth, present, -1.0), root / "truth", MODS, severity_max=0.5)
    g = good["faithfulness"].set_index(["method", "metric"])["value"]
    b = bad["faithfulness"].set_index(["method", "metric"])["value"]
    n = good["faithfulness"].set_index(["method", "metric"])["n_stays"]
    oracle = bad["faithfulness"].set_index(["method", "metric"])["oracle"]  # from the truth alone
    for method in ("shapley", "ig", "ablation"):
        assert g[(method, "cardiac_only_ecg_top1_signed")] == 1.0
        assert oracle[(method, "cardiac_only_ecg_top1_signed")] == 1.0
        assert g[(method, "pulmonary_only_cxr_top1_signed")] == 1.0
        assert b[(method, "cardiac_only_ecg_top1_signed")] == 0.0
        assert n[(method, "cardiac_only_ecg_top1_signed")] == 5  # stay 10 is too severe
        assert n[(method, "pulmonary_only_cxr_top1_signed")] == 5
        np.testing.assert_allclose(g[(method, "spearman_pooled")], 1.0)
        np.testing.assert_allclose(b[(method, "spearman_pooled")], -1.0)
        assert g[(method, "spearman_per_stay")] > 0.99 and b[(method, "spearman_per_stay")] < -0.99
    groups = good["faithfulness_per_stay"].set_index("stay_id")["group"]
    assert (groups.loc[1000:1004] == "cardiac_only").all()
    assert (groups.loc[1005:1009] == "pulmonary_only").all()
    assert groups.loc[1010] == "other"
    defs = good["faithfulness_groups"].set_index("group")
    assert defs.loc["cardiac_only", "severity_max"] == 0.5
    assert defs.loc["cardiac_only", "warning"].startswith("small n")  # 5 < 50
    notes = good["faithfulness"].set_index(["method", "metric"])["note"]
    assert "small n" in notes[("shapley", "cardiac_only_ecg_top1_abs")]


def test_synergy_weight_is_compared_where_the_interaction_acts(corpus):
    root, stays, present = corpus
    effects = json.loads((root / "truth" / "effects.json").read_text())
    per = _per_stay(true_effects(stays, effects, present, MODS), present, 1.0)
    both = ((stays["pulmonary"] == 1) & (stays["infection"] == 1)).to_numpy() & per["has_cxr"]
    inter = pd.DataFrame({"stay_id": stays["stay_id"], "synergy": np.where(both, 0.6, 0.1)})
    f = faithfulness(per, root / "truth", MODS, interactions=inter)["faithfulness"]
    f = f[f["method"] == "i2moe"].set_index("metric")
    assert f.loc["synergy_weight_pulm_x_inf", "value"] == pytest.approx(0.6)
    assert f.loc["synergy_weight_other", "value"] == pytest.approx(0.1)
    assert f.loc["synergy_weight_pulm_x_inf", "n_stays"] == int(both.sum())
    # the other stays are those with CXR and EHR only (same modalities as the synergy stays)
    assert f.loc["synergy_weight_other", "n_stays"] == int((per["has_cxr"] & ~both).sum())
    assert f.loc["synergy_weight_difference", "value"] == pytest.approx(0.5)


def test_without_truth_everything_is_not_available(corpus, tmp_path):
    root, _, present = corpus
    assert (
        find_truth({"data_root": str(root), "task": "ihm48", "label_columns": ["mortality"]})[0]
        == root / "truth"
    )
    for summary in (
        {},
        {"data_root": str(tmp_path / "nowhere")},
        {"data_root": str(root), "task": "los3", "label_columns": ["los3"]},
    ):
        path, reason = find_truth(summary)
        assert path is None and reason
        out = faithfulness(present, path, MODS, reason=reason)["faithfulness"]
        assert len(out) == 1 and out["note"].iloc[0].startswith("not available")
