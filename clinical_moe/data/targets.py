"""Modality-native labels as per-event targets: CheXpert findings per radiograph, machine statements
and intervals per ECG.

The mortality label alone is too weak a teacher for an image or waveform encoder (issue 12). Real
MIMIC ships labels that belong to each modality, and the synthetic corpus writes the same files:

- **CXR**: ``mimic-cxr-2.0.0-chexpert.csv.gz`` (or ``-negbio``) holds, per study
  (subject_id, study_id), 14 findings valued 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or
  blank (not mentioned). Every image of a study gets its study's row.
- **ECG**: ``machine_measurements.csv`` holds, per study_id, the cart's statements
  (``report_0`` .. ``report_17``) and its interval measurements (29999 = not measured).

Targets are float32 ``(n_events, K)`` with NaN where a value is unknown: no label row for the study,
a blank (when blanks are ignored), an uncertain label (when uncertain ones are ignored), a missing
measurement, or an implausible one. Binary targets are 0 / 1; continuous ones are standardised with
statistics fitted on the train split (stored in the cache summary so predictions can be mapped back).
This module reads and parses the tables; :mod:`clinical_moe.data.event_targets` joins them to the
paired events for preprocessing.

No report text leaves this module: statements are matched against a fixed vocabulary and only the
vocabulary names and counts are returned.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.pairing import read_csv_table

logger = logging.getLogger(__name__)

#: Bumped whenever the vocabulary, the parsing or the derived quantities change; part of the cache
#: fingerprint so a cache built with older targets is rebuilt rather than silently reused.
TARGETS_VERSION = 1

CHEXPERT_FINDINGS = (
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
)
CHEXPERT_STEMS = {"chexpert": "mimic-cxr-2.0.0-chexpert", "negbio": "mimic-cxr-2.0.0-negbio"}
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
BLANK_POLICIES = ("zero", "ignore")

# Per finding: (pattern that must match one statement, pattern that vetoes that statement). Matched
# case-insensitively on each report_i separately, in the wording of the GE / Philips carts behind
# MIMIC-IV-ECG ("Sinus rhythm", "Atrial fibrillation with rapid ventricular response", "Right bundle
# branch block", "Anterior ST elevation", "ST-T changes may be due to myocardial ischemia",
# "Abnormal ECG", ...). The veto drops negated or serial-comparison statements ("... no longer
# present", "... has replaced ...") and partial forms that mean something else ("Incomplete right
# bundle branch block" has a normal QRS width).
_NEGATED = r"\bno\b|\bnot\b|\bwithout\b|no longer|replaced|\bresolved\b"
ECG_STATEMENTS: dict[str, tuple[str, str]] = {
    "sinus_rhythm": (r"\bsinus (?:rhythm|tachycardia|bradycardia|arrhythmia)\b", _NEGATED),
    "atrial_fibrillation": (r"atrial fibrillation|\ba-?fib\b", _NEGATED),
    "tachycardia": (r"tachycardia|rapid ventricular response", _NEGATED),
    "bradycardia": (r"bradycardia|slow ventricular response", _NEGATED),
    "bundle_branch_block": (
        r"bundle branch block|\b[rl]bbb\b|intraventricular conduction (?:delay|defect)|\bivcd\b"
        r"|wide qrs",
        _NEGATED + r"|incomplete",
    ),
    "st_elevation": (r"\bst[- ]elevation|\bstemi\b|acute (?:mi|infarct)|injury current", _NEGATED),
    "st_depression_ischemia": (
        r"\bst[- ]depression|ischemi|subendocardial injury",
        _NEGATED,
    ),
    "abnormal_ecg": (r"\babnormal (?:ecg|ekg)\b", _NEGATED),
}
_COMPILED = {
    name: (re.compile(inc, re.IGNORECASE), re.compile(exc, re.IGNORECASE))
    for name, (inc, exc) in ECG_STATEMENTS.items()
}
REPORT_COLUMNS = tuple(f"report_{i}" for i in range(18))

# Continuous targets derived from the cart's fiducial points (ms) and RR interval, with the range
# outside of which a value is treated as a measurement error (NaN). (name, plausible range)
ECG_INTERVALS: dict[str, tuple[float, float]] = {
    "heart_rate": (20.0, 300.0),  # 60000 / rr_interval, beats per minute
    "pr_interval": (40.0, 500.0),  # qrs_onset - p_onset, ms (no P wave in AF -> NaN)
    "qrs_duration": (30.0, 300.0),  # qrs_end - qrs_onset, ms
    "qt_interval": (150.0, 800.0),  # t_end - qrs_onset, ms
}


def target_kinds() -> dict[str, dict[str, str]]:
    """``{modality: {target name: "binary" | "continuous"}}`` for every target this module makes."""
    return {
        "cxr": dict.fromkeys(CHEXPERT_FINDINGS, "binary"),
        "ecg": {
            **dict.fromkeys(ECG_STATEMENTS, "binary"),
            **dict.fromkeys(ECG_INTERVALS, "continuous"),
        },
    }


def target_names() -> dict[str, list[str]]:
    """``{modality: [target names in column order]}``."""
    return {m: list(kinds) for m, kinds in target_kinds().items()}


# --------------------------------------------------------------------------------------------- CXR


def read_chexpert(cxr_root: str | Path, source: str = "chexpert") -> pd.DataFrame | None:
    """Read the CheXpert (or NegBio) label table of a MIMIC-CXR release, or None when it is absent.

    Args:
        cxr_root: The release folder (``mimic-cxr/``).
        source: ``"chexpert"`` -> ``mimic-cxr-2.0.0-chexpert.csv(.gz)``, ``"negbio"`` ->
            ``mimic-cxr-2.0.0-negbio.csv(.gz)``.

    Returns:
        subject_id, study_id and the 14 findings as float64 (NaN = blank), or None with a warning
        naming the file looked for. Findings the file lacks are blank.

    Raises:
        LoaderError: The file exists but is empty, lacks the ids, or holds unparseable values.
    """
    if source not in CHEXPERT_STEMS:
        raise ValueError(
            f"CheXpert label source must be one of {list(CHEXPERT_STEMS)}, got {source!r}"
        )
    root = Path(cxr_root)
    stem = CHEXPERT_STEMS[source]
    path = next(
        (root / f"{stem}{s}" for s in (".csv.gz", ".csv") if (root / f"{stem}{s}").is_file()), None
    )
    if path is None:
        warnings.warn(
            f"{root / (stem + '.csv.gz')} not found: CXR events get no CheXpert targets",
            stacklevel=2,
        )
        return None
    dtypes = {
        "subject_id": "Int64",
        "study_id": "Int64",
        **dict.fromkeys(CHEXPERT_FINDINGS, "float64"),
    }
    frame = read_csv_table(path, dtypes, ("subject_id", "study_id"))
    for name in CHEXPERT_FINDINGS:
        if name not in frame.columns:
            frame[name] = np.nan
    bad = (
        ~frame[list(CHEXPERT_FINDINGS)].isin([1.0, 0.0, -1.0])
        & frame[list(CHEXPERT_FINDINGS)].notna()
    )
    if bad.any().any():
        from clinical_moe.data.errors import LoaderError

        cols = [c for c in CHEXPERT_FINDINGS if bad[c].any()]
        raise LoaderError(path, "bad_value", f"label values other than 1, 0, -1, blank in {cols}")
    return frame[["subject_id", "study_id", *CHEXPERT_FINDINGS]]


def chexpert_targets(
    labels: pd.DataFrame, uncertain: str = "ignore", blank: str = "zero"
) -> pd.DataFrame:
    """Map CheXpert values to training targets, one row per (subject_id, study_id).

    Policies follow the CheXpert paper's names (Irvin et al., AAAI 2019, sec. 4.1). ``uncertain``:
    ``"ignore"`` (U-Ignore: -1 -> NaN, masked out of the loss; the default, as in torchxrayvision's
    MIMIC loader, because it adds no label noise in either direction and the paper found no single
    policy best across findings), ``"ones"`` (U-Ones) or ``"zeros"`` (U-Zeros). ``blank``:
    ``"zero"`` (not mentioned in the report = absent, the usual CheXpert training convention; the
    default) or ``"ignore"`` (blank -> NaN).

    Returns:
        Indexed by (subject_id, study_id), the 14 findings as float32; duplicated studies keep their
        first row (counted in the log).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"chexpert_uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}"
        )
    if blank not in BLANK_POLICIES:
        raise ValueError(f"chexpert_blank must be one of {BLANK_POLICIES}, got {blank!r}")
    values = labels[list(CHEXPERT_FINDINGS)].to_numpy(np.float64)  # (n, 14)
    out = values.copy()
    out[values == -1.0] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    out[np.isnan(values)] = 0.0 if blank == "zero" else np.nan
    index = pd.MultiIndex.from_arrays(
        [labels["subject_id"].astype("int64"), labels["study_id"].astype("int64")],
        names=["subject_id", "study_id"],
    )
    frame = pd.DataFrame(out.astype(np.float32), index=index, columns=list(CHEXPERT_FINDINGS))
    dup = frame.index.duplicated()
    if dup.any():
        logger.warning(
            "CheXpert labels: %d duplicated study row(s); the first is kept", int(dup.sum())
        )
        frame = frame[~dup]
    return frame


