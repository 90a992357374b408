"""Tests of the ECG loader: real PTB-XL / MIMIC-IV-ECG files, hand-made WFDB records, bad records,
the MIMIC-IV-ECG CSV indexes and pairing."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

wfdb = pytest.importorskip("wfdb")
from scipy.io import savemat  # noqa: E402
from scipy.signal import resample_poly  # noqa: E402

from clinical_moe.data.ecg import (  # noqa: E402
    CANONICAL_LEADS,
    canonical_lead_order,
    pair_ecg,
    read_ecg,
    read_machine_measurements,
    read_record_list,
)
from clinical_moe.data.errors import LoaderError  # noqa: E402

# wfdb 4.3 uses a pandas keyword that pandas 3.1 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.drop")

MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
# Each canonical lead gets its own amplitude, so a swapped lead is visible.
AMPLITUDE = {lead: 0.1 * (i + 1) for i, lead in enumerate(CANONICAL_LEADS)}


def sines(names, fs, seconds=10.0, freq=3.0):
    """(T, n) signal in mV: lead L is AMPLITUDE[L] * sin(2 pi freq t)."""
    t = np.arange(int(round(fs * seconds))) / fs
    amps = np.array([AMPLITUDE[_canon(n)] for n in names])
    return np.sin(2 * np.pi * freq * t)[:, None] * amps[None, :]


def _canon(name):
    return {lead.lower(): lead for lead in CANONICAL_LEADS}[name.lower()]


def expected_sine(fs_out=500, seconds=10.0, freq=3.0):
    t = np.arange(int(fs_out * seconds)) / fs_out
    return np.array([AMPLITUDE[lead] for lead in CANONICAL_LEADS])[:, None] * np.sin(
        2 * np.pi * freq * t
    )


def write_record(folder, name, signal, fs, names, units="mV", gain=200.0):
    wfdb.wrsamp(
        name,
        fs=fs,
        units=[units] * len(names),
        sig_name=list(names),
        p_signal=signal,
        fmt=["16"] * len(names),
        adc_gain=[gain] * len(names),
        baseline=[0] * len(names),
        write_dir=str(folder),
    )
    return folder / name


def assert_loader_error(excinfo, path, reason):
    err = excinfo.value
    assert err.reason == reason, str(err)
    assert str(path) in str(err) and err.path == str(path)


# ----------------------------------------------------------------------------- real samples


@pytest.mark.samples
def test_ptbxl_record(samples_dir):
    base = samples_dir / "ecg" / "ptb-xl" / "00001_lr"
    rec = read_ecg(base)
    assert rec.signal.shape == (12, 5000) and rec.signal.dtype == np.float32
    assert rec.fs == 500 and rec.source_fs == 100 and rec.leads == CANONICAL_LEADS
    assert np.isfinite(rec.signal).all()
    assert 0.2 < np.abs(rec.signal).max() < 10.0 and (rec.signal.std(axis=1) > 0.01).all()
    raw = wfdb.rdrecord(str(base))
    assert raw.sig_name[3:6] == ["AVR", "AVL", "AVF"]
    for lead in ("aVL", "aVF", "V6"):
        column = [n.lower() for n in raw.sig_name].index(lead.lower())
        ref = resample_poly(raw.p_signal[:, column], 5, 1)[:5000]
        got = rec.signal[CANONICAL_LEADS.index(lead)]
        np.testing.assert_allclose(got[50:-50], ref[50:-50], atol=1e-4)
    assert not np.allclose(rec.signal[4], rec.signal[5])  # aVL and aVF differ in this record
    assert np.allclose(read_ecg(f"{base}.dat").signal, rec.signal)


@pytest.mark.samples
def test_mimic_header_without_signal(samples_dir):
    base = samples_dir / "ecg/mimic-iv-ecg/files/p1000/p10000032/s40689238/40689238"
    header = wfdb.rdheader(str(base))
    assert header.fs == 500 and header.sig_len == 5000 and header.sig_name == MIMIC_ORDER
    order = canonical_lead_order(header.sig_name)
    assert [header.sig_name[i] for i in order] == list(CANONICAL_LEADS)
    assert order[4] == 5 and order[5] == 4  # aVL is stored sixth, aVF fifth
    for given in (base, f"{base}.hea"):
        with pytest.raises(LoaderError) as excinfo:
            read_ecg(given)
        assert_loader_error(excinfo, f"{base}.dat", "missing_file")


@pytest.mark.samples
def test_mimic_record_list_row(samples_dir):
    frame = read_record_list(samples_dir / "ecg" / "mimic-iv-ecg")
    assert len(frame) == 1
    row = frame.iloc[0]
    assert (row.subject_id, row.study_id, row.file_name) == (10000032, 40689238, "40689238")
    assert row.ecg_time == pd.Timestamp("2180-07-23 08:44:00")
    assert row.path == "files/p1000/p10000032/s40689238/40689238"
    assert str(frame["subject_id"].dtype) == "Int64"
    assert (samples_dir / "ecg" / "mimic-iv-ecg" / f"{row.path}.hea").is_file()


@pytest.mark.samples
def test_mimic_machine_measurements_row(samples_dir, tmp_path):
    source = samples_dir / "ecg" / "mimic-iv-ecg" / "machine_measurements_header_and_1row.csv"
    frame = read_machine_measurements(source)
    row = frame.iloc[0]
    assert (row.subject_id, row.study_id, row.cart_id) == (10000032, 40689238, 6848296)
    assert row.ecg_time == pd.Timestamp("2180-07-23 08:44:00")
    assert row.report_0 == "Sinus rhythm" and pd.isna(row.report_2)
    assert (row.rr_interval, row.qrs_axis) == (659.0, 77.0)
    assert frame["rr_interval"].dtype == np.float64
    assert read_machine_measurements(tmp_path) is None
    text = source.read_text().replace(",77,79", ",29999,79")
    (tmp_path / "machine_measurements.csv").write_text(text)
    mm = read_machine_measurements(tmp_path)
    assert pd.isna(mm.loc[0, "qrs_axis"]) and mm.loc[0, "t_axis"] == 79.0


# ----------------------------------------------------------------------------- hand-made records


@pytest.mark.parametrize("fs", [250, 500, 1000])
def test_rates_resampled_and_leads_reordered(tmp_path, fs):
    base = write_record(tmp_path, "r", sines(MIMIC_ORDER, fs), fs, MIMIC_ORDER)
    rec = read_ecg(base)
    assert rec.signal.shape == (12, 5000) and rec.fs == 500 and rec.source_fs == fs
    np.testing.assert_allclose(rec.signal[:, 20:-20], expected_sine()[:, 20:-20], atol=0.01)


def test_odd_case_and_order(tmp_path):
    names = ["v6", "AVF", "i", "Avl", "V1", "iii", "AVR", "v2", "II", "V5", "v3", "V4"]
    rec = read_ecg(write_record(tmp_path, "odd", sines(names, 500), 500, names))
    np.testing.assert_allclose(rec.signal, expected_sine(), atol=0.01)


def test_microvolt_units(tmp_path):
    base = write_record(
        tmp_path, "uv", sines(MIMIC_ORDER, 500) * 1000.0, 500, MIMIC_ORDER, units="uV", gain=1.0
    )
    np.testing.assert_allclose(read_ecg(base).signal, expected_sine(), atol=0.01)


def test_mat_container(tmp_path):
    """A PhysioNet-challenge style record: header pointing at a MATLAB v4 file, format 16+24."""
    names = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    digital = np.round(sines(names, 1000) * 1000).astype(np.int16).T  # (12, T) microvolts
    savemat(tmp_path / "A0001.mat", {"val": digital}, format="4")
    lines = [f"A0001 12 1000 {digital.shape[1]}"]
    lines += [f"A0001.mat 16+24 1000/mV 16 0 0 0 0 {n}" for n in names]
    (tmp_path / "A0001.hea").write_text("\n".join(lines) + "\n")
    for given in ("A0001", "A0001.mat", "A0001.hea"):
        rec = read_ecg(tmp_path / given)
        assert rec.source_fs == 1000
        np.testing.assert_allclose(rec.signal[:, 20:-20], expected_sine()[:, 20:-20], atol=0.01)


def test_short_record_padded_long_cropped(tmp_path):
    path = write_record(tmp_path, "s", sines(MIMIC_ORDER, 500, 4.0), 500, MIMIC_ORDER)
    with pytest.raises(LoaderError) as excinfo:  # 4 s where a study is 10 s: a counted skip
        read_ecg(path)
    assert excinfo.value.reason == "wrong_duration" and "4 s" in str(excinfo.value)
    short = read_ecg(path, pad_short=True)
    assert short.signal.shape == (12, 5000)
    np.testing.assert_allclose(short.signal[:, :2000], expected_sine()[:, :2000], atol=0.01)
    assert (short.signal[:, 2000:] == 0).all()
    long = read_ecg(write_record(tmp_path, "l", sines(MIMIC_ORDER, 250, 13.0), 250, MIMIC_ORDER))
    assert long.signal.shape == (12, 5000)
    np.testing.assert_allclose(long.signal[:, 20:-20], expected_sine()[:, 20:-20], atol=0.01)


def test_few_nans_are_interpolated(tmp_path):
    signal = sines(MIMIC_ORDER, 500)
    signal[1000:1010, 2] = np.nan
    signal[:3, 7] = np.nan
    rec = read_ecg(write_record(tmp_path, "gap", signal, 500, MIMIC_ORDER))
    assert rec.nan_filled == 13 and np.isfinite(rec.signal).all()
    # An inner gap is bridged linearly (close to the sine over 20 ms); an edge gap takes the
    # nearest valid sample.
    np.testing.assert_allclose(rec.signal[:, 3:], expected_sine()[:, 3:], atol=0.01)
    assert (rec.signal[7, :3] == rec.signal[7, 3]).all()


def test_extra_leads(tmp_path):
    names = MIMIC_ORDER + ["vx"]
    signal = np.concatenate([sines(MIMIC_ORDER, 500), np.zeros((5000, 1))], axis=1)
    base = write_record(tmp_path, "ptb", signal, 500, names)
    with pytest.raises(LoaderError) as excinfo:
        read_ecg(base)
    assert_loader_error(excinfo, f"{base}.hea", "unknown_leads")
    assert "vx" in str(excinfo.value)
    np.testing.assert_allclose(
        read_ecg(base, extra_leads="ignore").signal, expected_sine(), atol=0.01
    )


# ----------------------------------------------------------------------------- bad records


@pytest.fixture
def good(tmp_path):
    return write_record(tmp_path, "good", sines(MIMIC_ORDER, 500), 500, MIMIC_ORDER)


def test_truncated_dat(good):
    dat = good.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:50_000])
    with pytest.raises(LoaderError) as excinfo:
        read_ecg(good)
    assert_loader_error(excinfo, dat, "truncated")


def test_missing_dat_and_header(good, tmp_path):
    good.with_suffix(".dat").unlink()
    with pytest.raises(LoaderError) as excinfo:
        read_ecg(good)
    assert_loader_error(excinfo, good.with_suffix(".dat"), "missing_file")
    with pytest.raises(LoaderError) as excinfo:
        read_ecg(tmp_path / "absent")
    assert_loader_error(excinfo, tmp_path / "absent.hea", "missing_file")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda lines: ["good 12 abc 5000", *lines[1:]], "bad_header"),
        (lambda lines: ["good twelve 500 5000", *lines[1:]], "bad_header"),
        (lambda lines: lines[:5], "bad_header"),  # announces 12 signals, describes 4
        (lambda lines: ["good 12 0 5000", *lines[1:]], "wrong_rate"),
        (
            lambda lines: [lines[0]] + [ln.replace("/mV", "/furlong") for ln in lines[1:]],
            "bad_header",
        ),
        (
            lambda lines: [lines[0]] + [ln.replace(" V6", " X9") for ln in lines[1:]],
            "unknown_leads",
        ),
        (
            lambda lines: [lines[0]] + [ln.replace(" V6", " V5") for ln in lines[1:]],
            "unknown_leads",
        ),
    ],
    ids=[
        "fs_text",
        "nsig_text",
        "too_few_lines",
        "zero_fs",
        "units",
        "unknown_lead",
        "repeated_lead",
    ],
)
def test_bad_headers(good, edit, reason):
    header = good.with_suffix(".hea")
    header.write_text("\n".join(edit(header.read_text().splitlines())) + "\n")
    with pytest.raises(LoaderError) as excinfo:
        read_ecg(good)
    assert_loader_error(excinfo, header, reason)


@pytest.mark.parametrize("where", ["dead_lead", "spread"])
def test_nan_signal_rejected(tmp_path, where):
    signal = sines(MIMIC_ORDER, 500)
    if where == "dead_lead":
        signal[:, 4] = np.nan
    else:
        signal[::10, :] = np.nan  # 10 % of every lead
    base = write_record(tmp_path, "nan", signal, 500, MIMIC_ORDER)
    with pytest.raises(LoaderError) as excinfo:
        read_ecg(base)
    assert_loader_error(excinfo, f"{base}.hea", "nan_signal")
    if where == "dead_lead":
        assert "aVF" in str(excinfo.value)


# ----------------------------------------------------------------------------- CSV indexes


RECORD_LIST_HEADER = "subject_id,study_id,file_name,ecg_time,path"


def test_record_list_errors(tmp_path, samples_dir):
    csv = tmp_path / "record_list.csv"
    csv.write_text("")
    with pytest.raises(LoaderError) as excinfo:
        read_record_list(tmp_path)
    assert_loader_error(excinfo, csv, "empty")
    csv.write_text("subject_id,study_id,path\n1,2,files/x\n")
    with pytest.raises(LoaderError) as excinfo:
        read_record_list(tmp_path)
    assert_loader_error(excinfo, csv, "missing_column")
    assert "ecg_time" in str(excinfo.value) and "file_name" in str(excinfo.value)
    csv.write_text(f"{RECORD_LIST_HEADER}\n1,2,2,23/07/2180 08:44,files/x\n")
    with pytest.raises(LoaderError) as excinfo:
        read_record_list(tmp_path)
    assert_loader_error(excinfo, csv, "bad_value")
    assert "ecg_time" in str(excinfo.value)
    shutil.copy(samples_dir / "ecg/mimic-iv-ecg/record_list.csv", csv)
    assert len(read_record_list(csv)) == 1


# ----------------------------------------------------------------------------- pairing


def test_pair_ecg():
    t0 = pd.Timestamp("2180-07-23 08:00:00")
    stays = pd.DataFrame(
        {"subject_id": [1, 2], "stay_id": [10, 20], "intime": [t0, t0 + pd.Timedelta(days=3)]}
    )
    times = [
        t0 - pd.Timedelta(minutes=1),
        t0 + pd.Timedelta(hours=1),
        t0 + pd.Timedelta(hours=47),
        t0 + pd.Timedelta(hours=49),
        t0 + pd.Timedelta(days=3, hours=2),
    ]
    ecgs = pd.DataFrame(
        {
            "subject_id": [1, 1, 1, 1, 1],
            "study_id": [1, 2, 3, 4, 5],
            "file_name": ["1", "2", "3", "4", "5"],
            "ecg_time": times,
            "path": [f"files/s{i}/{i}" for i in range(1, 6)],
        }
    )
    latest = pair_ecg(stays, ecgs)
    assert latest["study_id"].tolist() == [3] and latest["hours"].tolist() == [47.0]
    two = pair_ecg(stays, ecgs, keep="last_n", n=3)
    assert two["study_id"].tolist() == [2, 3] and two["stay_id"].tolist() == [10, 10]
    assert pair_ecg(stays, ecgs, window_hours=72, keep="all")["study_id"].tolist() == [2, 3, 4]
    assert 20 not in set(pair_ecg(stays, ecgs, window_hours=None, keep="all")["stay_id"])
