"""12-lead ECGs carrying the ``cardiac`` factor, written as MIMIC-IV-ECG WFDB records.

A beat is a sum of Gaussian waves (P, Q, R, S, T) of a 3-D cardiac dipole; leads are projections
of the dipole (limb leads by Einthoven / Goldberger from I and II, precordial leads from fixed
horizontal-plane directions), so the leads relate like real ones (III = II - I, ...).
``cardiac`` = 1 adds at least one of: ST elevation / depression (an injury current between the J
point and the T wave), a wide QRS (bundle branch block) or atrial fibrillation (irregular RR, no P
waves, fibrillatory baseline). Heart rate follows severity and infection (as in the EHR), so
``cardiac`` is the only factor unique to the ECG.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from scipy.special import expit

from clinical_moe.data.synthetic.schema import ECG_LEADS

FS = 500
N_SAMPLES = 5000
GAIN = 200.0
# Horizontal-plane directions (x left, y inferior, z anterior) of V1..V6.
PRECORDIAL = np.array(
    [
        [-0.25, 0.1, 0.96],
        [0.0, 0.1, 1.0],
        [0.4, 0.1, 0.9],
        [0.7, 0.1, 0.7],
        [0.9, 0.1, 0.4],
        [1.0, 0.1, 0.1],
    ]
)
# Injury vectors of the ST changes (mV): anterior / inferior elevation, diffuse depression.
ST_VECTORS = {
    "anterior": np.array([0.1, -0.05, 0.3]),
    "inferior": np.array([0.0, 0.25, 0.05]),
    "depression": np.array([-0.12, -0.1, -0.1]),
}


def plan_cardiac(rng: np.random.Generator, cardiac: int, severity: float, infection: int) -> dict:
    """ECG phenotype of one admission (shared by its ECGs)."""
    st, wide, af = None, False, False
    if cardiac:
        while st is None and not wide and not af:
            if rng.random() < 0.6:
                st = str(rng.choice(["anterior", "inferior", "depression"]))
            wide = bool(rng.random() < 0.4)
            af = bool(rng.random() < 0.35)
    return {
        "st": st,
        "wide_qrs": wide,
        "af": af,
        "bbb": str(rng.choice(["Right", "Left"])) if wide else None,
        "hr": float(np.clip(80 + 11 * severity + 12 * infection + rng.normal(0, 8), 40, 170)),
        "axis_deg": float(rng.normal(0, 20)),
    }


def _rotate_frontal(v: np.ndarray, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    x, y = v[0] * np.cos(a) - v[1] * np.sin(a), v[0] * np.sin(a) + v[1] * np.cos(a)
    return np.array([x, y, v[2]])


def synth_ecg(rng: np.random.Generator, ph: dict) -> tuple[np.ndarray, dict]:
    """Synthesize one 10 s, 500 Hz, 12-lead ECG (mV) in MIMIC-IV-ECG lead order.

    Returns:
        ``(signal float (5000, 12), intervals)`` with intervals in ms for the machine measurements.
    """
    t = np.arange(N_SAMPLES) / FS  # (5000,)
    hr = ph["hr"] * rng.uniform(0.95, 1.05)
    rr = 60.0 / hr
    if ph["af"]:
        rrs = np.clip(rr * (1 + rng.normal(0, 0.2, 40)), 0.3, 2.0)
    else:
        rrs = rr * (1 + rng.normal(0, 0.02, 40))
    peaks = rng.uniform(-rr, 0) + np.concatenate([[0], np.cumsum(rrs)])
    peaks = peaks[(peaks > -0.7) & (peaks < 10.3)]  # (n_beats,) R peaks in seconds
    w = 2.2 if ph["wide_qrs"] else 1.0
    qt = 0.40 * np.sqrt(rr)
    main = _rotate_frontal(np.array([0.7, 0.6, -0.4]), ph["axis_deg"])
    # (offset s, sigma s, amplitude mV, direction)
    waves = [
        (-0.025 * w, 0.010 * w, 0.15, np.array([-0.6, 0.2, 0.7])),
        (0.0, 0.012 * w, 1.3, main),
        (0.03 * w, 0.012 * w, 0.4, np.array([-0.2, -0.5, -0.8])),
        (qt - 0.1, 0.045, 0.35, np.array([0.6, 0.6, -0.1])),
    ]
    if not ph["af"]:
        waves.append((-0.16, 0.025, 0.15, np.array([0.5, 0.8, 0.2])))
    # Every beat shares one dipole template (the QT follows the mean RR), added at each R peak.
    tt = np.arange(-0.35 * FS, 0.75 * FS) / FS  # (L,) seconds from the R peak
    template = np.zeros((len(tt), 3))
    for off, sig, amp, direc in waves:
        template += amp * np.exp(-((tt - off) ** 2) / (2 * sig**2))[:, None] * direc[None, :]
    if ph["st"]:
        plateau = expit((tt - 0.05 * w) / 0.008) * expit(((qt - 0.1) - tt) / 0.03)  # (L,)
        template += plateau[:, None] * ST_VECTORS[ph["st"]][None, :]
    pad, lead_in = len(tt), int(0.35 * FS)
    dipole = np.zeros((N_SAMPLES + 2 * pad, 3))  # padded at both ends, cropped below
    for p in peaks:
        i0 = int(round(p * FS)) - lead_in + pad
        dipole[i0 : i0 + pad] += template
    dipole = dipole[pad : pad + N_SAMPLES]  # (5000, 3)
    if ph["af"]:
        f = sum(
            0.03 * np.sin(2 * np.pi * rng.uniform(4, 8) * t + rng.uniform(0, 6)) for _ in range(3)
        )
        dipole += f[:, None] * np.array([0.5, 0.8, 0.2])[None, :]
    lead_i, lead_ii = dipole[:, 0], 0.5 * dipole[:, 0] + 0.866 * dipole[:, 1]
    limb = [
        lead_i,
        lead_ii,
        lead_ii - lead_i,
        -(lead_i + lead_ii) / 2,
        lead_ii - lead_i / 2,
        lead_i - lead_ii / 2,
    ]  # I, II, III, aVR, aVF, aVL
    prec = dipole @ PRECORDIAL.T  # (5000, 6)
    sig = np.column_stack(limb + [prec])  # (5000, 12)
    wander = 0.08 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t[:, None] + rng.uniform(0, 6, 12))
    sig = sig + wander + rng.normal(0, 0.015, sig.shape)
    sig = sig + 0.01 * np.sin(2 * np.pi * 60 * t)[:, None]
    qrs_ms = 95 * w + rng.normal(0, 6)
    return sig, {
        "rr": 1000 * float(np.mean(np.diff(peaks))),
        "qrs": qrs_ms,
        "qt": 1000 * qt,
        "pr": 160 + rng.normal(0, 15),
    }


def record_path(subject_id: int, study_id: int) -> str:
    """Relative record path inside ``mimic-iv-ecg/`` (no suffix), MIMIC-IV-ECG layout."""
    s = str(subject_id)
    return f"files/p{s[:4]}/p{s}/s{study_id}/{study_id}"


def digitize(signal: np.ndarray) -> np.ndarray:
    """mV -> ADC units as ``wfdb`` does (gain 200, baseline 0, round half to even), int64."""
    return np.clip(np.round(signal * GAIN), -32767, 32767).astype(np.int64)


def write_record(
    root: Path,
    subject_id: int,
    study_id: int,
    time_s: int,
    signal: np.ndarray,
    engine: str = "fast",
) -> str:
    """Write one WFDB record (fmt 16, gain 200, baseline 0); return its relative path.

    ``engine="wfdb"`` calls ``wfdb.wrsamp``; ``"fast"`` (default) writes the same bytes directly
    (``wrsamp`` spends ~0.1-0.2 s per record validating its header fields, too slow for 50,000
    records). The tests check that both engines write byte-identical files.
    """
    rel = record_path(subject_id, study_id)
    out = root / "mimic-iv-ecg" / Path(rel).parent
    out.mkdir(parents=True, exist_ok=True)
    when = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=int(time_s) // 60 * 60)
    name = str(study_id)
    comment = f"<subject_id>: {subject_id}"
    if engine == "wfdb":
        import wfdb

        wfdb.wrsamp(
            name,
            fs=FS,
            units=["mV"] * 12,
            sig_name=list(ECG_LEADS),
            p_signal=np.array(signal, dtype=float),
            fmt=["16"] * 12,
            adc_gain=[GAIN] * 12,
            baseline=[0] * 12,
            comments=[comment],
            base_time=when.time(),
            base_date=when.date(),
            write_dir=str(out),
        )
        return rel
    d = digitize(signal)  # (5000, 12)
    checksum = d.sum(0) % 65536
    lines = [f"{name} 12 {FS} {len(d)} {when:%H:%M:%S} {when:%d/%m/%Y}"]
    lines += [
        f"{name}.dat 16 {GAIN}(0)/mV 16 0 {d[0, k]} {checksum[k]} 0 {lead}"
        for k, lead in enumerate(ECG_LEADS)
    ]
    lines.append(f"# {comment}")
    (out / f"{name}.hea").write_text("\n".join(lines) + "\n")
    (out / f"{name}.dat").write_bytes(d.astype("<i2").tobytes())  # sample-major, interleaved
    return rel


def machine_report(rng: np.random.Generator, ph: dict, intervals: dict) -> list[str]:
    """Machine statements (report_0..), mostly faithful to the phenotype."""
    hr = 60000 / intervals["rr"]
    if ph["af"]:  # carts name the ventricular rate of AF, as they do a sinus rate
        out = ["Atrial fibrillation"]
        if hr > 100:
            out = ["Atrial fibrillation with rapid ventricular response"]
        elif hr < 60:
            out = ["Atrial fibrillation with slow ventricular response"]
    elif hr > 100:
        out = ["Sinus tachycardia"]
    elif hr < 60:
        out = ["Sinus bradycardia"]
    else:
        out = ["Sinus rhythm"]
    if ph["wide_qrs"] and rng.random() < 0.9:
        out.append(f"{ph['bbb']} bundle branch block")
    if ph["st"] and rng.random() < 0.85:
        out.append(
            {
                "anterior": "Anterior ST elevation - possible acute infarct",
                "inferior": "Inferior ST elevation - possible acute infarct",
                "depression": "ST depression - possible ischemia",
            }[ph["st"]]
        )
    if rng.random() < 0.1:
        out.append(
            str(
                rng.choice(
                    [
                        "Possible right atrial abnormality",
                        "Left axis deviation",
                        "Low QRS voltages in precordial leads",
                    ]
                )
            )
        )
    if rng.random() < 0.3:
        out.append("")  # real reports have blank statements in between
    abnormal = ph["af"] or ph["wide_qrs"] or ph["st"]
    out.append("Abnormal ECG" if abnormal else str(rng.choice(["Normal ECG", "Borderline ECG"])))
    return out[:18]
