"""Cohorts and labels on MIMIC-IV, following mimic3-benchmarks conventions (as MedFuse ports them).

:func:`build_cohort` returns one row per ICU stay with its times, labels and a subject-level split.

Root cohort, rules applied in this order (each rule's exclusion count goes to
``df.attrs["exclusions"]`` and the log):

1. ``duplicate_stay_id`` (repeated rows of icustays), ``invalid_times``: intime / outtime
   missing or outtime <= intime;
2. ``missing_admission`` / ``missing_patient``: the stay's admission / patient is not in the tables;
3. ``multiple_icu_stays``: the admission holds more than one ICU stay (counted on the raw icustays);
4. ``careunit_transfer``: first_careunit != last_careunit;
5. ``age_under_18``: anchor_age < ``min_age`` (the name follows ``min_age``).

Task rules: ``ihm48`` / ``los3`` / ``los7`` predict at ``prediction_hours`` (48 h) after intime, so
they need LOS >= 48 h (``los_under_48h``) and at least one mapped EHR event in the first 48 h
(``no_observation_48h``; both names follow ``prediction_hours``). That check needs the events:
pass ``observed_stay_ids`` (e.g. :attr:`~clinical_moe.data.ehr.EhrEvents.window_stays` of
:func:`clinical_moe.data.ehr.load_ehr_events`), or build with ``check_observations=False`` and
apply :func:`exclude_unobserved` afterwards (preprocessing does this: one pass over the event
tables for both), or let it scan chartevents / labevents in chunks
(:func:`clinical_moe.data.ehr.observed_stays`; ids, itemid and charttime only: one extra pass over
the event tables), or switch it off with ``check_observations=False``. ``phenotype`` needs
``hosp/diagnoses_icd`` and drops admissions without any code (``no_diagnoses``); ``readmit30``
drops in-hospital deaths (``died_in_hospital``).

Labels: ``mortality`` (in-hospital death: hospital_expire_flag, or deathtime between admittime and
dischtime, or dod between their dates) is always present; ``los3`` / ``los7`` (LOS > 3 / 7 days);
one 0/1 column per phenotype of ``resources/phenotypes.yaml``; ``readmit30`` (a next admission
within 30 days of discharge). ``df.attrs["label_columns"]`` names the task's label columns.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from clinical_moe.data import damage
from clinical_moe.data.ehr import observed_stays
from clinical_moe.data.tables import find_table, read_table

logger = logging.getLogger(__name__)

TASKS = ("ihm48", "los3", "los7", "phenotype", "readmit30")
SPLITS = ("train", "val", "test")
DEFAULT_PHENOTYPES_FILE = Path(__file__).parent / "resources" / "phenotypes.yaml"

_PATIENT_COLS = ["subject_id", "gender", "anchor_age"]
_ADMISSION_COLS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime"]
_STAY_COLS = [
    "subject_id",
    "hadm_id",
    "stay_id",
    "first_careunit",
    "last_careunit",
    "intime",
    "outtime",
]


def stable_uniform(ids: Iterable[int], seed: int) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per id, from a hash of (seed, id).

    SplitMix64 finaliser on ``id XOR mix(seed)``: a pure function of the pair, so adding or
    removing other ids never changes an id's value (and so its split).
    """
    golden = np.uint64(0x9E3779B97F4A7C15)
    x = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        s = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * golden + golden
        x = (x ^ s) + golden
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def assign_splits(
    subject_ids: Iterable[int], seed: int = 0, split_fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> np.ndarray:
    """``"train"`` / ``"val"`` / ``"test"`` per subject id, stable under adding subjects.

    Raises:
        ValueError: If the three fractions are negative or do not sum to 1.
    """
    fr = np.asarray(split_fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1; got "
            f"{tuple(split_fractions)}"
        )
    u = stable_uniform(np.asarray(list(subject_ids), dtype=np.int64), seed)
    return np.asarray(SPLITS, dtype=object)[np.searchsorted(np.cumsum(fr)[:2], u, side="right")]


def load_phenotypes(path: str | Path | None = None) -> dict[str, dict[str, list[str]]]:
    """Read a phenotype file: ``{name: {"icd9": [prefixes], "icd10": [prefixes]}}``.

    Raises:
        ValueError: If the file is not a mapping of names to ``icd9`` / ``icd10`` prefix lists.
    """
    path = Path(path) if path is not None else DEFAULT_PHENOTYPES_FILE
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"phenotypes file {path} must map phenotype names to code prefixes")
    out = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or not set(spec) <= {"icd9", "icd10"}:
            raise ValueError(f"phenotypes file {path}: entry {name!r} needs only icd9/icd10 lists")
        out[str(name)] = {
            v: [str(p).replace(".", "").upper() for p in spec.get(v) or []]
            for v in ("icd9", "icd10")
        }
    return out


