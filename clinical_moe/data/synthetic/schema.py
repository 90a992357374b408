"""Column lists and dictionary tables of the MIMIC releases that the generator writes.

The column lists follow the MIMIC-IV 2.2 / MIMIC-CXR 2.0.0 / MIMIC-IV-ECG 1.0 / MIMIC-IV-Note 2.2
schemas (see the design page MIMIC_FORMATS.md), in their published order.
"""

from __future__ import annotations

from clinical_moe.data.targets import CHEXPERT_FINDINGS

COLUMNS: dict[str, list[str]] = {
    "patients": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "admissions": [
        "subject_id",
        "hadm_id",
        "admittime",
        "dischtime",
        "deathtime",
        "admission_type",
        "admit_provider_id",
        "admission_location",
        "discharge_location",
        "insurance",
        "language",
        "marital_status",
        "race",
        "edregtime",
        "edouttime",
        "hospital_expire_flag",
    ],
    "icustays": [
        "subject_id",
        "hadm_id",
        "stay_id",
        "first_careunit",
        "last_careunit",
        "intime",
        "outtime",
        "los",
    ],
    "labevents": [
        "labevent_id",
        "subject_id",
        "hadm_id",
        "specimen_id",
        "itemid",
        "order_provider_id",
        "charttime",
        "storetime",
        "value",
        "valuenum",
        "valueuom",
        "ref_range_lower",
        "ref_range_upper",
        "flag",
        "priority",
        "comments",
    ],
    "d_labitems": ["itemid", "label", "fluid", "category"],
    "chartevents": [
        "subject_id",
        "hadm_id",
        "stay_id",
        "caregiver_id",
        "charttime",
        "storetime",
        "itemid",
        "value",
        "valuenum",
        "valueuom",
        "warning",
    ],
    "d_items": [
        "itemid",
        "label",
        "abbreviation",
        "linksto",
        "category",
        "unitname",
        "param_type",
        "lownormalvalue",
        "highnormalvalue",
    ],
    "diagnoses_icd": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "cxr_metadata": [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ],
    "cxr_chexpert": [
        "subject_id",
        "study_id",
        *CHEXPERT_FINDINGS,  # the loader's list: the corpus writes what the loader reads
    ],
    "cxr_records": ["subject_id", "study_id", "dicom_id", "path"],
    "ecg_records": ["subject_id", "study_id", "file_name", "ecg_time", "path"],
    "ecg_measurements": (
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
    ),
    "notes": [
        "note_id",
        "subject_id",
        "hadm_id",
        "note_type",
        "note_seq",
        "charttime",
        "storetime",
        "text",
    ],
}

# Relative output path of every table, keyed like COLUMNS (notes are split by type).
TABLE_PATHS: dict[str, str] = {
    "patients": "mimic-iv/hosp/patients.csv.gz",
    "admissions": "mimic-iv/hosp/admissions.csv.gz",
    "labevents": "mimic-iv/hosp/labevents.csv.gz",
    "d_labitems": "mimic-iv/hosp/d_labitems.csv.gz",
    "diagnoses_icd": "mimic-iv/hosp/diagnoses_icd.csv.gz",
    "icustays": "mimic-iv/icu/icustays.csv.gz",
    "chartevents": "mimic-iv/icu/chartevents.csv.gz",
    "d_items": "mimic-iv/icu/d_items.csv.gz",
    "cxr_metadata": "mimic-cxr/mimic-cxr-2.0.0-metadata.csv.gz",
    "cxr_chexpert": "mimic-cxr/mimic-cxr-2.0.0-chexpert.csv.gz",
    "cxr_records": "mimic-cxr/cxr-record-list.csv.gz",
    "ecg_records": "mimic-iv-ecg/record_list.csv",
    "ecg_measurements": "mimic-iv-ecg/machine_measurements.csv",
    "radiology": "mimic-iv-note/note/radiology.csv.gz",
    "discharge": "mimic-iv-note/note/discharge.csv.gz",
    "truth_stays": "truth/stays.csv.gz",
    "truth_studies": "truth/studies.csv.gz",
}

