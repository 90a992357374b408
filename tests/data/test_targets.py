"""Modality-native per-event targets: CheXpert findings per radiograph, machine statements and
intervals per ECG, checked against the corpus files, the truth, hand-made tables and a real row."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinical_moe.config import ConfigError, load_config
from clinical_moe.data.cache import _fingerprint, build_cache
from clinical_moe.data.dataset import CachedDataset, Collator
from clinical_moe.data.ecg import read_machine_measurements
from clinical_moe.data.event_targets import cxr_event_targets
from clinical_moe.data.plan import plan_stays
from clinical_moe.data.store import CacheStore
from clinical_moe.data.targets import (
    CHEXPERT_FINDINGS,
    ECG_INTERVALS,
    ECG_STATEMENTS,
    chexpert_targets,
    ecg_targets,
    parse_statements,
    target_names,
)

pytestmark = pytest.mark.xdist_group("synth_targets")
N_EVENTS = 2  # slots per stay: stays with one event have a padded slot


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("targets_corpus") / "corpus"
    generate_corpus(root, n_patients=120, seed=3, workers=1, image_size=(48, 64), quiet=True)
    return root


def _cfg(root: Path, cache: Path | str | None = None, **data):
    cache = root.parent / "cache" if cache is None else cache  # (its decode store beside it)
    overrides = {
        "data.root": str(root),
        "data.cache_dir": str(cache),
        "data.workers": 1,
        "data.image_size": 32,
        "data.ecg_samples": 250,
        "data.note_max_len": 32,
        "data.note_vocab": 200,
        "data.max_events": N_EVENTS,
        **{f"data.{k}": v for k, v in data.items()},
    }
    return load_config({}, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def cache(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("targets") / "cache"
    build_cache(_cfg(corpus, path), quiet=True, shard_size=16)
    return path


def _slots(corpus: Path, cache: Path, modality: str) -> pd.DataFrame:
    """One row per real event slot of the cache: its targets and the truth study it came from.

    Slots are matched to the truth's studies of the same stay by time (hours since intime).
    """
    store = CacheStore(cache)
    stays = pd.read_csv(corpus / "truth" / "stays.csv.gz", parse_dates=["intime"])
    studies = pd.read_csv(corpus / "truth" / "studies.csv.gz", parse_dates=["time"])
    studies = studies[studies["modality"] == modality].drop_duplicates("study_id")
    studies = studies.merge(stays[["stay_id", "intime"]], on="stay_id")
    studies["hours"] = (studies["time"] - studies["intime"]) / pd.Timedelta(hours=1)
    rows = []
    for r in store.manifest[store.manifest[f"has_{modality}"]].itertuples():
        d = store.read(modality, r.shard, r.row)
        cands = studies[studies["stay_id"] == r.stay_id]
        for k in np.flatnonzero(d["event_mask"]):
            gap = (cands["hours"] - d["times"][k]).abs()
            assert gap.min() < 0.02, f"stay {r.stay_id}: slot {k} matches no truth study"
            study = cands.loc[gap.idxmin()]
            rows.append({"stay_id": r.stay_id, **study.to_dict(), "targets": d["targets"][k]})
    return pd.DataFrame(rows)


def test_cxr_targets_match_the_chexpert_file_and_the_truth(corpus, cache):
    slots = _slots(corpus, cache, "cxr")
    assert len(slots) > 10
    t = np.stack(slots["targets"].to_numpy())  # (n, 14)
    col = {n: k for k, n in enumerate(CHEXPERT_FINDINGS)}
    # truth findings -> labels, as the generator relates them
    np.testing.assert_array_equal(t[:, col["Lung Opacity"]], slots["opacity"].astype(float))
    np.testing.assert_array_equal(t[:, col["Pleural Effusion"]], slots["effusion"].astype(float))
    opaque = slots["opacity"].astype(bool).to_numpy()
    assert (t[~opaque, col["Pneumonia"]] == 0).all()  # blank -> 0 by default
    assert np.isnan(t[opaque, col["Pneumonia"]]).any()  # some uncertain -> ignored
    # the file, study by study, under the default policy (uncertain ignored, blank zero)
    raw = pd.read_csv(corpus / "mimic-cxr" / "mimic-cxr-2.0.0-chexpert.csv.gz")
    raw = raw.set_index("study_id").loc[slots["study_id"].astype(int), list(CHEXPERT_FINDINGS)]
    want = raw.to_numpy().copy()
    want[want == -1] = np.nan
    want[np.isnan(raw.to_numpy())] = 0.0
    np.testing.assert_array_equal(t, want.astype(np.float32))


def test_ecg_targets_match_the_machine_report_and_the_truth(corpus, cache):
    slots = _slots(corpus, cache, "ecg")
    assert len(slots) > 10
    store = CacheStore(cache)
    names = store.target_names["ecg"]
    assert names == target_names()["ecg"]
    t = np.stack(slots["targets"].to_numpy())  # (n, 12)
    col = {n: k for k, n in enumerate(names)}
    af = slots["af"].astype(bool).to_numpy()
    np.testing.assert_array_equal(t[:, col["atrial_fibrillation"]], af.astype(float))
    np.testing.assert_array_equal(t[:, col["sinus_rhythm"]], (~af).astype(float))
    elevation = slots["st"].isin(["anterior", "inferior"]).to_numpy()
    stated = t[:, col["st_elevation"]] == 1
    assert not (stated & ~elevation).any() and stated[elevation].mean() > 0.5
    wide = slots["wide_qrs"].astype(bool).to_numpy()
    assert not ((t[:, col["bundle_branch_block"]] == 1) & ~wide).any()
    # intervals: de-standardised QRS width separates wide from narrow; AF has no PR interval
    stats = store.summary["target_stats"]["ecg"]["qrs_duration"]
    qrs = t[:, col["qrs_duration"]] * stats["std"] + stats["mean"]
    known = np.isfinite(qrs)
    assert ((qrs[known] > 150) == wide[known]).all()
    assert np.isnan(t[af, col["pr_interval"]]).all()
    # tachycardia statements agree with the cart's own heart rate
    hr = store.summary["target_stats"]["ecg"]["heart_rate"]
    rate = t[:, col["heart_rate"]] * hr["std"] + hr["mean"]
    fast = np.isfinite(rate) & (rate > 102)
    assert (t[fast, col["tachycardia"]] == 1).all()


def test_padded_slots_and_absent_stays_are_nan_and_collate_stacks_targets(cache):
    store = CacheStore(cache)
    for m in ("cxr", "ecg"):
        rows = store.manifest[store.manifest[f"has_{m}"]]
        single = 0
        for r in rows.itertuples():
            d = store.read(m, r.shard, r.row)
            assert d["targets"].shape == (N_EVENTS, len(store.target_names[m]))
            assert d["targets"].dtype == np.float32
            assert np.isnan(d["targets"][~d["event_mask"]]).all()
            single += int(not d["event_mask"].all())
        assert single > 0, f"{m}: no stay with a padded slot to check"
    ds = CachedDataset(cache, "train")
    batch = Collator(ds)([ds[i] for i in range(12)])
    for m in ("cxr", "ecg"):
        tg = batch.inputs[m]["targets"]
        assert tg.shape == (12, N_EVENTS, len(store.target_names[m]))
        absent = ~batch.present[:, ds.modalities.index(m)]
        assert absent.any() and tg[absent].isnan().all()
        real = batch.inputs[m]["event_mask"]
        assert not tg[real].isnan().all()


def test_summary_names_kinds_and_counts_without_report_text(cache):
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["targets"] == target_names()
    kinds = summary["target_kinds"]["ecg"]
    # summary.json sorts keys: the column order is the one of summary["targets"]
    assert {k for k, v in kinds.items() if v == "continuous"} == set(ECG_INTERVALS)
    assert {k for k, v in kinds.items() if v == "binary"} == set(ECG_STATEMENTS)
    assert set(summary["target_kinds"]["cxr"].values()) == {"binary"}
    assert summary["target_counts"]["cxr"]["events_without_label_row"] == 0
    text = json.dumps(summary)
    for statement in ("Sinus rhythm", "Atrial fibrillation", "bundle branch block", "ECG"):
        assert statement not in text


def test_uncertain_policy_switches_the_uncertain_labels():
    labels = pd.DataFrame(
        {"subject_id": [1, 1], "study_id": [5, 6], "Pneumonia": [-1.0, np.nan], "Edema": [1.0, 0.0]}
    )
    labels = labels.reindex(columns=["subject_id", "study_id", *CHEXPERT_FINDINGS])  # blanks
    got = {
        u: chexpert_targets(labels, uncertain=u)["Pneumonia"].tolist()
        for u in ("ignore", "ones", "zeros")
    }
    assert np.isnan(got["ignore"][0]) and got["ones"][0] == 1.0 and got["zeros"][0] == 0.0
    assert {g[1] for g in got.values()} == {0.0}  # blank -> 0 whatever the uncertain policy
    ignored = chexpert_targets(labels, blank="ignore")
    assert np.isnan(ignored.loc[(1, 6), "Pneumonia"]) and ignored.loc[(1, 6), "Edema"] == 0.0


def test_uncertain_policy_reaches_the_plan_and_the_fingerprint(corpus):
    plans = {
        u: plan_stays(_cfg(corpus, chexpert_uncertain=u), quiet=True) for u in ("ignore", "ones")
    }
    col = CHEXPERT_FINDINGS.index("Pneumonia")
    ign = np.concatenate(list(plans["ignore"].targets["cxr"].values()))[:, col]
    ones = np.concatenate(list(plans["ones"].targets["cxr"].values()))[:, col]
    assert np.isnan(ign).any() and not np.isnan(ones).any()
    assert (ones[np.isnan(ign)] == 1.0).all()
    fps = {_fingerprint(_cfg(corpus, chexpert_uncertain=u)) for u in ("ignore", "ones", "zeros")}
    fps.add(_fingerprint(_cfg(corpus, native_targets=False)))
    assert len(fps) == 4
    with pytest.raises(ConfigError, match="chexpert_uncertain"):
        _cfg(corpus, chexpert_uncertain="maybe")


def test_missing_label_file_means_no_targets_and_a_warning(corpus):
    # the synthetic corpus writes no NegBio file
    with pytest.warns(UserWarning, match="mimic-cxr-2.0.0-negbio"):
        plan = plan_stays(_cfg(corpus, cxr_label_source="negbio"), quiet=True)
    assert "cxr" not in plan.targets and "ecg" in plan.targets
    assert plan.summary["target_counts"]["cxr"]["labels_file"] is None
    assert "cxr" not in plan.summary["targets"]


def test_study_without_a_label_row_gets_a_nan_row(tmp_path):
    labels = pd.DataFrame({"subject_id": [10000001], "study_id": [50000001], "Lung Opacity": [1.0]})
    labels.to_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    pairs = pd.DataFrame(
        {
            "stay_id": [1, 1, 2],
            "subject_id": [10000001, 10000001, 10000002],
            "study_id": [50000001, 50000001, 50000009],
        }
    )
    cohort = pd.DataFrame({"stay_id": [1, 2], "split": ["train", "test"]})
    summary = {"targets": {}, "target_kinds": {}, "target_stats": {}, "target_counts": {}}
    cfg = _cfg(tmp_path)
    values = cxr_event_targets(pairs, tmp_path, cohort, cfg.data, summary)
    col = CHEXPERT_FINDINGS.index("Lung Opacity")
    assert values.shape == (3, 14)
    assert (values[:2, col] == 1.0).all() and (values[:2, np.arange(14) != col] == 0).all()
    assert np.isnan(values[2]).all()
    assert summary["target_counts"]["cxr"]["events_without_label_row"] == 1


@pytest.mark.parametrize(
    ("statement", "found"),
    [
        ("Sinus rhythm", {"sinus_rhythm"}),
        ("Marked sinus bradycardia", {"sinus_rhythm", "bradycardia"}),
        (
            "Atrial fibrillation with rapid ventricular response",
            {"atrial_fibrillation", "tachycardia"},
        ),
        ("Atrial fibrillation is no longer present", set()),
        ("Right bundle branch block", {"bundle_branch_block"}),
        ("Incomplete right bundle branch block", set()),
        ("Nonspecific intraventricular conduction delay", {"bundle_branch_block"}),
        ("Anterior ST elevation - possible acute infarct", {"st_elevation"}),
        ("** ** ACUTE MI / STEMI ** **", {"st_elevation"}),
        ("ST-T changes may be due to myocardial ischemia", {"st_depression_ischemia"}),
        ("ST depression - possible ischemia", {"st_depression_ischemia"}),
        ("Abnormal ECG", {"abnormal_ecg"}),
        ("Borderline ECG", set()),
    ],
)
def test_statement_vocabulary(statement, found):
    frame = pd.DataFrame({"report_0": [statement], "report_1": [None]})
    row = parse_statements(frame).iloc[0]
    assert {n for n, v in row.items() if v == 1.0} == found


def test_blank_report_is_unknown_and_sentinels_are_missing():
    frame = pd.DataFrame(
        {
            "study_id": [1, 2],
            "report_0": [None, "Sinus rhythm"],
            "report_1": ["  ", None],
            "rr_interval": [800.0, np.nan],
            "qrs_onset": [200.0, 200.0],
            "qrs_end": [300.0, 900.0],
        }
    )
    t = ecg_targets(frame)
    assert t.loc[1, list(ECG_STATEMENTS)].isna().all()
    assert t.loc[2, "sinus_rhythm"] == 1.0
    assert t.loc[1, "heart_rate"] == pytest.approx(75.0) and np.isnan(t.loc[2, "heart_rate"])
    assert t.loc[1, "qrs_duration"] == 100.0 and np.isnan(
        t.loc[2, "qrs_duration"]
    )  # 700 ms: implausible


def test_real_machine_measurements_row(samples_dir):
    path = samples_dir / "ecg" / "mimic-iv-ecg" / "machine_measurements_header_and_1row.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found (the real MIMIC-IV-ECG measurements row)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = ecg_targets(read_machine_measurements(path)).loc[40689238]
    on = {n for n in ECG_STATEMENTS if t[n] == 1.0}
    assert on == {
        "sinus_rhythm"
    }  # "Sinus rhythm", "Possible right atrial abnormality", "Borderline ECG"
    assert t["heart_rate"] == pytest.approx(60000 / 659, rel=1e-5)
    assert (t["pr_interval"], t["qrs_duration"], t["qt_interval"]) == (130.0, 88.0, 348.0)


def test_old_caches_without_targets_still_read_and_collate(tmp_path):
    from clinical_moe.testing import write_toy_cache

    write_toy_cache(tmp_path, n_stays=30, seed=0, shard_size=16)
    ds = CachedDataset(tmp_path, "train")
    assert ds.store.target_names == {}
    batch = Collator(ds)([ds[i] for i in range(4)])
    assert all("targets" not in v for v in batch.inputs.values())


def test_corpus_reports_name_the_af_rate_and_devices_keep_no_finding():
    from clinical_moe.data.synthetic.cxr_tables import chexpert_row
    from clinical_moe.data.synthetic.ecg_wfdb import machine_report

    rng = np.random.default_rng(0)
    ph = {"af": True, "wide_qrs": False, "st": None, "bbb": None}
    for rr, rate in ((500.0, "tachycardia"), (1200.0, "bradycardia"), (800.0, None)):
        report = machine_report(rng, ph, {"rr": rr})
        row = parse_statements(
            pd.DataFrame({f"report_{i}": [s or None] for i, s in enumerate(report)})
        )
        on = {n for n, v in row.iloc[0].items() if v == 1.0}
        assert on == {"atrial_fibrillation", "abnormal_ecg"} | ({rate} if rate else set())
    findings = dict.fromkeys(["opacity", "effusion", "atelectasis", "cardiomegaly"], False)
    row = chexpert_row(rng, {**findings, "devices": True})
    assert row["Support Devices"] == 1.0 and row["No Finding"] == 1.0  # devices are no pathology
    row = chexpert_row(rng, {**findings, "devices": False, "opacity": True})
    assert row["Lung Opacity"] == 1.0 and np.isnan(row["No Finding"])


def _factory_with_cxr(tmp_path: Path) -> Path:
    """The hand-made MIMIC-IV tables plus three radiographs: stay 30001 gets a labelled and an
    unlabelled study, stay 30002 a study whose labels are all blank."""
    try:
        from tests.data.mimic_factory import MimicFactory
    except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
        from mimic_factory import MimicFactory

    MimicFactory.default().write(tmp_path / "mimic-iv")
    cxr = tmp_path / "mimic-cxr"
    cxr.mkdir()
    images = [  # (subject, study, date, time): intimes 2150-01-01 / 2151-02-01 08:00
        (10001, 50000001, "21500101", 100000.0),
        (10001, 50000002, "21500101", 180000.0),
        (10002, 50000003, "21510201", 130000.0),
    ]
    pd.DataFrame(
        [
            {"dicom_id": f"d{study}", "subject_id": subj, "study_id": study, "ViewPosition": "AP"}
            | {"StudyDate": date, "StudyTime": time}
            for subj, study, date, time in images
        ]
    ).to_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    labels = pd.DataFrame(
        {"subject_id": [10001, 10002], "study_id": [50000001, 50000003]}
        | {"Lung Opacity": [1.0, np.nan], "Pneumonia": [-1.0, np.nan]}
    )
    labels.to_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    return tmp_path


@pytest.mark.parametrize("blank", ["zero", "ignore"])
def test_hand_made_tables_give_per_event_rows(tmp_path, blank):
    root = _factory_with_cxr(tmp_path)
    cfg = _cfg(root, modalities=["ehr", "cxr"], chexpert_blank=blank)
    plan = plan_stays(cfg, quiet=True)
    assert [Path(p).stem for p, _ in plan.cxr[30001]] == ["d50000001", "d50000002"]
    first, unlabelled = plan.targets["cxr"][30001]  # (14,) each, oldest first
    col = {n: k for k, n in enumerate(CHEXPERT_FINDINGS)}
    assert first[col["Lung Opacity"]] == 1.0 and np.isnan(first[col["Pneumonia"]])  # uncertain
    assert np.isnan(unlabelled).all()  # the study has no label row
    blanks = plan.targets["cxr"][30002][0]
    assert (blanks == 0).all() if blank == "zero" else np.isnan(blanks).all()
    assert plan.summary["target_counts"]["cxr"]["events_without_label_row"] == 1