#: Tasks that predict at ``prediction_hours`` and so need an observation before it.
OBSERVATION_TASKS = ("ihm48", "los3", "los7")


def exclude_unobserved(
    cohort: pd.DataFrame,
    observed_stay_ids: Iterable[int] | None,
    prediction_hours: float = 48.0,
    root: str | Path | None = None,
) -> pd.DataFrame:
    """Apply the ``no_observation_<h>h`` rule to a cohort built with ``check_observations=False``.

    The same stays go as with the rule inside :func:`build_cohort` (splits are per subject hash,
    so the others keep theirs); the count is added to ``attrs["exclusions"]``. None for
    ``observed_stay_ids`` means no event table exists under ``root``: every stay stays, with a
    warning.
    """
    ex = dict(cohort.attrs.get("exclusions", {}))
    out = _drop_unobserved(cohort, observed_stay_ids, prediction_hours, ex, root)
    out = out.reset_index(drop=True)
    out.attrs = {**cohort.attrs, "exclusions": ex}
    return out


def _drop_unobserved(
    df: pd.DataFrame,
    observed_stay_ids: Iterable[int] | None,
    prediction_hours: float,
    ex: dict[str, int],
    root,
) -> pd.DataFrame:
    if observed_stay_ids is None:
        msg = (
            f"neither icu/chartevents nor hosp/labevents found under {root}: the "
            "'at least one observation' rule was not applied"
        )
        warnings.warn(msg, stacklevel=3)
        logger.warning(msg)
        observed_stay_ids = df["stay_id"].astype("int64").tolist()
    observed = pd.array(sorted(int(s) for s in observed_stay_ids), dtype="Int64")
    return _exclude(df, ~df["stay_id"].isin(observed), _unobserved_rule(prediction_hours), ex)


def _unobserved_rule(prediction_hours: float) -> str:
    return f"no_observation_{prediction_hours:g}h"


def _exclude(df: pd.DataFrame, bad, rule: str, exclusions: dict[str, int]) -> pd.DataFrame:
    bad = np.asarray(pd.Series(bad, index=df.index).fillna(True), dtype=bool)
    exclusions[rule] = int(bad.sum())
    if bad.any():
        logger.info("cohort: rule %r excluded %d stay(s)", rule, int(bad.sum()))
    return df[~bad]


def _mortality(df: pd.DataFrame) -> pd.Series:
    died = pd.Series(False, index=df.index)
    if "hospital_expire_flag" in df.columns:
        died |= df["hospital_expire_flag"].fillna(0).astype("int64") == 1
    died |= ((df["deathtime"] >= df["admittime"]) & (df["deathtime"] <= df["dischtime"])).fillna(
        False
    )
    if "dod" in df.columns:
        dod = df["dod"].dt.normalize()
        died |= (
            (dod >= df["admittime"].dt.normalize()) & (dod <= df["dischtime"].dt.normalize())
        ).fillna(False)
    return died.astype("int64")