# --------------------------------------------------------------------------------------------- ECG


def parse_statements(measurements: pd.DataFrame) -> pd.DataFrame:
    """Binary findings from the machine statements, one row per measurements row.

    Each ``report_i`` is matched on its own against :data:`ECG_STATEMENTS`. A finding is 1 when any
    statement names it, 0 otherwise; the whole row is NaN when every statement is blank (no report
    to read). Carts repeat a few thousand distinct statements, so each distinct one is matched
    once. The text itself is never returned or logged.

    Returns:
        float32 frame with the vocabulary names as columns and the input's index.
    """
    cols = [c for c in REPORT_COLUMNS if c in measurements.columns]
    n = len(measurements)
    out = np.zeros((n, len(ECG_STATEMENTS)), np.float32)  # (n, K_bin)
    if not cols:
        out[:] = np.nan
        return pd.DataFrame(out, index=measurements.index, columns=list(ECG_STATEMENTS))
    text = measurements[cols].astype("string").apply(lambda c: c.str.strip()).to_numpy(object)
    text = np.where(pd.isna(text), "", text).astype(str)  # (n, n_cols)
    distinct, inverse = np.unique(text, return_inverse=True)
    hits = np.array(
        [
            [bool(inc.search(t)) and not exc.search(t) for inc, exc in _COMPILED.values()]
            for t in distinct
        ],
        bool,
    ).reshape(len(distinct), len(ECG_STATEMENTS))  # (n_distinct, K_bin)
    per_cell = hits[inverse.reshape(text.shape)]  # (n, n_cols, K_bin)
    out[per_cell.any(1)] = 1.0
    out[(text == "").all(1)] = np.nan
    return pd.DataFrame(out, index=measurements.index, columns=list(ECG_STATEMENTS))


