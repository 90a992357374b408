"""MIMIC-IV-Note radiology reports and discharge summaries (templated, varied, de-identified).

Radiology reports are charted at the study time: their indication and device wording follow
``severity`` (redundant with the EHR) and, weakly, their impressions follow the CXR findings
(``pulmonary``). Discharge summaries are charted at discharge and state the outcome ("expired",
"discharged home"): a 48 h model that reads them leaks the label, which the loaders must prevent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from clinical_moe.data.synthetic.plan import HOUR, ShardPlan
from clinical_moe.data.synthetic.schema import COLUMNS
from clinical_moe.data.synthetic.timeutil import fmt_datetime

INDICATIONS = {  # by severity band: 0 mild, 1 moderate, 2 critical
    0: [
        "fall, evaluate for fracture",
        "mild cough",
        "preoperative evaluation",
        "follow-up, stable",
        "low grade fever",
    ],
    1: [
        "hypotension",
        "worsening shortness of breath",
        "tachypnea and hypoxia",
        "altered mental status",
        "new oxygen requirement",
    ],
    2: [
        "intubated for hypoxic respiratory failure",
        "septic shock on pressors, critically ill",
        "unresponsive, concern for aspiration",
        "acute decompensation, intubated",
        "multiorgan failure, critically ill",
    ],
}
OTHER_EXAMS = [
    ("CT HEAD W/O CONTRAST", "No acute intracranial hemorrhage or mass effect."),
    ("CT ABD AND PELVIS WITH CONTRAST", "No acute intra-abdominal process."),
    ("LIVER OR GALLBLADDER US (SINGLE ORGAN)", "Normal hepatic echotexture."),
    ("UNILAT LOWER EXT VEINS", "No evidence of deep venous thrombosis."),
]
DEVICES = [
    "Endotracheal tube terminates ___ cm above the carina.",
    "Right internal jugular central venous catheter tip in the distal SVC.",
    "Enteric tube courses below the diaphragm, tip not visualized.",
]


def _band(rng: np.random.Generator, severity: float) -> int:
    s = severity + rng.normal(0, 0.4)
    return 2 if s > 1.0 else (1 if s > -0.2 else 0)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


class RadiologyReport(NamedTuple):
    """A radiology report and what it reveals (recorded in ``truth/studies`` for the observer).

    Attributes:
        text: The report.
        band: Severity band of its indication (0 mild, 1 moderate, 2 critical).
        mentions_opacity: The report names the opacity (None for a non-chest exam).
        mentions_effusion: The report names the effusion (None for a non-chest exam).
    """

    text: str
    band: int
    mentions_opacity: bool | None = None
    mentions_effusion: bool | None = None


def radiology_text(
    rng: np.random.Generator, ev: dict, findings: dict | None, procedure: str | None, gender: str
) -> RadiologyReport:
    """A radiology report. ``findings`` is None for non-chest exams."""
    who = "man" if gender == "M" else "woman"
    band = _band(rng, ev["severity"])
    lines = []
    if findings is None:
        exam, normal = OTHER_EXAMS[int(rng.integers(0, len(OTHER_EXAMS)))]
        lines += [
            f"EXAMINATION:  {exam}",
            "",
            f"INDICATION:  ___ year old {who} with {_pick(rng, INDICATIONS[band])}.",
            "",
            "COMPARISON:  ___.",
            "",
            "FINDINGS: ",
            "",
            normal if rng.random() < 0.8 else "Limited study due to patient motion.",
            "",
            "IMPRESSION: ",
            "",
            normal,
        ]
        return RadiologyReport("\n".join(lines), band)
    side = "right" if findings["opacity_side"] == 0 else "left"
    lines += [
        f"EXAMINATION:  {procedure or 'CHEST (PORTABLE AP)'}",
        "",
        f"INDICATION:  ___ year old {who} with {_pick(rng, INDICATIONS[band])}.  "
        "// eval for acute process",
        "",
        "TECHNIQUE:  Portable AP chest radiograph."
        if "PORTABLE" in (procedure or "")
        else "TECHNIQUE:  Chest PA and lateral.",
        "",
        f"COMPARISON:  {_pick(rng, ['___.', 'None.', 'Chest radiograph from ___.'])}",
        "",
        "FINDINGS: ",
        "",
    ]
    body, impression = [], []
    if findings["devices"] or (band == 2 and rng.random() < 0.5):
        body += [d for d in DEVICES if rng.random() < 0.7] or DEVICES[:1]
        impression.append("Lines and tubes in standard position.")
    says_opacity = bool(findings["opacity"] and rng.random() < 0.65)
    if says_opacity:
        body.append(f"Patchy opacity in the {side} lower lobe, concerning for pneumonia.")
        impression.append(f"{side.capitalize()} lower lobe opacity, concerning for pneumonia.")
    elif findings["atelectasis"]:
        body.append("Mild bibasilar atelectasis.")
    else:
        body.append(
            _pick(
                rng,
                [
                    "The lungs are clear.  No focal consolidation.",
                    "No focal consolidation is seen.",
                    "Lungs are well expanded without focal consolidation.",
                ],
            )
        )
    says_effusion = bool(findings["effusion"] and rng.random() < 0.7)
    if says_effusion:
        where = ["right", "left", "bilateral"][findings["effusion_side"]]
        body.append(f"Small {where} pleural effusion.")
        impression.append(f"Small {where} pleural effusion.")
    else:
        body.append("No pleural effusion or pneumothorax.")
    body.append(
        "Cardiomediastinal silhouette is "
        + ("enlarged." if findings["cardiomegaly"] else "within normal limits.")
    )
    if not impression:
        impression.append(
            _pick(rng, ["No acute cardiopulmonary process.", "No acute intrathoracic process."])
        )
    text = "\n".join(lines + [" ".join(body), "", "IMPRESSION: ", "", " ".join(impression)])
    return RadiologyReport(text, band, says_opacity, says_effusion)


def discharge_text(rng: np.random.Generator, adm: dict, gender: str) -> str:
    """A discharge summary; it states the outcome and the diagnoses (all factors)."""
    band = _band(rng, adm["severity"])
    problems = []
    if adm["infection"]:
        problems.append("sepsis, treated with broad spectrum antibiotics")
    if adm["pulmonary"]:
        problems.append("pneumonia with hypoxia")
    if adm["cardiac"]:
        problems.append(
            _pick(
                rng,
                [
                    "atrial fibrillation with rapid ventricular response",
                    "NSTEMI, cardiology consulted",
                ],
            )
        )
    if band == 2:
        problems.append("respiratory failure requiring intubation")
    if not problems:
        problems.append(_pick(rng, ["dehydration", "syncope", "hyperglycemia"]))
    if adm["died"]:
        dispo, course_end, condition = (
            "Expired",
            "Despite maximal support the patient expired on ___. Family at bedside.",
            "Expired",
        )
    else:
        dispo = _pick(rng, ["Home", "Home With Service", "Extended Care"])
        course_end = f"Patient was discharged {dispo.lower()} in stable condition."
        condition = "Mental Status: Clear and coherent. Activity Status: Ambulatory."
    return "\n".join(
        [
            " \nName:  ___                    Unit No:   ___\n ",
            "Admission Date:  ___              Discharge Date:   ___\n ",
            f"Date of Birth:  ___             Sex:   {gender}\n ",
            "Service: MEDICINE\n ",
            "Allergies: \n"
            + _pick(
                rng,
                [
                    "No Known Allergies / Adverse Drug Reactions",
                    "Penicillins",
                    "Sulfa (Sulfonamide Antibiotics)",
                ],
            )
            + "\n ",
            f"Chief Complaint:\n{_pick(rng, INDICATIONS[band])}\n ",
            "History of Present Illness:\n"
            f"{'Mr.' if gender == 'M' else 'Ms.'} ___ is a ___ year old with a history of ___ who "
            f"presented with {_pick(rng, INDICATIONS[band])}.\n ",
            "Brief Hospital Course:\n"
            + "\n".join(f"# {p.capitalize()}." for p in problems)
            + f"\n{course_end}\n ",
            f"Discharge Disposition:\n{dispo}\n ",
            "Discharge Diagnosis:\n" + "\n".join(p.split(",")[0] for p in problems) + "\n ",
            f"Discharge Condition:\n{condition}\n ",
            "Followup Instructions:\n___\n",
        ]
    )


def notes_shard(
    plan: ShardPlan, rng: np.random.Generator, findings_by_study: dict[int, dict]
) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Radiology and discharge notes of the shard; return ``(tables, truth_rows)``."""
    gender = {p["subject_id"]: p["gender"] for p in plan.patients}
    seq: dict[tuple[int, str], int] = {}
    rad, dis, truth = [], [], []
    items = [(e["time"], 0, e) for e in plan.events if e["kind"] in ("cxr", "rr")]
    items += [(a["dischtime"], 1, a) for a in plan.admissions]
    items.sort(key=lambda x: (x[2]["subject_id"], x[0], x[1]))  # chronological per subject
    for time, is_ds, rec in items:
        sid = rec["subject_id"]
        if is_ds:
            if rng.random() >= 0.95:  # a few admissions lack a discharge summary
                continue
            key = (sid, "DS")
            seq[key] = seq.get(key, 0) + 1
            chart = time // 86400 * 86400  # charted on the discharge date
            dis.append(
                {
                    "note_id": f"{sid}-DS-{seq[key]}",
                    "subject_id": sid,
                    "hadm_id": rec["hadm_id"],
                    "note_type": "DS",
                    "note_seq": seq[key],
                    "charttime": chart,
                    "storetime": time + int(rng.uniform(2, 48) * HOUR),
                    "text": discharge_text(rng, rec, gender[sid]),
                }
            )
            continue
        key = (sid, "RR")
        seq[key] = seq.get(key, 0) + 1
        note_id = f"{sid}-RR-{seq[key]}"
        findings = findings_by_study.get(rec["study_id"]) if rec["kind"] == "cxr" else None
        procedure = findings.get("procedure") if findings else None
        report = radiology_text(rng, rec, findings, procedure, gender[sid])
        hadm = rec["hadm_id"] if rng.random() > 0.1 else None
        rad.append(
            {
                "note_id": note_id,
                "subject_id": sid,
                "hadm_id": hadm,
                "note_type": "RR",
                "note_seq": seq[key],
                "charttime": time // 60 * 60,
                "storetime": time + int(rng.uniform(0.3, 8) * HOUR),
                "text": report.text,
            }
        )
        truth.append(
            {
                "modality": "notes",
                "study_id": None,
                "dicom_id": None,
                "note_id": note_id,
                "subject_id": sid,
                "hadm_id": rec["hadm_id"],
                "stay_id": rec["stay_id"],
                "time": time // 60 * 60,
                "in_window": rec["in_window"],
                "band": report.band,
                "mentions_opacity": report.mentions_opacity,
                "mentions_effusion": report.mentions_effusion,
            }
        )
    tables = {}
    for name, rows in (("radiology", rad), ("discharge", dis)):
        df = pd.DataFrame(rows, columns=COLUMNS["notes"])
        df["hadm_id"] = pd.array(df["hadm_id"].tolist(), dtype="Int64")
        df["charttime"] = fmt_datetime(df["charttime"].tolist())
        df["storetime"] = fmt_datetime(df["storetime"].tolist())
        tables[name] = df
    return tables, truth