def phenotype_labels(
    diagnoses: pd.DataFrame, hadm_ids: Iterable[int], phenotypes: dict[str, dict[str, list[str]]]
) -> pd.DataFrame:
    """0/1 phenotype columns per admission from ``hosp/diagnoses_icd`` rows (prefix match)."""
    code = (
        diagnoses["icd_code"]
        .astype("string")
        .str.strip()
        .str.replace(".", "", regex=False)
        .str.upper()
    )
    version = diagnoses["icd_version"]
    out = pd.DataFrame(index=pd.Index(pd.array(list(hadm_ids), dtype="Int64"), name="hadm_id"))
    for name, spec in phenotypes.items():
        hit = pd.Series(False, index=diagnoses.index)
        for ver, prefixes in ((9, spec["icd9"]), (10, spec["icd10"])):
            if prefixes:
                hit |= (version == ver).fillna(False) & code.str.startswith(tuple(prefixes)).fillna(
                    False
                )
        pos = set(diagnoses.loc[hit, "hadm_id"].dropna().astype("int64"))
        out[name] = out.index.isin(list(pos)).astype("int64")
    return out


def _readmit30(df: pd.DataFrame, admissions: pd.DataFrame) -> pd.Series:
    adm = admissions.sort_values(["subject_id", "admittime"])
    nxt = adm.groupby("subject_id")["admittime"].shift(-1)
    gap = (nxt - adm["dischtime"]).dt.total_seconds() / 86400.0
    flag = pd.Series(
        ((gap >= 0) & (gap <= 30)).fillna(False).astype("int64").to_numpy(),
        index=adm["hadm_id"].to_numpy(),
    )
    return df["hadm_id"].map(flag).fillna(0).astype("int64")


#: Plausible anchor_age range (MIMIC-IV caps ages at 91); outside it the patient row is dropped.
AGE_RANGE = (0, 120)
GENDERS = ("M", "F")