def derive_intervals(measurements: pd.DataFrame) -> pd.DataFrame:
    """Heart rate and the PR / QRS / QT intervals (raw units) from the cart's fiducial points.

    Expects 29999 already turned into NaN (as :func:`clinical_moe.data.ecg.read_machine_measurements`
    does); values outside :data:`ECG_INTERVALS`' plausible ranges become NaN.
    """

    def col(name: str) -> pd.Series:
        if name not in measurements.columns:
            return pd.Series(np.nan, index=measurements.index)
        return pd.to_numeric(measurements[name], errors="coerce").astype("float64")

    rr = col("rr_interval")
    raw = {
        "heart_rate": 60000.0 / rr.where(rr > 0),
        "pr_interval": col("qrs_onset") - col("p_onset"),
        "qrs_duration": col("qrs_end") - col("qrs_onset"),
        "qt_interval": col("t_end") - col("qrs_onset"),
    }
    frame = pd.DataFrame(raw, index=measurements.index)
    for name, (lo, hi) in ECG_INTERVALS.items():
        frame[name] = frame[name].where(frame[name].between(lo, hi))
    return frame.astype(np.float32)


def ecg_targets(measurements: pd.DataFrame) -> pd.DataFrame:
    """Binary statements then raw intervals, indexed by study_id (duplicates keep the first row)."""
    frame = pd.concat([parse_statements(measurements), derive_intervals(measurements)], axis=1)
    frame.index = pd.Index(measurements["study_id"].astype("int64"), name="study_id")
    dup = frame.index.duplicated()
    if dup.any():
        logger.warning(
            "machine_measurements: %d duplicated study_id row(s); the first is kept", int(dup.sum())
        )
        frame = frame[~dup]
    return frame
