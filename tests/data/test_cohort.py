"""Cohorts: exclusions, labels, subject-level splits, and clear errors on bad tables."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from clinical_moe.data.cohort import assign_splits, build_cohort, load_phenotypes
from clinical_moe.data.tables import TableError

try:
    from tests.data.mimic_factory import MimicFactory
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    from mimic_factory import MimicFactory

SEPSIS = "Septicemia (except in labor)"
CHF = "Congestive heart failure; nonhypertensive"


@pytest.fixture
def root(tmp_path):
    return MimicFactory.default().write(tmp_path / "mimic-iv")


def _by_stay(df):
    return df.set_index("stay_id")


def test_ihm48_exclusions_are_counted_and_logged(root, caplog):
    with caplog.at_level(logging.INFO, logger="clinical_moe.data.cohort"):
        df = build_cohort(root, "ihm48")
    assert set(df["stay_id"]) == {30001, 30002, 30009, 30010, 30011}
    assert df.attrs["exclusions"] == {
        "duplicate_stay_id": 0,
        "invalid_times": 0,
        "missing_admission": 0,
        "missing_patient": 0,
        "multiple_icu_stays": 2,  # 30005 and 30006 share one admission
        "careunit_transfer": 1,  # 30004
        "age_under_18": 1,  # 30003
        "los_under_48h": 1,  # 30007
        "no_observation_48h": 1,  # 30008: its only event is at 49 h
    }
    assert df.attrs["label_columns"] == ["mortality"]
    assert any("careunit_transfer" in r.getMessage() for r in caplog.records)
    for col in ("subject_id", "hadm_id", "stay_id", "intime", "outtime", "mortality", "split"):
        assert col in df.columns
    assert df["stay_id"].is_unique


def test_mortality_label_from_deathtime_or_dod(root):
    y = _by_stay(build_cohort(root, "ihm48"))["mortality"]
    assert y[30002] == 1  # deathtime between admittime and dischtime
    assert y[30009] == 1  # dod only, inside the admission
    assert y[30001] == 0 and y[30010] == 0


def test_observed_stay_ids_argument_and_switch(root):
    df = build_cohort(root, "ihm48", observed_stay_ids={30001})
    assert set(df["stay_id"]) == {30001}
    assert df.attrs["exclusions"]["no_observation_48h"] == 5
    df = build_cohort(root, "ihm48", check_observations=False)
    assert 30008 in set(df["stay_id"]) and "no_observation_48h" not in df.attrs["exclusions"]


def test_los_labels(tmp_path):
    f = MimicFactory.default()
    f.add_stay(10010, 20011, 30012, "2159-01-01 08:00:00", 200)
    f.chart(10010, 20011, 30012, 2.0, 220045, valuenum=88)
    root = f.write(tmp_path)
    los3 = _by_stay(build_cohort(root, "los3"))
    los7 = _by_stay(build_cohort(root, "los7"))
    assert los3.loc[30012, "los3"] == 1 and los7.loc[30012, "los7"] == 1
    assert los3.loc[30001, "los3"] == 0  # exactly 72 h is not > 3 days
    assert los3.attrs["label_columns"] == ["los3"]
    assert 30007 not in los3.index  # predictions are made at 48 h


def test_phenotype_labels_keep_leading_zero_codes(root):
    df = _by_stay(build_cohort(root, "phenotype"))
    names = list(load_phenotypes())
    assert len(names) == 25 and df.attrs["label_columns"] == names
    assert df.loc[30001, SEPSIS] == 1  # ICD-9 "0389": leading zero kept
    assert df.loc[30001, CHF] == 1 and df.loc[30002, CHF] == 1  # ICD-9 4280, ICD-10 I5023
    assert df.loc[30002, "Acute and unspecified renal failure"] == 1  # N179
    assert df.loc[30009, "Diabetes mellitus without complication"] == 1  # E119
    assert df.loc[30010, "Coronary atherosclerosis and other heart disease"] == 1  # V4581 (ICD-9)
    assert int(df[names].to_numpy().sum()) == 6
    assert df.attrs["exclusions"]["no_diagnoses"] == 3


def test_phenotype_needs_diagnoses_but_other_tasks_do_not(tmp_path):
    root = MimicFactory.default().write(tmp_path, omit=("hosp/diagnoses_icd",))
    assert len(build_cohort(root, "ihm48")) == 5
    with pytest.raises(FileNotFoundError, match="hosp/diagnoses_icd"):
        build_cohort(root, "phenotype")


def test_readmit30(root):
    df = _by_stay(build_cohort(root, "readmit30"))
    assert df.loc[30010, "readmit30"] == 1  # next admission 19 days after
    assert df.loc[30011, "readmit30"] == 0 and df.loc[30001, "readmit30"] == 0
    assert 30002 not in df.index and df.attrs["exclusions"]["died_in_hospital"] == 2


def test_splits_by_subject_deterministic_and_stable(tmp_path):
    f = MimicFactory.default()
    f.add_random_patients(150)
    for i in range(30):  # subjects with two admissions, one ICU stay each
        s = 13000 + i
        f.add_stay(s, 23000 + 2 * i, 33000 + 2 * i, f"2161-01-{i % 28 + 1:02d} 08:00:00", 60)
        f.add_stay(
            s,
            23001 + 2 * i,
            33001 + 2 * i,
            f"2162-01-{i % 28 + 1:02d} 08:00:00",
            60,
            new_patient=False,
        )
        for k in (0, 1):
            f.chart(s, 23000 + 2 * i + k, 33000 + 2 * i + k, 1.0, 220045, valuenum=70)
    root = f.write(tmp_path / "a")
    a = build_cohort(root, "ihm48", seed=3)
    b = build_cohort(root, "ihm48", seed=3)
    assert a["split"].tolist() == b["split"].tolist()
    per_subject = a.groupby("subject_id")["split"].nunique()
    assert (a.groupby("subject_id").size() == 2).sum() == 31
    assert (per_subject == 1).all()  # a subject's stays never straddle splits
    groups = [set(a.loc[a["split"] == s, "subject_id"]) for s in ("train", "val", "test")]
    assert (
        not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    )
    frac = a.drop_duplicates("subject_id")["split"].value_counts(normalize=True)
    assert 0.55 < frac["train"] < 0.85 and frac["val"] > 0.05 and frac["test"] > 0.05
    other = build_cohort(root, "ihm48", seed=4)
    assert other["split"].tolist() != a["split"].tolist()
    f.add_random_patients(40, start_subject=12000, seed=1)  # more patients: nobody moves
    c = build_cohort(f.write(tmp_path / "b"), "ihm48", seed=3)
    old = a.set_index("stay_id")["split"]
    assert c.set_index("stay_id")["split"].reindex(old.index).tolist() == old.tolist()


def test_assign_splits_validates_fractions():
    assert set(assign_splits(np.arange(1000), 0, (1.0, 0.0, 0.0))) == {"train"}
    with pytest.raises(ValueError, match="sum"):
        assign_splits([1, 2], 0, (0.5, 0.2, 0.2))


def test_absent_required_table_names_it(tmp_path):
    root = MimicFactory.default().write(tmp_path, omit=("icu/icustays",))
    with pytest.raises(FileNotFoundError) as err:
        build_cohort(root, "ihm48")
    assert "icu/icustays" in str(err.value) and str(root) in str(err.value)


def test_missing_column_names_column_and_file(tmp_path):
    root = MimicFactory.default().write(tmp_path, drop_columns={"hosp/patients": ["anchor_age"]})
    with pytest.raises(TableError) as err:
        build_cohort(root, "ihm48")
    assert "anchor_age" in str(err.value) and "patients.csv.gz" in str(err.value)


@pytest.mark.parametrize("fmt", ["csv.gz", "csv"])
def test_empty_csv_is_a_clear_error(tmp_path, fmt):
    root = MimicFactory.default().write(tmp_path, fmt=fmt, empty=("hosp/admissions",))
    with pytest.raises(TableError) as err:
        build_cohort(root, "ihm48")
    assert f"admissions.{fmt}" in str(err.value) and "empty" in str(err.value)


def test_header_only_table_is_a_clear_error(tmp_path):
    f = MimicFactory.default()
    f.rows["hosp/patients"] = []
    root = f.write(tmp_path)
    with pytest.raises(TableError, match="no rows") as err:
        build_cohort(root, "ihm48")
    assert "patients.csv.gz" in str(err.value)


def test_one_pass_route_equals_the_scan(root):
    # Preprocessing builds without the rule, loads the events once, then applies the rule from
    # their window_stays: same stays, same columns, same exclusion counts as the scan.
    import pandas as pd

    from clinical_moe.data.cohort import exclude_unobserved
    from clinical_moe.data.ehr import load_ehr_events, observed_stays

    scanned = build_cohort(root, "ihm48")
    candidate = build_cohort(root, "ihm48", check_observations=False)
    events = load_ehr_events(root, candidate, window_hours=48.0)
    assert events.window_stays == observed_stays(root, candidate, 48.0)
    assert 30008 in set(candidate["stay_id"]) and 30008 not in events.window_stays
    one_pass = exclude_unobserved(candidate, events.window_stays, 48.0)
    pd.testing.assert_frame_equal(one_pass, scanned)
    assert one_pass.attrs["exclusions"] == scanned.attrs["exclusions"]
    assert one_pass.attrs["label_columns"] == ["mortality"]


def test_without_event_tables_the_observation_rule_is_skipped(tmp_path):
    root = MimicFactory.default().write(tmp_path, omit=("icu/chartevents", "hosp/labevents"))
    with pytest.warns(UserWarning, match="observation"):
        df = build_cohort(root, "ihm48")
    assert 30008 in set(df["stay_id"])


def test_unknown_task(root):
    with pytest.raises(ValueError, match="ihm48"):
        build_cohort(root, "mortality24")


@pytest.mark.parametrize("modalities", [["ehr"], ["cxr"]], ids=["one-pass", "scan"])
def test_preprocessing_plan_applies_the_observation_rule(tmp_path, modalities):
    # With EHR the plan takes the rule from its own event pass; without, build_cohort scans.
    import warnings
    from pathlib import Path

    from clinical_moe.config import load_config
    from clinical_moe.data.plan import plan_stays

    MimicFactory.default().write(tmp_path / "mimic-iv")
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "late.yaml"
    over = [f"data.root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(config, [*over, f"data.modalities={modalities}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no mimic-cxr/ here: every stay lacks the modality
        plan = plan_stays(cfg, quiet=True)
    assert set(plan.stays["stay_id"]) == {30001, 30002, 30009, 30010, 30011}
    assert plan.summary["cohort_exclusions"]["no_observation_48h"] == 1
