"""EHR tables: explicit dtypes, chunked reading, cleaning, windows, arrays, static, normaliser."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from clinical_moe.data.ehr import (
    EhrNormalizer,
    load_ehr_events,
    load_variables,
    observed_stays,
    static_features,
    time_series,
    to_arrays,
)
from clinical_moe.data.tables import TableError, find_table, iter_table, read_table

try:
    from tests.data.mimic_factory import MimicFactory
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    from mimic_factory import MimicFactory


@pytest.fixture
def root(tmp_path):
    return MimicFactory.default().write(tmp_path / "mimic-iv")


def _stays(root):
    stays = read_table(root, "icu/icustays")
    return stays[stays["stay_id"].isin([30001, 30002, 30010])]


def _value(ev, stay, hours, variable):
    e = ev.events
    hit = e[(e["stay_id"] == stay) & np.isclose(e["hours"], hours) & (e["variable"] == variable)]
    return hit["value"].tolist()


def test_find_table_accepts_gz_and_csv_and_names_paths(tmp_path):
    (tmp_path / "hosp").mkdir()
    assert find_table(tmp_path, "hosp/labevents", required=False) is None
    with pytest.raises(FileNotFoundError) as err:
        find_table(tmp_path, "hosp/labevents")
    msg = str(err.value)
    assert "hosp/labevents" in msg and "labevents.csv.gz" in msg and "labevents.csv" in msg
    (tmp_path / "hosp" / "labevents.csv").write_text("a\n1\n")
    assert find_table(tmp_path, "hosp/labevents").name == "labevents.csv"


def test_explicit_dtypes(root):
    dx = read_table(root, "hosp/diagnoses_icd")
    assert dx["icd_code"].dtype == "string" and "0389" in set(dx["icd_code"])
    assert dx["subject_id"].dtype == "Int64" and dx["icd_version"].dtype == "Int64"
    stays = read_table(root, "icu/icustays")
    assert pd.api.types.is_datetime64_any_dtype(stays["intime"])
    labs = read_table(root, "hosp/labevents")
    assert labs["hadm_id"].dtype == "Int64" and labs["hadm_id"].isna().sum() == 5
    assert labs["value"].dtype == "string" and labs["valuenum"].dtype == "float64"
    pats = read_table(root, "hosp/patients")
    assert pats["dod"].notna().sum() == 1 and pats["dod"].dtype == "datetime64[ns]"


def test_chunked_read_equals_one_shot(root):
    whole = read_table(root, "icu/chartevents")
    cols = list(whole.columns)
    chunks = list(iter_table(root, "icu/chartevents", cols, chunksize=4, parse_time_columns=True))
    assert len(chunks) > 3
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)
    stays = _stays(root)
    small = load_ehr_events(root, stays, chunksize=2)
    big = load_ehr_events(root, stays, chunksize=1_000_000)
    pd.testing.assert_frame_equal(small.events, big.events)
    assert small.dropped == big.dropped


def test_csv_and_csv_gz_give_the_same_events(tmp_path):
    f = MimicFactory.default()
    gz, csv = f.write(tmp_path / "gz"), f.write(tmp_path / "csv", fmt="csv")
    a, b = load_ehr_events(gz, _stays(gz)), load_ehr_events(csv, _stays(csv))
    pd.testing.assert_frame_equal(a.events, b.events)


def test_unit_conversions(root):
    ev = load_ehr_events(root, _stays(root))
    assert _value(ev, 30001, 2, "Temperature") == pytest.approx([37.0])  # 98.6 F
    assert _value(ev, 30001, 3, "Height") == pytest.approx([177.8])  # 70 inch
    assert _value(ev, 30001, 3, "Weight") == pytest.approx([220 * 0.45359237])  # lb
    assert _value(ev, 30001, 4, "Fraction inspired oxygen") == pytest.approx([0.5])  # percent
    assert _value(ev, 30001, 5, "Fraction inspired oxygen") == pytest.approx([0.4])  # fraction
    assert _value(ev, 30001, 1, "Systolic blood pressure") == pytest.approx([115.0])  # mean of 2


def test_impossible_values_dropped_and_counted(root, caplog):
    with caplog.at_level(logging.INFO, logger="clinical_moe.data.ehr"):
        ev = load_ehr_events(root, _stays(root))
    assert _value(ev, 30001, 2, "Heart rate") == []  # 500 bpm
    assert ev.dropped["Heart rate"] == {"unparseable": 0, "out_of_range": 1}
    assert ev.dropped["pH"] == {"unparseable": 0, "out_of_range": 1}  # 9.5
    assert ev.dropped["Glucose"] == {"unparseable": 0, "out_of_range": 0}
    assert any(
        "Heart rate" in r.getMessage() and "1 out-of-range" in r.getMessage()
        for r in caplog.records
    )


def test_gcs_text_to_numbers_and_total(root):
    ev = load_ehr_events(root, _stays(root))
    assert _value(ev, 30001, 6, "Glasgow coma scale eye opening") == [4.0]
    assert _value(ev, 30001, 6, "Glasgow coma scale motor response") == [6.0]
    assert _value(ev, 30001, 6, "Glasgow coma scale verbal response") == [1.0]  # No Response-ETT
    assert _value(ev, 30001, 6, "Glasgow coma scale total") == [11.0]
    assert _value(ev, 30001, 7, "Glasgow coma scale eye opening") == [3.0]
    assert _value(ev, 30001, 7, "Glasgow coma scale total") == []  # eye alone: no total
    assert ev.dropped["Glasgow coma scale eye opening"]["unparseable"] == 1


def test_capillary_refill_text(root):
    ev = load_ehr_events(root, _stays(root))
    assert _value(ev, 30001, 6, "Capillary refill rate") == [1.0]
    assert _value(ev, 30001, 8, "Capillary refill rate") == [0.0]


def test_labs_with_null_hadm_assigned_by_time(root):
    ev = load_ehr_events(root, _stays(root))
    assert _value(ev, 30001, 10, "Glucose") == [140.0]  # hadm_id null, inside the stay
    assert _value(ev, 30002, 3, "White blood cells") == [12.5]
    assert (ev.events.loc[ev.events["variable"] == "Glucose", "value"] != 99.0).all()
    early = load_ehr_events(root, _stays(root), window_start_hours=-6)
    assert _value(early, 30001, -5, "Glucose") == [99.0]  # before intime, reachable on request


def test_hours_since_intime_and_window(root):
    ev = load_ehr_events(root, _stays(root))
    hr = ev.events[(ev.events["stay_id"] == 30001) & (ev.events["variable"] == "Heart rate")]
    assert hr["hours"].tolist() == [1.0]  # -1 h and 50 h are outside [0, 48)
    assert ev.events["hours"].between(0, 48, inclusive="left").all()
    whole = load_ehr_events(root, _stays(root), window_hours=None)
    assert _value(whole, 30001, 50, "Heart rate") == [90.0]


def test_to_arrays_and_time_series(root):
    ev = load_ehr_events(root, _stays(root))
    series = time_series(ev, [30001, 30002, 99999])
    s = series[30001]
    n_vars = len(ev.variables)
    assert s.values.shape == s.obs_mask.shape == (len(s.times), n_vars)
    assert s.times.dtype == np.float32 and s.values.dtype == np.float32
    assert np.all(np.diff(s.times) > 0)
    n_events = int((ev.events["stay_id"] == 30001).sum())
    assert s.obs_mask.sum() == n_events
    assert len(s.times) == ev.events.loc[ev.events["stay_id"] == 30001, "hours"].nunique()
    row = int(np.flatnonzero(s.times == 10.0)[0])
    col = ev.variables.index("Glucose")
    assert s.values[row, col] == 140.0 and s.obs_mask[row].sum() == 1
    assert (s.values[~s.obs_mask] == 0).all()
    assert series[99999].times.shape == (0,) and series[99999].values.shape == (0, n_vars)
    t, v, m = to_arrays(
        pd.DataFrame(
            {
                "hours": [2.0, 1.0, 2.0],
                "variable": ["pH", "pH", "Glucose"],
                "value": [7.4, 7.3, 100.0],
            }
        ),
        ["Glucose", "pH"],
    )
    assert t.tolist() == [1.0, 2.0]
    assert m.tolist() == [[False, True], [True, True]]
    assert v[1].tolist() == pytest.approx([100.0, 7.4])
    with pytest.raises(ValueError, match="Lactate"):
        to_arrays(pd.DataFrame({"hours": [1.0], "variable": ["Lactate"], "value": [1.0]}), ["pH"])


def test_absent_chartevents_warns_and_keeps_labs(tmp_path):
    root = MimicFactory.default().write(tmp_path, omit=("icu/chartevents",))
    with pytest.warns(UserWarning, match="vitals"):
        ev = load_ehr_events(root, _stays(root))
    assert ev.missing_sources == ("chartevents",)
    assert _value(ev, 30001, 10, "Glucose") == [140.0]
    assert set(ev.events["variable"]) <= {"Glucose", "Lactate", "White blood cells", "Creatinine"}


def test_missing_column_names_column_and_file(tmp_path):
    # chartevents is optional (issue 15): a missing column makes it absent, with a warning
    # naming the column and the file, and the labs are kept.
    root = MimicFactory.default().write(tmp_path, drop_columns={"icu/chartevents": ["valuenum"]})
    with pytest.warns(UserWarning, match=r"chartevents\.csv\.gz.*missing_column.*valuenum"):
        ev = load_ehr_events(root, _stays(root))
    assert ev.missing_sources == ("chartevents",)
    assert _value(ev, 30001, 10, "Glucose") == [140.0]


def test_user_variables_file(tmp_path, root):
    base = load_variables()
    assert len(dict.fromkeys(base["variable"])) == 20  # 17 benchmark variables + 3 labs
    mine = tmp_path / "vars.csv"
    base[base["variable"].isin(["Heart rate", "Lactate"])].to_csv(mine, index=False)
    ev = load_ehr_events(root, _stays(root), variables=mine)
    assert ev.variables == ("Heart rate", "Lactate")
    assert set(ev.events["variable"]) == {"Heart rate", "Lactate"}
    bad = pd.concat([base, base.iloc[[0]]])
    bad.to_csv(mine, index=False)
    with pytest.raises(TableError, match="itemid mapped twice"):
        load_variables(mine)


def test_observed_stays(root):
    stays = read_table(root, "icu/icustays")
    seen = observed_stays(root, stays, hours=48)
    assert 30008 not in seen  # only an event at 49 h
    assert {30001, 30002, 30010, 30011} <= seen  # 30010 through a lab only


def test_static_features(root):
    stays = read_table(root, "icu/icustays")
    pats = read_table(root, "hosp/patients")
    adm = read_table(root, "hosp/admissions")
    cohort = stays.merge(pats, on="subject_id")
    st = static_features(cohort, adm)
    assert st.loc[30002, "gender_male"] == 1.0 and st.loc[30001, "gender_male"] == 0.0
    assert st.loc[30003, "age"] == 15.0
    assert st.loc[30009, "admission_type=ELECTIVE"] == 1.0
    onehot = st.filter(like="admission_type=")
    assert (onehot.sum(axis=1) == 1).all()
    assert st.dtypes.eq(np.float32).all()


def test_normalizer_fits_train_only():
    rng = np.random.default_rng(0)
    train = [rng.normal(5, 2, size=(n, 3)) for n in (4, 7)]
    masks = [np.ones_like(x, dtype=bool) for x in train]
    masks[0][:, 2] = False
    norm = EhrNormalizer().fit(train, masks)
    stacked = np.concatenate(train)
    np.testing.assert_allclose(norm.mean_[:2], stacked[:, :2].mean(axis=0))
    np.testing.assert_allclose(norm.std_[:2], stacked[:, :2].std(axis=0))
    np.testing.assert_allclose(norm.mean_[2], train[1][:, 2].mean())  # masked entries ignored
    test = np.array([[100.0, np.nan, 5.0]])
    out = norm.transform(test)
    assert out[0, 1] == 0.0 and out[0, 0] == pytest.approx((100 - norm.mean_[0]) / norm.std_[0])
    assert "mean_" not in repr(norm)
    with pytest.raises(RuntimeError, match="not fitted"):
        EhrNormalizer().transform(test)


def test_aggregating_in_blocks_of_stays_gives_the_one_pass_table():
    """The bounded-memory aggregation (blocks of stays) is bit-identical to one pass."""
    from clinical_moe.data.ehr import _aggregate, _aggregate_part
    from clinical_moe.data.ehr_variables import load_variables, variable_names

    var_map = load_variables(None)
    names = variable_names(var_map)
    index_of = {n: i for i, n in enumerate(names)}
    gcs = [
        index_of[v] for v, k in zip(var_map["variable"], var_map["kind"]) if k.startswith("gcs_")
    ]
    rng = np.random.default_rng(0)
    n = 4000
    events = pd.DataFrame(
        {
            "stay_id": rng.choice(np.arange(30_000, 30_060), n),
            "hours": rng.choice(np.arange(0.0, 12.0, 0.5), n),
            "var_idx": np.where(rng.random(n) < 0.4, rng.choice(gcs, n), rng.choice(len(names), n)),
            "value": rng.normal(10, 3, n),
        }
    )
    derived = var_map.loc[var_map["kind"] == "gcs_total", "variable"].iloc[0]
    events = events[events["var_idx"] != index_of[derived]].reset_index(drop=True)  # raw rows
    one = _aggregate_part(events, names, var_map, index_of)
    blocks = _aggregate(events, names, var_map, index_of, rows_per_part=500)
    assert len(one) > 100 and (one["var_idx"].isin(gcs)).any()
    pd.testing.assert_frame_equal(blocks, one, check_exact=True)
