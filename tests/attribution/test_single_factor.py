"""The issue-12 faithfulness target: ideal-observer attributions, single-factor groups, synergy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import logit

from clinical_moe.attribution import faithfulness
from clinical_moe.attribution.observer import (
    interaction_index,
    observer_attributions,
    shapley_from_values,
)
from clinical_moe.attribution.single_factor import single_factor_rows
from clinical_moe.attribution.stats import bootstrap_stratified_diff_ci

MODS = ("ehr", "cxr", "ecg", "notes")


def test_shapley_and_interaction_of_a_known_game():
    # v(S) = 1*[0] + 2*[1] + 3*[0 and 1] + 0.5*[2]  (3 players, 1 stay)
    values = {}
    for b in [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]:
        values[b] = np.array([1.0 * b[0] + 2.0 * b[1] + 3.0 * b[0] * b[1] + 0.5 * b[2]])
    phi = shapley_from_values(values, 3)
    np.testing.assert_allclose(phi[0], [2.5, 3.5, 0.5])  # the pair term split evenly
    np.testing.assert_allclose(interaction_index(values, 0, 1, 3), [3.0])
    np.testing.assert_allclose(interaction_index(values, 0, 2, 3), [0.0], atol=1e-12)


def _df(factors, has, observer, attr):
    """One row per stay with factors, presence, observer Shapley (= ablation) and attributions."""
    has = np.asarray(has, bool)
    df = pd.DataFrame(factors, columns=["cardiac", "pulmonary", "infection"])
    for j, m in enumerate(MODS):
        df[f"has_{m}"] = has[:, j]
        df[f"observer_shapley_{m}"] = np.where(has[:, j], observer[:, j], 0.0)
        df[f"observer_ablation_{m}"] = np.where(has[:, j], observer[:, j], np.nan)
        df[f"shapley_{m}"] = np.where(has[:, j], attr[:, j], 0.0)
    return df


def _rows(df):
    rows, defs, label = single_factor_rows(df, ["shapley"], MODS, min_n=2, n_boot=50)
    return pd.DataFrame(rows).set_index("metric"), defs.set_index("group"), label


def test_single_factor_groups_and_top1_can_fail():
    # 0-2 cardiac only, ECG dominant; 3 cardiac only but EHR dominant (observer: not single
    # factor); 4 cardiac + infection (not one factor); 5 pulmonary only, CXR dominant;
    # 6 cardiac only with the ECG alone (nothing to rank against)
    factors = [[1, 0, 0]] * 4 + [[1, 0, 1], [0, 1, 0], [1, 0, 0]]
    has = [[1, 0, 1, 1]] * 5 + [[1, 1, 0, 1], [0, 0, 1, 0]]
    obs = np.array(
        [
            [-0.3, 0, 1.2, 0.1],
            [0.2, 0, 0.9, -0.2],
            [-0.5, 0, 1.5, 0.3],
            [-1.4, 0, 0.8, 0.1],
            [0.1, 0, 1.6, 0.1],
            [-0.2, 0.9, 0, 0.1],
            [0, 0, 1.0, 0],
        ]
    )
    faithful = _df(factors, has, obs, obs)
    r, defs, label = _rows(faithful)
    assert list(label) == [
        "single_factor_cardiac",
        "single_factor_cardiac",
        "single_factor_cardiac",
        "factor_only_cardiac",
        "",
        "single_factor_pulmonary",
        "",
    ]
    assert defs.loc["single_factor_cardiac", "n_stays"] == 3
    assert defs.loc["factor_only_cardiac", "n_stays"] == 4
    top = r.loc["single_factor_carrier_top1_abs"]
    assert top["value"] == 1.0 and top["oracle"] == 1.0 and top["n_stays"] == 4
    assert r.loc["factor_only_cardiac_ecg_top1_abs", "oracle"] == 0.75  # the truth fails it
    assert r.loc["factor_only_cardiac_agree_observer_top1_abs", "value"] == 1.0
    # a head whose EHR outweighs the carrier everywhere scores 0 against an oracle of 1
    wrong = obs.copy()
    wrong[:, 0] = np.sign(wrong[:, 0] + 1e-9) * 3.0
    r, _, _ = _rows(_df(factors, has, obs, wrong))
    top = r.loc["single_factor_carrier_top1_abs"]
    assert top["value"] == 0.0 and top["oracle"] == 1.0
    assert (
        r.loc["single_factor_cardiac_ecg_share", "value"]
        < r.loc["single_factor_cardiac_ecg_share", "oracle"]
    )


def test_stratified_difference_removes_a_pattern_confound():
    # inside each stratum a > b by 0.1, but a sits mostly in the low stratum
    a = np.r_[np.full(90, 0.2), np.full(10, 0.6)]
    sa = np.r_[np.zeros(90), np.ones(10)]
    b = np.r_[np.full(10, 0.1), np.full(90, 0.5)]
    sb = np.r_[np.zeros(10), np.ones(90)]
    assert a.mean() - b.mean() < 0
    d, lo, hi = bootstrap_stratified_diff_ci(a, b, sa, sb, n_boot=200)
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert math.isnan(bootstrap_stratified_diff_ci(a, b, sa, sb + 5)[0])


@pytest.fixture(scope="module")
def truth_dir(tmp_path_factory):
    """A ``truth/`` folder of 400 sampled patients (no files rendered)."""
    from clinical_moe.data.synthetic.latents import effects_description
    from clinical_moe.data.synthetic.truth import sample_truth

    stays = sample_truth(400, seed=3)
    stays = stays[stays["in_ihm48"].astype(bool)].reset_index(drop=True)
    d = tmp_path_factory.mktemp("corpus") / "truth"
    d.mkdir()
    stays.to_csv(d / "stays.csv.gz", index=False)
    (d / "effects.json").write_text(json.dumps(effects_description()))
    return d


def test_observer_shapley_is_efficient_and_scores_itself_one(truth_dir):
    stays = pd.read_csv(truth_dir / "stays.csv.gz")
    present = stays[["stay_id", *[f"has_{m}" for m in MODS]]]
    obs, why = observer_attributions(truth_dir, present, MODS)
    assert obs is not None, why
    phi = obs[[f"observer_shapley_{m}" for m in MODS]].to_numpy()
    has = present[[f"has_{m}" for m in MODS]].to_numpy(bool)
    assert np.all(phi[~has] == 0)
    # efficiency: the attributions add up to log-odds minus the prevalence baseline
    base = obs["observer_log_odds"].to_numpy() - phi.sum(1)
    np.testing.assert_allclose(base, base[0], atol=1e-9)
    prevalence = (stays["true_risk"]).mean()
    assert abs(base[0] - logit(prevalence)) < 0.3
    # the ideal observer, taken as a head, meets the target; the reversed one does not
    per = present.copy()
    for m in MODS:
        per[f"shapley_{m}"] = obs[f"observer_shapley_{m}"].to_numpy()
        per[f"ablation_{m}"] = obs[f"observer_ablation_{m}"].to_numpy()
    f = faithfulness(per, truth_dir, MODS, n_boot=50, min_n=5)["faithfulness"]
    f = f.set_index(["method", "metric"])
    top = f.loc[("shapley", "single_factor_carrier_top1_abs")]
    assert top["n_stays"] > 0 and top["value"] == 1.0 and top["oracle"] == 1.0
    assert top["note"].startswith("TARGET") or top["note"].startswith("small n")
    for m in ("ehr", "notes"):  # put the non-carriers on top
        per[f"shapley_{m}"] = 10.0 * per["has_" + m]
    f = faithfulness(per, truth_dir, MODS, n_boot=50, min_n=5)["faithfulness"]
    f = f.set_index(["method", "metric"])
    assert f.loc[("shapley", "single_factor_carrier_top1_abs"), "value"] == 0.0
    # the legacy rows are marked secondary
    legacy = f.loc[("shapley", "cardiac_only_ecg_top1_abs"), "note"]
    assert legacy.startswith("secondary")


def test_the_observer_plays_the_game_of_the_heads_training_mechanism(truth_dir):
    """``dropout=r``: each coalition is the ceiling under natural presence + MCAR(r) (issue 12).

    That is the Bayes-optimal model of what a head trained with ``train.modality_dropout=r``
    saw, so its value on the natural coalition is exactly the evaluation's MCAR(r) ceiling of
    the natural mask; and a shown EHR with the other modalities hidden reads their absence as
    mostly natural (lower risk), where the presence-blind game (r = 0) reads nothing into it.
    """
    from clinical_moe.attribution.observer import coalition_values
    from clinical_moe.data.synthetic.observer import ceiling_risk, evidence_from_truth

    stays = pd.read_csv(truth_dir / "stays.csv.gz")
    has = stays[[f"has_{m}" for m in MODS]].to_numpy(bool)
    ev = evidence_from_truth(stays).with_natural(has, MODS)
    r = 0.3
    mech, blind = coalition_values(ev, has, MODS, r), coalition_values(ev, has, MODS)
    mcar, _ = ceiling_risk(ev, has, "mcar", rate=r)
    np.testing.assert_allclose(mech[(1, 1, 1, 1)], logit(mcar), atol=1e-9)
    assert not np.allclose(mech[(1, 1, 1, 1)], blind[(1, 1, 1, 1)])
    np.testing.assert_allclose(mech[(0, 0, 0, 0)], blind[(0, 0, 0, 0)])  # the prior, both
    assert all(np.isfinite(v).all() for v in mech.values())
    ehr_only = (1, 0, 0, 0)
    assert (mech[ehr_only] - blind[ehr_only]).mean() < -0.1
    with pytest.raises(ValueError, match="dropout"):
        coalition_values(ev, has, MODS, 1.0)


def test_synergy_group_is_where_the_observer_sees_the_interaction(truth_dir):
    stays = pd.read_csv(truth_dir / "stays.csv.gz")
    present = stays[["stay_id", *[f"has_{m}" for m in MODS]]]
    obs, _ = observer_attributions(truth_dir, present, MODS)
    x = obs.merge(stays[["stay_id", "pulmonary", "infection"]], on="stay_id")
    inter = x["observer_interaction_cxr_ehr"]
    both = (x["pulmonary"] == 1) & (x["infection"] == 1) & inter.notna()
    assert both.sum() >= 3
    assert inter[both].mean() > inter[~both & inter.notna()].mean() + 0.3


def test_observer_agreement_names_the_modality_that_is_off():
    """Bias, slope, correlation, residual SD per modality, and the EHR's slope in age."""
    from clinical_moe.attribution.agreement import agreement_rows

    rng = np.random.default_rng(0)
    n = 400
    age = rng.uniform(20, 90, n)
    obs = rng.normal(0, 1, (n, 4))
    obs[:, 0] += 0.3 * (age - 65) / 15  # the observer's EHR credit rises with age
    attr = obs.copy()
    attr[:, 0] -= 0.3 * (age - 65) / 15  # a head that ignores age ...
    attr[:, 2] = 0.5 * obs[:, 2] - 0.2  # ... and half-uses the ECG, shifted down
    df = _df(np.zeros((n, 3), int), np.ones((n, 4), bool), obs, attr).assign(age=age)
    t = pd.DataFrame(agreement_rows(df, ["shapley"], MODS, n_boot=100)).set_index("metric")
    assert (t["group"] == "observer_agreement").all()
    v = t["value"]
    assert v["agreement_ehr_age_slope"] == pytest.approx(-0.3, abs=0.02)
    assert v["agreement_ecg_slope"] == pytest.approx(0.5, abs=1e-9)
    assert v["agreement_ecg_bias"] == pytest.approx(-0.2 - 0.5 * obs[:, 2].mean(), abs=1e-9)
    assert t.loc["agreement_ecg_bias", "ci_low"] < v["agreement_ecg_bias"] < 0
    for m in ("cxr", "notes"):  # untouched modalities agree exactly
        assert v[f"agreement_{m}_slope"] == pytest.approx(1.0)
        assert v[f"agreement_{m}_r"] == pytest.approx(1.0)
        assert v[f"agreement_{m}_resid_sd"] == pytest.approx(0.0, abs=1e-12)
    assert v["agreement_ehr_r"] < 0.99 and v["agreement_ehr_resid_sd"] > 0.2
    assert "agreement_ecg_age_slope" not in v  # age only where the EHR carries it
    # the report's table: one row per method and modality, units named, rounded
    from clinical_moe.attribution.report import agreement_table

    table = agreement_table(pd.DataFrame(agreement_rows(df, ["shapley"], MODS, n_boot=100)))
    assert list(table["modality"]) == sorted(MODS) and set(table["unit"]) == {"log-odds"}
    assert table.columns.name is None and "age_slope" in table
    ecg = table.set_index("modality").loc["ecg"]
    assert ecg["slope"] == 0.5 and ecg["n_stays"] == n


