"""MIMIC-CXR tables of a shard (metadata, CheXpert labels, record list) and its DICOM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.synthetic.config import SynthConfig
from clinical_moe.data.synthetic.cxr_dicom import (
    VIEW_MEANING,
    dicom_id_from,
    plan_findings,
    render_chest,
    write_dx,
)
from clinical_moe.data.synthetic.plan import ShardPlan
from clinical_moe.data.synthetic.schema import COLUMNS
from clinical_moe.data.synthetic.timeutil import split_date_time
from clinical_moe.data.targets import CHEXPERT_FINDINGS

# Views of a study: (views, procedure, probability). ICU films are mostly portable AP.
STUDY_TYPES = [
    (("AP",), "CHEST (PORTABLE AP)", 0.70),
    (("PA", "LATERAL"), "CHEST (PA AND LAT)", 0.20),
    (("PA",), "CHEST (PA AND LAT)", 0.06),
    (("AP", "LATERAL"), "CHEST (PA AND LAT)", 0.04),
]


def cxr_path(subject_id: int, study_id: int, dicom_id: str) -> str:
    """Relative path of a DICOM file inside ``mimic-cxr/`` (MIMIC-CXR layout)."""
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}/{dicom_id}.dcm"


def chexpert_row(rng: np.random.Generator, findings: dict) -> dict:
    """CheXpert-style labels (1.0 / 0.0 / -1.0 uncertain / NaN blank) of one study."""
    nan = np.nan
    row = dict.fromkeys(CHEXPERT_FINDINGS, nan)
    if findings["opacity"]:
        row["Lung Opacity"] = 1.0
        row["Consolidation"] = float(rng.choice([1.0, -1.0, nan], p=[0.5, 0.3, 0.2]))
        row["Pneumonia"] = float(rng.choice([1.0, -1.0, nan], p=[0.4, 0.4, 0.2]))
    elif rng.random() < 0.5:
        row["Consolidation"] = 0.0  # "no focal consolidation"
    row["Pleural Effusion"] = 1.0 if findings["effusion"] else (0.0 if rng.random() < 0.6 else nan)
    if findings["atelectasis"]:
        row["Atelectasis"] = float(rng.choice([1.0, -1.0]))
    if findings["cardiomegaly"]:
        row["Cardiomegaly"] = 1.0
    if findings["devices"]:
        row["Support Devices"] = 1.0
    if rng.random() < 0.4:
        row["Pneumothorax"] = 0.0
    # As the CheXpert labeler does: "No Finding" when no pathology is positive or uncertain;
    # support devices are not a pathology, so they do not veto it.
    pathologies = (v for k, v in row.items() if k != "Support Devices")
    if not any(v == 1.0 or v == -1.0 for v in pathologies):
        row["No Finding"] = 1.0
    return row


def cxr_shard(
    plan: ShardPlan,
    rng: np.random.Generator,
    cfg: SynthConfig,
    root: Path,
    findings_rng: np.random.Generator,
) -> tuple[dict[str, pd.DataFrame], list[dict], dict[int, dict]]:
    """Render and write the shard's radiographs; return tables, truth rows and study findings.

    What a study shows (findings, views, labels) comes from ``findings_rng``; pixel sizes,
    rendering and encoding from ``rng``, so that the image size never changes the findings.

    Returns:
        ``(tables, truth_rows, findings_by_study)`` where tables has keys ``cxr_metadata``,
        ``cxr_chexpert`` and ``cxr_records``.
    """
    meta_rows, label_rows, record_rows, truth = [], [], [], []
    findings_by_study: dict[int, dict] = {}
    lo, hi = cfg.image_size
    for ev in (e for e in plan.events if e["kind"] == "cxr"):
        findings = plan_findings(findings_rng, ev["pulmonary"], ev["severity"])
        findings_by_study[ev["study_id"]] = findings
        k = int(findings_rng.choice(len(STUDY_TYPES), p=[s[2] for s in STUDY_TYPES]))
        views, procedure, _ = STUDY_TYPES[k]
        findings["procedure"] = procedure
        date, time_text, time_float = split_date_time(ev["time"])
        orientation = "Recumbent" if views == ("AP",) else str(findings_rng.choice(["Erect", ""]))
        label_rows.append(
            {
                "subject_id": ev["subject_id"],
                "study_id": ev["study_id"],
                **chexpert_row(findings_rng, findings),
            }
        )
        for j, view in enumerate(views):
            rows = int(rng.integers(lo, hi + 1))
            cols = int(np.clip(round(rows * rng.uniform(0.8, 1.0)), 16, None))
            dicom_id = dicom_id_from(cfg.seed, ev["study_id"], j)
            rel = cxr_path(ev["subject_id"], ev["study_id"], dicom_id)
            enc = {"bits_stored": None, "photometric": None, "has_window": None}
            if cfg.write_images:
                img = render_chest(rng, rows, cols, view, findings)
                enc = write_dx(
                    root / "mimic-cxr" / rel,
                    img,
                    rng,
                    {
                        "seed": cfg.seed,
                        "subject_id": ev["subject_id"],
                        "study_id": ev["study_id"],
                        "dicom_id": dicom_id,
                        "view": view,
                        "date": date,
                        "time": time_text,
                        "procedure": procedure,
                    },
                )
            meta_rows.append(
                {
                    "dicom_id": dicom_id,
                    "subject_id": ev["subject_id"],
                    "study_id": ev["study_id"],
                    "PerformedProcedureStepDescription": procedure,
                    "ViewPosition": view,
                    "Rows": rows,
                    "Columns": cols,
                    "StudyDate": int(date),
                    "StudyTime": time_float,
                    "ProcedureCodeSequence_CodeMeaning": procedure,
                    "ViewCodeSequence_CodeMeaning": VIEW_MEANING[view],
                    "PatientOrientationCodeSequence_CodeMeaning": orientation or None,
                }
            )
            record_rows.append(
                {
                    "subject_id": ev["subject_id"],
                    "study_id": ev["study_id"],
                    "dicom_id": dicom_id,
                    "path": rel,
                }
            )
            truth.append(
                {
                    "modality": "cxr",
                    "study_id": ev["study_id"],
                    "dicom_id": dicom_id,
                    "subject_id": ev["subject_id"],
                    "hadm_id": ev["hadm_id"],
                    "stay_id": ev["stay_id"],
                    "time": ev["time"],
                    "in_window": ev["in_window"],
                    "view": view,
                    **enc,
                    "opacity": findings["opacity"],
                    "effusion": findings["effusion"],
                    "devices": findings["devices"],
                }
            )
    tables = {
        "cxr_metadata": pd.DataFrame(meta_rows, columns=COLUMNS["cxr_metadata"]),
        "cxr_chexpert": pd.DataFrame(label_rows, columns=COLUMNS["cxr_chexpert"]),
        "cxr_records": pd.DataFrame(record_rows, columns=COLUMNS["cxr_records"]),
    }
    return tables, truth, findings_by_study
