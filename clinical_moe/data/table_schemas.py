"""Column kinds of the MIMIC-IV / MIMIC-IV-Note tables (MIMIC_FORMATS.md), used by :mod:`.tables`.

Also which tables a run cannot do without (:data:`REQUIRED_TABLES`) and which columns a row cannot
do without (:data:`KEY_COLUMNS`): a row whose key is blank or unparseable is dropped and counted.
"""

from __future__ import annotations

# Column kinds: "id" -> Int64, "float" -> float64, "str" -> string, "time" -> datetime64.
_ID, _FLOAT, _STR, _TIME = "id", "float", "str", "time"
TIME_KIND = _TIME

#: Column kinds of the MIMIC-IV / MIMIC-IV-Note tables we read (MIMIC_FORMATS.md). Columns not
#: listed here are read as ``string``.
TABLE_SCHEMAS: dict[str, dict[str, str]] = {
    "hosp/patients": {
        "subject_id": _ID,
        "gender": _STR,
        "anchor_age": _ID,
        "anchor_year": _ID,
        "anchor_year_group": _STR,
        "dod": _TIME,
    },
    "hosp/admissions": {
        "subject_id": _ID,
        "hadm_id": _ID,
        "admittime": _TIME,
        "dischtime": _TIME,
        "deathtime": _TIME,
        "admission_type": _STR,
        "admit_provider_id": _STR,
        "admission_location": _STR,
        "discharge_location": _STR,
        "insurance": _STR,
        "language": _STR,
        "marital_status": _STR,
        "race": _STR,
        "edregtime": _TIME,
        "edouttime": _TIME,
        "hospital_expire_flag": _ID,
    },
    "icu/icustays": {
        "subject_id": _ID,
        "hadm_id": _ID,
        "stay_id": _ID,
        "first_careunit": _STR,
        "last_careunit": _STR,
        "intime": _TIME,
        "outtime": _TIME,
        "los": _FLOAT,
    },
    "hosp/labevents": {
        "labevent_id": _ID,
        "subject_id": _ID,
        "hadm_id": _ID,
        "specimen_id": _ID,
        "itemid": _ID,
        "order_provider_id": _STR,
        "charttime": _TIME,
        "storetime": _TIME,
        "value": _STR,
        "valuenum": _FLOAT,
        "valueuom": _STR,
        "ref_range_lower": _FLOAT,
        "ref_range_upper": _FLOAT,
        "flag": _STR,
        "priority": _STR,
        "comments": _STR,
    },
    "hosp/d_labitems": {"itemid": _ID, "label": _STR, "fluid": _STR, "category": _STR},
    "icu/chartevents": {
        "subject_id": _ID,
        "hadm_id": _ID,
        "stay_id": _ID,
        "caregiver_id": _ID,
        "charttime": _TIME,
        "storetime": _TIME,
        "itemid": _ID,
        "value": _STR,
        "valuenum": _FLOAT,
        "valueuom": _STR,
        "warning": _ID,
    },
    "icu/d_items": {
        "itemid": _ID,
        "label": _STR,
        "abbreviation": _STR,
        "linksto": _STR,
        "category": _STR,
        "unitname": _STR,
        "param_type": _STR,
        "lownormalvalue": _FLOAT,
        "highnormalvalue": _FLOAT,
    },
    "hosp/diagnoses_icd": {
        "subject_id": _ID,
        "hadm_id": _ID,
        "seq_num": _ID,
        "icd_code": _STR,
        "icd_version": _ID,
    },
}
_NOTE_SCHEMA = {
    "note_id": _STR,
    "subject_id": _ID,
    "hadm_id": _ID,
    "note_type": _STR,
    "note_seq": _ID,
    "charttime": _TIME,
    "storetime": _TIME,
    "text": _STR,
}
TABLE_SCHEMAS["note/radiology"] = dict(_NOTE_SCHEMA)
TABLE_SCHEMAS["note/discharge"] = dict(_NOTE_SCHEMA)

PANDAS_DTYPE = {_ID: "Int64", _FLOAT: "float64", _STR: "string", _TIME: "string"}

#: Tables whose damage stops the run; every other table is optional (damaged = absent + warning).
REQUIRED_TABLES = ("hosp/patients", "hosp/admissions", "icu/icustays")

_NOTE_KEYS = ("subject_id", "charttime")
#: Columns a row cannot do without, per table: a blank or unparseable value drops the row.
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "hosp/patients": ("subject_id",),
    "hosp/admissions": ("subject_id", "hadm_id", "admittime"),
    "icu/icustays": ("subject_id", "hadm_id", "stay_id"),
    "hosp/labevents": ("subject_id", "itemid", "charttime"),
    "icu/chartevents": ("stay_id", "itemid", "charttime"),
    "hosp/diagnoses_icd": ("hadm_id", "icd_code"),
    "hosp/d_labitems": ("itemid",),
    "icu/d_items": ("itemid",),
    "note/radiology": _NOTE_KEYS,
    "note/discharge": _NOTE_KEYS,
}
