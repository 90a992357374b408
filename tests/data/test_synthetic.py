"""The synthetic MIMIC-style corpus: real formats, known generative story, determinism.

One small corpus (200 patients, 64-96 px radiographs) is generated once per module and shared.
Expected column lists are written out here on purpose (not imported from the generator), so that a
drift of the generator from the MIMIC schemas fails.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinical_moe.data.synthetic import generate_corpus, oracle_auroc, sample_truth

N_PATIENTS, SEED, IMAGE_SIZE = 200, 7, (64, 96)

EXPECTED_COLUMNS = {
    "mimic-iv/hosp/patients.csv.gz": "subject_id gender anchor_age anchor_year anchor_year_group dod",
    "mimic-iv/hosp/admissions.csv.gz": (
        "subject_id hadm_id admittime dischtime deathtime admission_type admit_provider_id "
        "admission_location discharge_location insurance language marital_status race edregtime "
        "edouttime hospital_expire_flag"
    ),
    "mimic-iv/icu/icustays.csv.gz": (
        "subject_id hadm_id stay_id first_careunit last_careunit intime outtime los"
    ),
    "mimic-iv/hosp/labevents.csv.gz": (
        "labevent_id subject_id hadm_id specimen_id itemid order_provider_id charttime storetime "
        "value valuenum valueuom ref_range_lower ref_range_upper flag priority comments"
    ),
    "mimic-iv/hosp/d_labitems.csv.gz": "itemid label fluid category",
    "mimic-iv/icu/chartevents.csv.gz": (
        "subject_id hadm_id stay_id caregiver_id charttime storetime itemid value valuenum "
        "valueuom warning"
    ),
    "mimic-iv/icu/d_items.csv.gz": (
        "itemid label abbreviation linksto category unitname param_type lownormalvalue "
        "highnormalvalue"
    ),
    "mimic-iv/hosp/diagnoses_icd.csv.gz": "subject_id hadm_id seq_num icd_code icd_version",
    "mimic-cxr/mimic-cxr-2.0.0-metadata.csv.gz": (
        "dicom_id subject_id study_id PerformedProcedureStepDescription ViewPosition Rows Columns "
        "StudyDate StudyTime ProcedureCodeSequence_CodeMeaning ViewCodeSequence_CodeMeaning "
        "PatientOrientationCodeSequence_CodeMeaning"
    ),
    "mimic-cxr/cxr-record-list.csv.gz": "subject_id study_id dicom_id path",
    "mimic-iv-ecg/record_list.csv": "subject_id study_id file_name ecg_time path",
    "mimic-iv-note/note/radiology.csv.gz": (
        "note_id subject_id hadm_id note_type note_seq charttime storetime text"
    ),
    "mimic-iv-note/note/discharge.csv.gz": (
        "note_id subject_id hadm_id note_type note_seq charttime storetime text"
    ),
}
CHEXPERT = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
MEASUREMENTS = (
    ["subject_id", "study_id", "cart_id", "ecg_time"]
    + [f"report_{i}" for i in range(18)]
    + [
        "bandwidth",
        "filtering",
        "rr_interval",
        "p_onset",
        "p_end",
        "qrs_onset",
        "qrs_end",
        "t_end",
        "p_axis",
        "qrs_axis",
        "t_axis",
    ]
)
LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword:Warning")  # inside wfdb
TS = re.compile(r"^(21\d\d|220\d|2210)-\d\d-\d\d \d\d:\d\d:\d\d$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(root, n_patients=N_PATIENTS, seed=SEED, image_size=IMAGE_SIZE, quiet=True)
    return root


def _read(root: Path, rel: str, **kw) -> pd.DataFrame:
    return pd.read_csv(root / rel, **kw)


@pytest.fixture(scope="module")
def tables(corpus) -> dict[str, pd.DataFrame]:
    ids = {c: "Int64" for c in ("subject_id", "hadm_id", "stay_id", "study_id")}
    out = {
        rel: _read(corpus, rel, dtype={**ids, "value": str, "icd_code": str, "text": str})
        for rel in EXPECTED_COLUMNS
    }
    out["truth_stays"] = _read(corpus, "truth/stays.csv.gz")
    out["truth_studies"] = _read(corpus, "truth/studies.csv.gz", dtype={"note_id": str})
    return out


def test_every_table_has_the_mimic_columns(corpus, tables):
    for rel, cols in EXPECTED_COLUMNS.items():
        assert list(tables[rel].columns) == cols.split(), rel
        assert len(tables[rel]) > 0, rel
    labels = pd.read_csv(corpus / "mimic-cxr/mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(labels.columns) == ["subject_id", "study_id"] + CHEXPERT
    values = set(np.unique(labels[CHEXPERT].to_numpy()[~labels[CHEXPERT].isna().to_numpy()]))
    assert values <= {1.0, 0.0, -1.0} and {1.0, 0.0, -1.0} <= values
    mm = pd.read_csv(corpus / "mimic-iv-ecg/machine_measurements.csv")
    assert list(mm.columns) == MEASUREMENTS
    assert (mm[["p_onset", "qrs_axis", "rr_interval"]] == 29999).to_numpy().any()
    for rel in EXPECTED_COLUMNS:
        if rel.endswith(".gz"):
            header = (corpus / rel).read_bytes()[:10]
            assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\x00\x00\x00\x00", rel  # mtime 0


def test_ids_timestamps_and_cohort_structure(tables):
    pat = tables["mimic-iv/hosp/patients.csv.gz"]
    adm = tables["mimic-iv/hosp/admissions.csv.gz"]
    icu = tables["mimic-iv/icu/icustays.csv.gz"]
    assert pat["subject_id"].astype(str).str.fullmatch(r"1\d{7}").all()
    assert pat["subject_id"].is_unique and icu["stay_id"].is_unique and adm["hadm_id"].is_unique
    for col in ("admittime", "dischtime"):
        assert adm[col].str.match(TS).all()
    assert icu["intime"].str.match(TS).all() and icu["outtime"].str.match(TS).all()
    # exclusions the root cohort must apply are present, but rare
    assert 0 < (pat["anchor_age"] < 18).sum() < 0.1 * len(pat)
    assert 0 < (icu["first_careunit"] != icu["last_careunit"]).sum() < 0.2 * len(icu)
    per_adm = icu.groupby("hadm_id").size()
    assert 0 < (per_adm > 1).sum() < 0.2 * len(per_adm)
    assert (pat["subject_id"].map(adm.groupby("subject_id").size()) > 1).any()
    assert 0.15 < (icu["los"] < 2).mean() < 0.7
    # death is consistent across admissions.deathtime, hospital_expire_flag and patients.dod
    died = adm["hospital_expire_flag"] == 1
    assert died.any() and (adm["deathtime"].notna() == died).all()
    death_day = adm.loc[died, ["subject_id", "deathtime"]].merge(pat, on="subject_id")
    assert (death_day["deathtime"].str[:10] == death_day["dod"]).all()
    dx = tables["mimic-iv/hosp/diagnoses_icd.csv.gz"]
    assert set(dx["icd_version"]) == {9, 10}
    assert (dx["icd_code"].str.startswith("0")).any()  # leading zeros kept (e.g. 0389)


def test_chart_and_lab_events_use_real_items_and_units(tables):
    ce = tables["mimic-iv/icu/chartevents.csv.gz"]
    items = set(ce["itemid"])
    assert {220045, 220210, 220277, 223761, 223762, 220739, 223900, 223901} <= items
    assert {226512, 226531} <= items  # weight in kg and in lb
    assert items & {220179, 220050} and items & {220180, 220051}
    gcs = ce[ce["itemid"].isin([220739, 223900, 223901])]
    assert {"To Pain", "Obeys Commands", "Oriented"} <= set(gcs["value"])
    assert gcs["valuenum"].between(0, 6).all()
    temp_f = ce.loc[ce["itemid"] == 223761, "valuenum"]
    temp_c = ce.loc[ce["itemid"] == 223762, "valuenum"]
    assert temp_f.between(93, 110).all() and temp_c.between(34, 43).all()
    hr = ce.loc[ce["itemid"] == 220045, "valuenum"]
    assert (hr == 9999).any() and (hr == 9999).mean() < 0.02
    assert ce["charttime"].str.match(TS).all()
    lab = tables["mimic-iv/hosp/labevents.csv.gz"]
    assert {51301, 50813, 50912} <= set(lab["itemid"])
    assert 0.15 < lab["hadm_id"].isna().mean() < 0.4
    assert lab["labevent_id"].is_unique


def test_every_dicom_is_a_valid_dx_object(corpus, tables):
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    meta = tables["mimic-cxr/mimic-cxr-2.0.0-metadata.csv.gz"]
    records = tables["mimic-cxr/cxr-record-list.csv.gz"]
    assert len(records) == len(meta) and meta["dicom_id"].is_unique
    assert meta["dicom_id"].str.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}").all()
    assert meta["study_id"].astype(str).str.fullmatch(r"5\d{7}").all()
    assert records["path"].str.fullmatch(r"files/p1\d/p1\d{7}/s5\d{7}/[0-9a-f-]{44}\.dcm").all()
    assert set(meta["ViewPosition"]) <= {"AP", "PA", "LATERAL"} and "AP" in set(
        meta["ViewPosition"]
    )
    photometric = set()
    by_id = meta.set_index("dicom_id")
    for rec in records.itertuples():
        ds = pydicom.dcmread(corpus / "mimic-cxr" / rec.path)
        m = by_id.loc[rec.dicom_id]
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
        assert ds.BitsAllocated == 16 and 12 <= ds.BitsStored <= 16
        assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation == 0
        assert ds.SamplesPerPixel == 1 and ds.PatientID == str(rec.subject_id)
        assert ds.ViewPosition == m["ViewPosition"]
        assert (ds.Rows, ds.Columns) == (m["Rows"], m["Columns"])
        assert IMAGE_SIZE[0] <= ds.Rows <= IMAGE_SIZE[1] and 16 <= ds.Columns <= ds.Rows
        assert (
            float(ds.StudyTime) == pytest.approx(m["StudyTime"])
            and int(ds.StudyDate) == m["StudyDate"]
        )
        px = ds.pixel_array
        assert px.shape == (ds.Rows, ds.Columns) and px.max() < 2**ds.BitsStored
        photometric.add(ds.PhotometricInterpretation)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_every_ecg_reads_as_12_leads_500hz(corpus, tables):
    import wfdb

    rl = tables["mimic-iv-ecg/record_list.csv"]
    assert rl["path"].str.fullmatch(r"files/p1\d{3}/p1\d{7}/s\d{8}/\d{8}").all()
    assert (rl["path"].str.split("/").str[-1] == rl["file_name"].astype(str)).all()
    assert rl["ecg_time"].str.match(TS).all()
    for rec in rl.itertuples():
        r = wfdb.rdrecord(str(corpus / "mimic-iv-ecg" / rec.path))
        assert r.sig_name == LEADS and r.fs == 500 and r.p_signal.shape == (5000, 12)
        assert r.fmt == ["16"] * 12 and r.adc_gain == [200.0] * 12 and r.baseline == [0] * 12
        assert r.units == ["mV"] * 12 and np.isfinite(r.p_signal).all()
        assert r.comments == [f"<subject_id>: {rec.subject_id}"]


def test_fast_wfdb_writer_matches_wfdb_wrsamp(tmp_path):
    from clinical_moe.data.synthetic.ecg_wfdb import plan_cardiac, synth_ecg, write_record

    rng = np.random.default_rng(0)
    signal, _ = synth_ecg(rng, plan_cardiac(rng, 1, 0.5, 1))
    args = (10000032, 40689238, 6_700_000_000, signal)
    fast = write_record(tmp_path / "fast", *args)
    ref = write_record(tmp_path / "ref", *args, engine="wfdb")
    for suffix in (".hea", ".dat"):
        a = (tmp_path / "fast" / "mimic-iv-ecg" / (fast + suffix)).read_bytes()
        b = (tmp_path / "ref" / "mimic-iv-ecg" / (ref + suffix)).read_bytes()
        assert a == b, suffix


def test_notes_are_mimic_like_and_leak_only_at_discharge(tables):
    rad = tables["mimic-iv-note/note/radiology.csv.gz"]
    dis = tables["mimic-iv-note/note/discharge.csv.gz"]
    adm = tables["mimic-iv/hosp/admissions.csv.gz"]
    for df, kind in ((rad, "RR"), (dis, "DS")):
        assert (df["note_type"] == kind).all() and df["note_id"].is_unique
        expect = df["subject_id"].astype(str) + f"-{kind}-" + df["note_seq"].astype(str)
        assert (df["note_id"] == expect).all()
        assert df["text"].str.contains("___", regex=False).all()
    assert dis["hadm_id"].notna().all() and rad["hadm_id"].isna().any()
    assert rad["text"].str.contains("no focal consolidation", case=False).any()
    d = dis.merge(adm[["hadm_id", "hospital_expire_flag", "dischtime"]], on="hadm_id")
    died = d["hospital_expire_flag"] == 1
    assert d.loc[died, "text"].str.contains("expired").all()
    assert not d.loc[~died, "text"].str.contains("expired").any()
    assert (d["storetime"] > d["dischtime"]).all()  # written after discharge


def test_pairing_times_and_truth_presence_agree(tables):
    truth = tables["truth_stays"]
    icu = tables["mimic-iv/icu/icustays.csv.gz"][["subject_id", "stay_id", "intime"]]
    meta = tables["mimic-cxr/mimic-cxr-2.0.0-metadata.csv.gz"]
    t = pd.to_datetime(
        meta["StudyDate"].astype(str) + meta["StudyTime"].map(lambda v: f"{v:013.6f}"),
        format="%Y%m%d%H%M%S.%f",
    )
    cxr = pd.DataFrame({"subject_id": meta["subject_id"], "t": t}).merge(icu, on="subject_id")
    delta = (cxr["t"] - pd.to_datetime(cxr["intime"])).dt.total_seconds() / 3600
    inside = cxr[(delta >= 0) & (delta <= 48)]
    assert (~((delta >= 0) & (delta <= 48))).sum() > 0  # some CXRs fall outside the window
    paired = truth["stay_id"].isin(inside["stay_id"])
    assert (paired == (truth["has_cxr"] == 1)).mean() > 0.97
    rad = tables["mimic-iv-note/note/radiology.csv.gz"].merge(icu, on="subject_id")
    hours = (
        pd.to_datetime(rad["charttime"]) - pd.to_datetime(rad["intime"])
    ).dt.total_seconds() / 3600
    assert ((hours > 0) & (hours < 48)).any() and (hours > 48).any()


def _lung_mean(ds) -> float:
    """Mean density (bright = dense, per-image 1-99 % normalized) inside the shrunken lung fields."""
    from clinical_moe.data.synthetic.cxr_dicom import LUNG_FIELDS

    img = ds.pixel_array.astype(float)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = img.max() - img
    lo, hi = np.percentile(img, [1, 99])
    img = np.clip((img - lo) / (hi - lo), 0, 1)
    y = np.linspace(-1, 1, img.shape[0])[:, None]
    x = np.linspace(-1, 1, img.shape[1])[None, :]
    mask = np.zeros(img.shape, bool)
    for cx, cy, rx, ry in LUNG_FIELDS:
        mask |= ((x - cx) / (0.7 * rx)) ** 2 + ((y - cy) / (0.7 * ry)) ** 2 < 1
    return float(img[mask].mean())


def test_pulmonary_brightens_the_lung_fields(corpus, tables):
    import pydicom
    from sklearn.metrics import roc_auc_score

    studies = tables["truth_studies"]
    cxr = studies[(studies["modality"] == "cxr") & (studies["view"] != "LATERAL")]
    cxr = cxr.merge(tables["truth_stays"][["stay_id", "pulmonary"]], on="stay_id")
    paths = tables["mimic-cxr/cxr-record-list.csv.gz"].set_index("dicom_id")["path"]
    means = np.array(
        [_lung_mean(pydicom.dcmread(corpus / "mimic-cxr" / paths[d])) for d in cxr["dicom_id"]]
    )
    pul = cxr["pulmonary"].to_numpy()
    assert 15 < pul.sum() < len(pul) - 15
    assert means[pul == 1].mean() > means[pul == 0].mean() + 0.03
    assert roc_auc_score(pul, means) > 0.75


def _ecg_features(signal: np.ndarray) -> tuple[float, float]:
    """(largest |ST deviation| over leads in mV, RR coefficient of variation) of one ECG."""
    from scipy.signal import find_peaks

    lead2 = signal[:, 1] - np.median(signal[:, 1])
    peaks, _ = find_peaks(lead2, height=0.5 * lead2.max(), distance=125)
    peaks = peaks[(peaks > 150) & (peaks < 4900)]
    base = np.stack([signal[p - 125 : p - 110].mean(0) for p in peaks])  # PR-ish, before P
    st = np.stack([signal[p + 45 : p + 60].mean(0) for p in peaks])  # 90-120 ms after R
    rr = np.diff(peaks)
    return float(np.abs(np.median(st - base, 0)).max()), float(rr.std() / rr.mean())


def test_cardiac_changes_the_ecg_signal(corpus, tables):
    import wfdb
    from sklearn.metrics import roc_auc_score

    rl = tables["mimic-iv-ecg/record_list.csv"].merge(
        tables["truth_studies"][["study_id", "stay_id"]], on="study_id"
    )
    rl = rl.merge(tables["truth_stays"][["stay_id", "cardiac"]], on="stay_id")
    feats = np.array(
        [
            _ecg_features(wfdb.rdrecord(str(corpus / "mimic-iv-ecg" / p)).p_signal)
            for p in rl["path"]
        ]
    )
    card = rl["cardiac"].to_numpy()
    assert 15 < card.sum() < len(card) - 15
    st, cv = feats[:, 0], feats[:, 1]
    assert np.median(st[card == 1]) > np.median(st[card == 0])
    assert cv[card == 1].mean() > cv[card == 0].mean()
    assert roc_auc_score(card, st / 0.1 + cv / 0.05) > 0.8


def test_ehr_and_notes_carry_severity_and_infection(tables):
    stays = tables["truth_stays"]
    ce = tables["mimic-iv/icu/chartevents.csv.gz"]
    temp = ce[ce["itemid"].isin([223761, 223762])].copy()
    temp["c"] = np.where(
        temp["itemid"] == 223761, (temp["valuenum"] - 32) * 5 / 9, temp["valuenum"]
    )
    per = stays.merge(temp.groupby("stay_id")["c"].mean().rename("temp"), on="stay_id")
    inf = per["infection"] == 1
    assert per.loc[inf, "temp"].mean() > per.loc[~inf, "temp"].mean() + 0.8
    lab = tables["mimic-iv/hosp/labevents.csv.gz"]
    wbc = (
        lab[(lab["itemid"] == 51301) & lab["hadm_id"].notna()].groupby("hadm_id")["valuenum"].mean()
    )
    per = stays.merge(wbc.rename("wbc"), left_on="hadm_id", right_index=True)
    assert (
        per.loc[per["infection"] == 1, "wbc"].mean()
        > per.loc[per["infection"] == 0, "wbc"].mean() + 4
    )
    hr = ce[(ce["itemid"] == 220045) & (ce["valuenum"] < 300)].groupby("stay_id")["valuenum"].mean()
    per = stays.merge(hr.rename("hr"), on="stay_id")
    assert np.corrcoef(per["severity"], per["hr"])[0, 1] > 0.4
    # cardiac is unique to the ECG: the EHR heart rate does not carry it
    assert (
        abs(per.loc[per["cardiac"] == 1, "hr"].mean() - per.loc[per["cardiac"] == 0, "hr"].mean())
        < 6
    )
    notes = tables["truth_studies"].query("modality == 'notes'")[["note_id", "stay_id"]]
    rad = (
        tables["mimic-iv-note/note/radiology.csv.gz"]
        .merge(notes, on="note_id")
        .merge(stays[["stay_id", "severity", "pulmonary"]], on="stay_id")
    )
    severe = rad["text"].str.contains("critically ill|intubated", case=False)
    assert severe[rad["severity"] > 1].mean() > severe[rad["severity"] < 0].mean() + 0.3
    chest = rad["text"].str.startswith("EXAMINATION:  CHEST")
    pneu = rad["text"].str.contains("concerning for pneumonia")
    assert (
        pneu[chest & (rad["pulmonary"] == 1)].mean()
        > pneu[chest & (rad["pulmonary"] == 0)].mean() + 0.3
    )


def test_oracle_auroc_prevalence_and_missingness_not_at_random():
    stays = sample_truth(5000, seed=3)
    auc = oracle_auroc(stays)
    cohort = stays[stays["in_ihm48"] == 1]
    assert 0.85 <= auc < 1.0
    assert 0.12 < cohort["label_mortality"].mean() < 0.35
    root = stays[stays["in_root_cohort"] == 1]
    assert 0.25 < root["has_cxr"].mean() < 0.45
    assert 0.4 < root["has_ecg"].mean() < 0.65
    assert 0.75 < root["has_notes"].mean() < 0.95
    by_pul = root.groupby("pulmonary")["has_cxr"].mean()
    by_card = root.groupby("cardiac")["has_ecg"].mean()
    assert by_pul[1] > by_pul[0] + 0.15 and by_card[1] > by_card[0] + 0.2
    # the synergy: pulmonary x infection is far riskier than either alone
    risk = cohort.groupby(["pulmonary", "infection"])["true_risk"].mean()
    assert risk[(1, 1)] - risk[(0, 0)] > 2 * (
        (risk[(1, 0)] - risk[(0, 0)]) + (risk[(0, 1)] - risk[(0, 0)])
    )
    assert 0.2 < stays["label_los3"].mean() < 0.6 and 0.02 < stays["label_los7"].mean() < 0.2


def test_sample_truth_matches_the_written_truth(tables):
    fast = sample_truth(N_PATIENTS, seed=SEED)
    written = tables["truth_stays"]
    assert list(fast.columns) == list(written.columns)
    # observed_risk: sample_truth renders no study and no report, so its CXR findings, ECG heart
    # rates and note bands are stand-in draws; the ceiling agrees exactly wherever a stay has none
    # of them (issue 12)
    bare = (written[["n_cxr", "n_ecg", "n_notes"]].sum(axis=1) == 0).to_numpy()
    assert bare.sum() >= 10
    np.testing.assert_allclose(
        fast["observed_risk"].to_numpy()[bare], written["observed_risk"].to_numpy()[bare]
    )
    assert not np.allclose(fast["observed_risk"], written["observed_risk"])
    assert np.isfinite(written["observed_risk"]).all()
    pd.testing.assert_frame_equal(
        fast.reset_index(drop=True).drop(columns="observed_risk"),
        written.drop(columns="observed_risk"),
        check_dtype=False,
        check_exact=False,
        rtol=1e-9,
    )


def test_the_truth_records_what_each_radiology_report_says(tables):
    """``band`` and ``mentions_*`` in truth/studies are the report's own wording (issue 12).

    The observer's attributions read them, so a drift between the text and these columns would
    score the heads against evidence they never saw.
    """
    from clinical_moe.data.synthetic.notes_text import INDICATIONS

    notes = tables["truth_studies"]
    notes = notes[notes["modality"] == "notes"].set_index("note_id")
    text = tables["mimic-iv-note/note/radiology.csv.gz"].set_index("note_id")["text"]
    assert len(notes) == len(text) > 50 and set(notes.index) == set(text.index)
    bands = notes["band"].astype(int)
    assert set(bands) == {0, 1, 2}
    for note_id, band in bands.items():
        said = text[note_id].split("INDICATION:", 1)[1]
        assert any(phrase in said for phrase in INDICATIONS[band]), (note_id, band)
    chest = notes[notes["mentions_opacity"].notna()]
    assert 0 < len(chest) < len(notes)  # other exams have no mentions
    yes = lambda c: chest[c].astype(str).str.lower().isin(["true", "1"])  # noqa: E731
    says_opacity = text[chest.index].str.contains("opacity, concerning for pneumonia")
    says_effusion = text[chest.index].str.contains(r"Small \w+ pleural effusion\.")
    assert yes("mentions_opacity").any() and yes("mentions_effusion").any()
    assert (says_opacity == yes("mentions_opacity")).all()
    assert (says_effusion == yes("mentions_effusion")).all()


def test_the_observer_reads_the_recorded_reports(corpus, tables):
    """A written corpus has no stand-in channel left, and its report bands move the ceiling."""
    from clinical_moe.data.synthetic.observer import ceiling_risk, evidence_from_truth

    stays, studies = tables["truth_stays"], tables["truth_studies"]
    ev = evidence_from_truth(stays, studies)
    assert ev.stand_ins == ()
    np.testing.assert_array_equal(ev.bands.sum(1), stays["n_notes"].to_numpy())
    assert (ev.mentions.sum(1) == stays["n_cxr"].clip(upper=3)).all()
    # the notes-only pattern (EHR hidden): reports read as critical raise the ceiling
    rows = (stays["n_notes"] > 0).to_numpy()
    shown = np.zeros((int(rows.sum()), 4), bool)
    shown[:, 3] = True

    def notes_only(band) -> np.ndarray:
        ev = evidence_from_truth(stays[rows], studies.assign(band=band))
        return ceiling_risk(ev, shown, "pattern", pattern=["notes"])[0]

    recorded = notes_only(studies["band"])
    assert (notes_only(2) > notes_only(0) + 0.05).all()
    assert not np.allclose(recorded, notes_only(1))


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    kw = {"n_patients": 30, "seed": 11, "image_size": (32, 40), "quiet": True, "shard_size": 8}
    generate_corpus(tmp_path / "a", workers=1, **kw)
    generate_corpus(tmp_path / "b", workers=2, **kw)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.endswith(".dcm") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    generate_corpus(tmp_path / "c", workers=1, **{**kw, "seed": 12})
    c = _tree(tmp_path / "c")
    assert gzip.decompress(a["mimic-iv/icu/chartevents.csv.gz"]) != gzip.decompress(
        c["mimic-iv/icu/chartevents.csv.gz"]
    )
    with pytest.raises(FileExistsError):
        generate_corpus(tmp_path / "a", workers=1, **kw)


def test_cli_registers_and_runs(tmp_path, capsys):
    import argparse

    from pipelines import synth

    parser = argparse.ArgumentParser()
    synth.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "synth",
            "--out",
            str(tmp_path / "cli"),
            "--n-patients",
            "6",
            "--seed",
            "1",
            "--image-size",
            "32",
            "40",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert args.func is synth.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "patients 6" in out and "oracle AUROC" in out
    assert (tmp_path / "cli" / "mimic-iv" / "hosp" / "patients.csv.gz").exists()