def _impossible_facts(
    patients: pd.DataFrame, admissions: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop or repair rows stating what cannot be true, counting each by reason.

    An admission discharged before it began and a patient aged outside :data:`AGE_RANGE` are
    dropped (their stays then fall under ``missing_admission`` / ``missing_patient``); a gender
    other than M / F becomes unknown (the row is kept).
    """
    log = damage.current()
    backwards = (admissions["dischtime"] < admissions["admittime"]).fillna(False)
    log.rows("hosp/admissions", "dischtime_before_admittime", int(backwards.sum()))
    age = patients["anchor_age"]
    bad_age = ((age < AGE_RANGE[0]) | (age > AGE_RANGE[1])).fillna(False)
    log.rows("hosp/patients", "anchor_age_out_of_range", int(bad_age.sum()))
    gender = patients["gender"].astype("string").str.strip().str.upper()
    unknown = gender.notna() & ~gender.isin(list(GENDERS)).fillna(False)
    log.rows("hosp/patients", "unknown_gender", int(unknown.sum()))
    patients = patients.assign(gender=gender.mask(unknown))
    return patients[~bad_age.to_numpy()], admissions[~backwards.to_numpy()]


def build_cohort(
    mimic_iv_root: str | Path,
    task: str = "ihm48",
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    min_age: int = 18,
    prediction_hours: float = 48.0,
    observed_stay_ids: Iterable[int] | None = None,
    check_observations: bool = True,
    phenotypes_file: str | Path | None = None,
    variables=None,
    chunksize: int = 1_000_000,
) -> pd.DataFrame:
    """Build the cohort of one task: one row per ICU stay with labels and a subject-level split.

    Args:
        mimic_iv_root: MIMIC-IV root with ``hosp/`` and ``icu/`` (``.csv.gz`` or ``.csv``).
        task: One of :data:`TASKS`.
        seed: Seed of the split hash; the same seed always gives the same split.
        split_fractions: Train / val / test fractions of subjects.
        min_age: Minimum anchor_age.
        prediction_hours: Prediction time after intime for ihm48 / los3 / los7.
        observed_stay_ids: Stays known to have an observation in the first ``prediction_hours``;
            if None the event tables are scanned (see the module docstring).
        check_observations: Apply the observation rule at all (ihm48 / los3 / los7).
        phenotypes_file: A user phenotype file (default ``resources/phenotypes.yaml``).
        variables: Variable map or its path, for the observation scan (default packaged map).
        chunksize: Rows per chunk when scanning event tables.

    Returns:
        DataFrame with ``subject_id, hadm_id, stay_id, intime, outtime, admittime, dischtime,
        los_hours, anchor_age, gender, ..., mortality, <task labels>, split``; ``attrs`` holds
        ``task``, ``label_columns`` and ``exclusions`` (rule -> number of stays excluded).

    Raises:
        ValueError: Unknown task or bad split fractions.
        FileNotFoundError: patients / admissions / icustays (or diagnoses_icd for ``phenotype``)
            absent; the message names the table and the root.
        clinical_moe.data.tables.TableError: A required table damaged (truncated, corrupt), empty,
            or missing a column: one line naming the file. Damaged rows are dropped and counted
            in the :mod:`~clinical_moe.data.damage` ledger instead.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    root = Path(mimic_iv_root)
    patients = read_table(root, "hosp/patients", _PATIENT_COLS, optional=["anchor_year", "dod"])
    admissions = read_table(
        root,
        "hosp/admissions",
        _ADMISSION_COLS,
        optional=["admission_type", "hospital_expire_flag"],
    )
    stays = read_table(root, "icu/icustays", _STAY_COLS)
    patients, admissions = _impossible_facts(patients, admissions)
    diagnoses = None
    if task == "phenotype":
        diagnoses = read_table(
            root, "hosp/diagnoses_icd", ["subject_id", "hadm_id", "icd_code", "icd_version"]
        )
    ex: dict[str, int] = {}
    df = stays
    hours = f"{prediction_hours:g}"
    df = _exclude(df, df["stay_id"].duplicated(), "duplicate_stay_id", ex)
    df = _exclude(df, ~(df["outtime"] > df["intime"]), "invalid_times", ex)
    df = _exclude(df, ~df["hadm_id"].isin(admissions["hadm_id"]), "missing_admission", ex)
    df = _exclude(df, ~df["subject_id"].isin(patients["subject_id"]), "missing_patient", ex)
    per_adm = stays.groupby("hadm_id")["stay_id"].nunique()
    df = _exclude(df, df["hadm_id"].map(per_adm) > 1, "multiple_icu_stays", ex)
    df = _exclude(df, df["first_careunit"] != df["last_careunit"], "careunit_transfer", ex)
    df = df.merge(patients.drop_duplicates("subject_id"), on="subject_id", how="left")
    df = _exclude(df, df["anchor_age"] < min_age, f"age_under_{min_age}", ex)
    df = df.merge(
        admissions.drop(columns="subject_id").drop_duplicates("hadm_id"), on="hadm_id", how="left"
    )
    df["los_hours"] = (df["outtime"] - df["intime"]).dt.total_seconds() / 3600.0
    df["mortality"] = _mortality(df)
    labels = ["mortality"]
    if task in OBSERVATION_TASKS:
        df = _exclude(df, df["los_hours"] < prediction_hours, f"los_under_{hours}h", ex)
        if check_observations:
            if observed_stay_ids is None and any(
                find_table(root, t, required=False) is not None
                for t in ("icu/chartevents", "hosp/labevents")
            ):
                observed_stay_ids = observed_stays(
                    root, df, prediction_hours, variables, chunksize=chunksize
                )
            df = _drop_unobserved(df, observed_stay_ids, prediction_hours, ex, root)
        if task != "ihm48":
            days = 3 if task == "los3" else 7
            df[task] = (df["los_hours"] > 24.0 * days).astype("int64")
            labels = [task]
    elif task == "phenotype":
        df = _exclude(df, ~df["hadm_id"].isin(diagnoses["hadm_id"]), "no_diagnoses", ex)
        table = phenotype_labels(diagnoses, df["hadm_id"], load_phenotypes(phenotypes_file))
        df = df.merge(table, left_on="hadm_id", right_index=True, how="left")
        labels = list(table.columns)
    elif task == "readmit30":
        df = _exclude(df, df["mortality"] == 1, "died_in_hospital", ex)
        df["readmit30"] = _readmit30(df, admissions)
        labels = ["readmit30"]
    df = df.sort_values("stay_id", ignore_index=True)
    df["split"] = assign_splits(df["subject_id"].astype("int64"), seed, split_fractions)
    df.attrs.update(task=task, label_columns=labels, exclusions=dict(ex))
    logger.info(
        "cohort %s: %d stays of %d subjects kept; exclusions %s",
        task,
        len(df),
        df["subject_id"].nunique(),
        ex,
    )
    return df