def test_observer_coalition_values_are_its_game(truth_dir):
    """``observer_coalition_<S>``: v*(S) where the stay has S (NaN elsewhere); the natural one is
    the observer's log-odds, and their Shapley values are the observer's."""
    from clinical_moe.attribution.game import coalition_name

    stays = pd.read_csv(truth_dir / "stays.csv.gz")
    present = stays[["stay_id", *[f"has_{m}" for m in MODS]]]
    obs, _ = observer_attributions(truth_dir, present, MODS, dropout=0.3)
    has = present[[f"has_{m}" for m in MODS]].to_numpy(bool)
    codes = has.astype(int) @ (1 << np.arange(4))
    natural = [
        obs.loc[i, f"observer_coalition_{coalition_name(c, MODS)}"] for i, c in enumerate(codes)
    ]
    np.testing.assert_allclose(natural, obs["observer_log_odds"], atol=1e-12)
    ecg = obs["observer_coalition_ecg"].to_numpy()
    assert np.isnan(ecg[~has[:, 2]]).all() and np.isfinite(ecg[has[:, 2]]).all()
    assert not any(c.endswith("_none") for c in obs)  # the empty coalition is the baseline


def test_coalition_agreement_names_the_path_that_is_off():
    """A head whose ECG-only answer is 0.5 too high on single-factor stays shows it there only."""
    from clinical_moe.attribution.agreement import coalition_rows
    from clinical_moe.attribution.report import coalition_table

    rng = np.random.default_rng(1)
    n = 300
    df = pd.DataFrame({"stay_id": np.arange(n)})
    single = np.arange(n) < 100
    for name in ("ehr", "ecg", "ehr+ecg"):
        v = rng.normal(-2, 1, n)
        df[f"observer_coalition_{name}"] = v
        df[f"coalition_{name}"] = v + (0.5 * single if name == "ecg" else 0.0)
    df.loc[250:, ["coalition_ecg", "observer_coalition_ecg"]] = np.nan  # stays without an ECG
    t = pd.DataFrame(coalition_rows(df, single, n_boot=100)).set_index("metric")
    assert (t["group"] == "coalition_agreement").all()
    assert t.loc["coalition_single_factor_ecg_bias", "value"] == pytest.approx(0.5)
    assert t.loc["coalition_single_factor_ecg_bias", "ci_low"] > 0.4
    assert t.loc["coalition_all_ecg_bias", "value"] == pytest.approx(0.5 * 100 / 250)
    assert t.loc["coalition_all_ecg_bias", "n_stays"] == 250
    for name in ("ehr", "ehr+ecg"):
        assert t.loc[f"coalition_single_factor_{name}_bias", "value"] == pytest.approx(0.0)
        assert t.loc[f"coalition_all_{name}_resid_sd", "value"] == pytest.approx(0.0)
    table = coalition_table(pd.DataFrame(coalition_rows(df, single, n_boot=100)))
    row = table.set_index("coalition").loc["ecg"]
    assert row["single_factor_bias"] == 0.5 and row["single_factor_n"] == 100
    assert row["all_n"] == 250 and list(table["coalition"]) == ["ehr", "ecg", "ehr+ecg"]
