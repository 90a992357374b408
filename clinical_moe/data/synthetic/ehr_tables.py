"""MIMIC-IV structure tables: patients, admissions, icustays, diagnoses_icd and the dictionaries.

The event tables (chartevents, labevents) are in :mod:`.ehr_events`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clinical_moe.data.synthetic.plan import ShardPlan
from clinical_moe.data.synthetic.schema import CHART_ITEMS, COLUMNS, LAB_ITEMS
from clinical_moe.data.synthetic.timeutil import fmt_date, fmt_datetime

# Phenotype codes: name -> (ICD-9, ICD-10, p if the rule holds, p otherwise). Codes are text with
# their leading zeros (e.g. ICD-9 "0389" septicemia).
PHENOTYPE_CODES = {
    "sepsis": ("0389", "A419", 0.75, 0.04),
    "pneumonia": ("486", "J189", 0.70, 0.05),
    "respiratory_failure": ("51881", "J9600", 0.70, 0.05),
    "atrial_fibrillation": ("42731", "I4891", 0.60, 0.06),
    "nstemi": ("41071", "I214", 0.35, 0.02),
    "acute_kidney_failure": ("5849", "N179", 0.60, 0.10),
    "shock": ("78552", "R6521", 0.50, 0.02),
}
# Background comorbidities: (ICD-9, ICD-10, prevalence).
BACKGROUND_CODES = [
    ("4019", "I10", 0.45),
    ("25000", "E119", 0.25),
    ("2724", "E785", 0.35),
    ("V1582", "Z87891", 0.20),
    ("5859", "N189", 0.10),
    ("53081", "K219", 0.20),
    ("0340", "J020", 0.02),
]


def _phenotype_rule(name: str, adm: dict) -> bool:
    """Whether the factors of an admission make phenotype ``name`` likely."""
    sev = adm["severity"]
    return {
        "sepsis": bool(adm["infection"]),
        "pneumonia": bool(adm["pulmonary"]),
        "respiratory_failure": bool(adm["pulmonary"] and sev > 0.5) or sev > 1.2,
        "atrial_fibrillation": bool(adm["cardiac"]),
        "nstemi": bool(adm["cardiac"]),
        "acute_kidney_failure": sev > 0.8,
        "shock": sev > 1.3,
    }[name]


def patients_table(plan: ShardPlan) -> pd.DataFrame:
    """hosp/patients rows of the shard."""
    df = pd.DataFrame(plan.patients)
    df["dod"] = fmt_date(df["dod"].tolist())
    return df[COLUMNS["patients"]]


def admissions_table(plan: ShardPlan, rng: np.random.Generator) -> pd.DataFrame:
    """hosp/admissions rows of the shard (administrative fields drawn from ``rng``)."""
    rows = []
    for adm in plan.admissions:
        ed = adm["ed"]
        if ed:
            adm_type = rng.choice(["EW EMER.", "URGENT", "DIRECT EMER."], p=[0.7, 0.2, 0.1])
            location = "EMERGENCY ROOM"
            edreg = adm["admittime"] - int(rng.uniform(1, 8) * 3600)
            edout = adm["admittime"] + int(rng.uniform(0, 1) * 3600)
        else:
            adm_type = rng.choice(
                ["ELECTIVE", "SURGICAL SAME DAY ADMISSION", "OBSERVATION ADMIT", "URGENT"]
            )
            location = rng.choice(
                [
                    "TRANSFER FROM HOSPITAL",
                    "PHYSICIAN REFERRAL",
                    "CLINIC REFERRAL",
                    "WALK-IN/SELF REFERRAL",
                ]
            )
            edreg = edout = None
        if adm["died"]:
            disch_loc = "DIED"
        else:
            disch_loc = rng.choice(
                [
                    "HOME",
                    "HOME HEALTH CARE",
                    "SKILLED NURSING FACILITY",
                    "REHAB",
                    "CHRONIC/LONG TERM ACUTE CARE",
                    None,
                ],
                p=[0.35, 0.25, 0.2, 0.08, 0.04, 0.08],
            )
        rows.append(
            {
                "subject_id": adm["subject_id"],
                "hadm_id": adm["hadm_id"],
                "admittime": adm["admittime"],
                "dischtime": adm["dischtime"],
                "deathtime": adm["deathtime"],
                "admission_type": str(adm_type),
                "admit_provider_id": "P"
                + "".join(rng.choice(list("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"), 5)),
                "admission_location": str(location),
                "discharge_location": disch_loc,
                "insurance": str(
                    rng.choice(["Medicare", "Medicaid", "Other"], p=[0.45, 0.15, 0.4])
                ),
                "language": "ENGLISH" if rng.random() < 0.9 else "?",
                "marital_status": rng.choice(
                    ["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", None],
                    p=[0.45, 0.3, 0.12, 0.08, 0.05],
                ),
                "race": str(
                    rng.choice(
                        [
                            "WHITE",
                            "BLACK/AFRICAN AMERICAN",
                            "HISPANIC/LATINO - PUERTO RICAN",
                            "ASIAN",
                            "OTHER",
                            "UNKNOWN",
                        ],
                        p=[0.62, 0.14, 0.05, 0.04, 0.07, 0.08],
                    )
                ),
                "edregtime": edreg,
                "edouttime": edout,
                "hospital_expire_flag": int(adm["died"]),
            }
        )
    df = pd.DataFrame(rows, columns=COLUMNS["admissions"])
    for col in ("admittime", "dischtime", "deathtime", "edregtime", "edouttime"):
        df[col] = fmt_datetime(df[col].tolist())
    return df


def icustays_table(plan: ShardPlan) -> pd.DataFrame:
    """icu/icustays rows of the shard."""
    df = pd.DataFrame(plan.stays)
    df["intime"] = fmt_datetime(df["intime"].tolist())
    df["outtime"] = fmt_datetime(df["outtime"].tolist())
    return df[COLUMNS["icustays"]]


def diagnoses_table(plan: ShardPlan, rng: np.random.Generator) -> pd.DataFrame:
    """hosp/diagnoses_icd rows: phenotype codes that follow the factors plus background codes."""
    rows = []
    for adm in plan.admissions:
        col = 0 if adm["icd_version"] == 9 else 1
        codes = []
        for name, entry in PHENOTYPE_CODES.items():
            p = entry[2] if _phenotype_rule(name, adm) else entry[3]
            if rng.random() < p:
                codes.append(entry[col])
        for entry in BACKGROUND_CODES:
            if rng.random() < entry[2]:
                codes.append(entry[col])
        if not codes:
            codes.append(BACKGROUND_CODES[0][col])
        for seq, code in enumerate(codes, start=1):
            rows.append(
                {
                    "subject_id": adm["subject_id"],
                    "hadm_id": adm["hadm_id"],
                    "seq_num": seq,
                    "icd_code": code,
                    "icd_version": adm["icd_version"],
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS["diagnoses_icd"])


def d_items_table() -> pd.DataFrame:
    """icu/d_items rows for the chart items the corpus uses."""
    rows = []
    for itemid, (label, abbr, cat, unit, ptype, lo, hi) in sorted(CHART_ITEMS.items()):
        rows.append(
            {
                "itemid": itemid,
                "label": label,
                "abbreviation": abbr,
                "linksto": "chartevents",
                "category": cat,
                "unitname": unit,
                "param_type": ptype,
                "lownormalvalue": lo,
                "highnormalvalue": hi,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS["d_items"])


def d_labitems_table() -> pd.DataFrame:
    """hosp/d_labitems rows for the lab items the corpus uses."""
    rows = [
        {"itemid": k, "label": v[0], "fluid": v[1], "category": v[2]}
        for k, v in sorted(LAB_ITEMS.items())
    ]
    return pd.DataFrame(rows, columns=COLUMNS["d_labitems"])