# Chart items (MIMIC-IV itemids) written to icu/chartevents, with their d_items row:
# itemid: (label, abbreviation, category, unitname, param_type, lownormal, highnormal).
CHART_ITEMS: dict[int, tuple] = {
    220045: ("Heart Rate", "HR", "Routine Vital Signs", "bpm", "Numeric", None, None),
    220179: (
        "Non Invasive Blood Pressure systolic",
        "NBPs",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    220180: (
        "Non Invasive Blood Pressure diastolic",
        "NBPd",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    220181: (
        "Non Invasive Blood Pressure mean",
        "NBPm",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    220050: (
        "Arterial Blood Pressure systolic",
        "ABPs",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        90,
        140,
    ),
    220051: (
        "Arterial Blood Pressure diastolic",
        "ABPd",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        60,
        90,
    ),
    220052: (
        "Arterial Blood Pressure mean",
        "ABPm",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    220210: ("Respiratory Rate", "RR", "Respiratory", "insp/min", "Numeric", None, None),
    220277: ("O2 saturation pulseoxymetry", "SpO2", "Respiratory", "%", "Numeric", None, None),
    223761: (
        "Temperature Fahrenheit",
        "Temperature F",
        "Routine Vital Signs",
        "°F",
        "Numeric",
        None,
        None,
    ),
    223762: (
        "Temperature Celsius",
        "Temperature C",
        "Routine Vital Signs",
        "°C",
        "Numeric",
        None,
        None,
    ),
    223835: ("Inspired O2 Fraction", "FiO2", "Respiratory", None, "Numeric", None, None),
    220621: ("Glucose (serum)", "Glucose (serum)", "Labs", "mg/dL", "Numeric", 70, 105),
    220274: ("PH (Venous)", "PH (Venous)", "Labs", None, "Numeric", 7.31, 7.41),
    226730: ("Height (cm)", "Height (cm)", "General", "cm", "Numeric", None, None),
    226707: ("Height", "Height", "General", "Inch", "Numeric", None, None),
    226512: ("Admission Weight (Kg)", "Admit Wt", "General", "kg", "Numeric", None, None),
    226531: (
        "Admission Weight (lbs.)",
        "Admission Weight (lbs.)",
        "General",
        "lbs",
        "Numeric",
        None,
        None,
    ),
    224639: ("Daily Weight", "Daily Weight", "General", "kg", "Numeric", None, None),
    220739: ("GCS - Eye Opening", "GCS - Eye Opening", "Neurological", None, "Text", None, None),
    223900: (
        "GCS - Verbal Response",
        "GCS - Verbal Response",
        "Neurological",
        None,
        "Text",
        None,
        None,
    ),
    223901: (
        "GCS - Motor Response",
        "GCS - Motor Response",
        "Neurological",
        None,
        "Text",
        None,
        None,
    ),
    223951: (
        "Capillary Refill R",
        "Capillary Refill R",
        "Skin - Assessment",
        None,
        "Text",
        None,
        None,
    ),
}

# Lab items (MIMIC-IV itemids) written to hosp/labevents:
# itemid: (label, fluid, category, unit, ref_lower, ref_upper, decimals).
LAB_ITEMS: dict[int, tuple] = {
    51301: ("White Blood Cells", "Blood", "Hematology", "K/uL", 4.0, 11.0, 1),
    50813: ("Lactate", "Blood", "Blood Gas", "mmol/L", 0.5, 2.0, 1),
    50912: ("Creatinine", "Blood", "Chemistry", "mg/dL", 0.5, 1.2, 1),
    50931: ("Glucose", "Blood", "Chemistry", "mg/dL", 70.0, 100.0, 0),
    50809: ("Glucose", "Blood", "Blood Gas", "mg/dL", 70.0, 105.0, 0),
    50820: ("pH", "Blood", "Blood Gas", "units", 7.35, 7.45, 2),
    50817: ("Oxygen Saturation", "Blood", "Blood Gas", "%", None, None, 0),
}

# Real MIMIC-IV strings of the GCS components, by score.
GCS_EYE = {4: "Spontaneously", 3: "To Speech", 2: "To Pain", 1: "No Response"}
GCS_VERBAL = {
    5: "Oriented",
    4: "Confused",
    3: "Inappropriate Words",
    2: "Incomprehensible sounds",
    1: "No Response",
}
GCS_VERBAL_INTUBATED = "No Response-ETT"
GCS_MOTOR = {
    6: "Obeys Commands",
    5: "Localizes Pain",
    4: "Flex-withdraws",
    3: "Abnormal Flexion",
    2: "Abnormal extension",
    1: "No response",
}
CAP_REFILL = ("Normal <3 secs", "Abnormal >3 secs")

ECG_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
