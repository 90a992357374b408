"""MIMIC-IV-ECG tables of a shard (record_list, machine_measurements) and its WFDB records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.synthetic.config import SynthConfig
from clinical_moe.data.synthetic.ecg_wfdb import (
    machine_report,
    plan_cardiac,
    record_path,
    synth_ecg,
    write_record,
)
from clinical_moe.data.synthetic.plan import ShardPlan
from clinical_moe.data.synthetic.schema import COLUMNS
from clinical_moe.data.synthetic.timeutil import fmt_datetime

MISSING = 29999  # MIMIC-IV-ECG sentinel for a missing measurement
SENTINEL_RATE = 0.03


def ecg_shard(
    plan: ShardPlan, rng: np.random.Generator, cfg: SynthConfig, root: Path
) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Synthesize and write the shard's ECGs; return ``(tables, truth_rows)``."""
    records, measurements, truth = [], [], []
    phenotypes: dict[int, dict] = {}
    carts: dict[int, int] = {}
    for ev in (e for e in plan.events if e["kind"] == "ecg"):
        hadm = ev["hadm_id"]
        if hadm not in phenotypes:
            phenotypes[hadm] = plan_cardiac(rng, ev["cardiac"], ev["severity"], ev["infection"])
        ph = phenotypes[hadm]
        sid, study = ev["subject_id"], ev["study_id"]
        carts.setdefault(sid, int(rng.integers(6_000_000, 7_000_000)))
        signal, iv = synth_ecg(rng, ph)
        rel = record_path(sid, study)
        if cfg.write_signals:
            rel = write_record(root, sid, study, ev["time"], signal)
        ecg_time = fmt_datetime([ev["time"] // 60 * 60])[0]
        records.append(
            {
                "subject_id": sid,
                "study_id": study,
                "file_name": study,
                "ecg_time": ecg_time,
                "path": rel,
            }
        )
        report = machine_report(rng, ph, iv)
        p_onset = int(rng.normal(40, 8))
        qrs_onset = int(p_onset + iv["pr"])
        row = {
            "subject_id": sid,
            "study_id": study,
            "cart_id": carts[sid],
            "ecg_time": ecg_time,
            **{f"report_{i}": (report[i] or None) if i < len(report) else None for i in range(18)},
            "bandwidth": "0.005-150 Hz",
            "filtering": "60 Hz notch Baseline filter",
            "rr_interval": int(round(iv["rr"])),
            "p_onset": MISSING if ph["af"] else p_onset,
            "p_end": MISSING if ph["af"] else int(p_onset + rng.normal(95, 10)),
            "qrs_onset": qrs_onset,
            "qrs_end": int(qrs_onset + iv["qrs"]),
            "t_end": int(qrs_onset + iv["qt"]),
            "p_axis": MISSING if ph["af"] else int(rng.normal(55, 20)),
            "qrs_axis": int(round(40 + ph["axis_deg"])),
            "t_axis": int(rng.normal(45, 25)),
        }
        for key in ("rr_interval", "qrs_onset", "qrs_end", "t_end", "qrs_axis", "t_axis"):
            if rng.random() < SENTINEL_RATE:
                row[key] = MISSING
        measurements.append(row)
        truth.append(
            {
                "modality": "ecg",
                "study_id": study,
                "dicom_id": None,
                "subject_id": sid,
                "hadm_id": hadm,
                "stay_id": ev["stay_id"],
                "time": ev["time"],
                "in_window": ev["in_window"],
                "st": ph["st"],
                "wide_qrs": ph["wide_qrs"],
                "af": ph["af"],
                "hr": ph["hr"],
            }
        )
    tables = {
        "ecg_records": pd.DataFrame(records, columns=COLUMNS["ecg_records"]),
        "ecg_measurements": pd.DataFrame(measurements, columns=COLUMNS["ecg_measurements"]),
    }
    return tables, truth
