"""Per-event targets for preprocessing: join the label tables of :mod:`clinical_moe.data.targets`
to the paired events, standardise continuous targets on the train split, and count.

:func:`cxr_event_targets` and :func:`ecg_event_targets` return one row per paired event (row for
row with the pairing frame) and fill the cache summary's ``targets`` (names), ``target_kinds``,
``target_stats`` (train mean / std of continuous targets, to map predictions back to ms / bpm) and
``target_counts`` (events, events without a label row, known and positive counts per target, or the
missing file). Counts only: no statement or report text reaches the summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.targets import (
    CHEXPERT_FINDINGS,
    CHEXPERT_STEMS,
    chexpert_targets,
    ecg_targets,
    read_chexpert,
    target_kinds,
    target_names,
)


def lookup(table: pd.DataFrame, keys: pd.DataFrame | pd.Series) -> np.ndarray:
    """Rows of ``table`` for each key (index values), NaN rows where a key has no label row.

    Args:
        table: Targets indexed by study key (study_id, or (subject_id, study_id)).
        keys: One key per event, in event order: a Series of study ids or a frame of key columns.

    Returns:
        float32 ``(n_events, K)``.
    """
    if isinstance(keys, pd.DataFrame):
        index = pd.MultiIndex.from_frame(keys.astype("int64"))
    else:
        index = pd.Index(keys.astype("int64"))
    return table.reindex(index).to_numpy(np.float32)


def fit_standardiser(values: np.ndarray, kinds: Sequence[str]) -> dict[str, list[float]]:
    """Mean / std per continuous column over ``values`` (the train split's events), NaNs ignored.

    Binary columns get mean 0, std 1 (left as they are). A column with no finite value gets 0 / 1.
    """
    mean = np.zeros(len(kinds))
    std = np.ones(len(kinds))
    for k, kind in enumerate(kinds):
        col = values[:, k] if len(values) else np.zeros(0)
        col = col[np.isfinite(col)]
        if kind == "continuous" and len(col):
            mean[k] = float(col.mean())
            std[k] = float(max(col.std(), 1e-6))
    return {"mean": mean.tolist(), "std": std.tolist()}


def standardise(values: np.ndarray, stats: dict[str, list[float]]) -> np.ndarray:
    """``(values - mean) / std`` column-wise, NaN kept; float32."""
    mean = np.asarray(stats["mean"], np.float64)
    std = np.asarray(stats["std"], np.float64)
    return ((values.astype(np.float64) - mean) / std).astype(np.float32)


def target_counts(values: np.ndarray, names: Sequence[str], kinds: Sequence[str]) -> dict:
    """Per target: known events and (binary) positives. Counts only; no patient content."""
    out = {}
    for k, (name, kind) in enumerate(zip(names, kinds)):
        col = values[:, k] if len(values) else np.zeros(0, np.float32)
        known = np.isfinite(col)
        out[name] = {"known": int(known.sum())}
        if kind == "binary":
            out[name]["positive"] = int((col[known] == 1.0).sum())
    return out


# ------------------------------------------------------------------------------ planning (per pair)


def _record(
    summary: dict, modality: str, values: np.ndarray, split: np.ndarray, extra: dict
) -> np.ndarray:
    """Standardise continuous columns on the train events; write names, kinds, stats, counts."""
    kinds = list(target_kinds()[modality].values())
    names = target_names()[modality]
    stats = fit_standardiser(values[split == "train"], kinds)
    summary["targets"][modality] = names
    summary["target_kinds"][modality] = dict(zip(names, kinds))
    if "continuous" in kinds:
        summary["target_stats"][modality] = {
            n: {"mean": stats["mean"][k], "std": stats["std"][k]}
            for k, (n, kind) in enumerate(zip(names, kinds))
            if kind == "continuous"
        }
    summary["target_counts"][modality] = {
        **extra,
        "events": len(values),
        "per_target": target_counts(values, names, kinds),
    }
    return standardise(values, stats)


def _splits(pairs: pd.DataFrame, cohort: pd.DataFrame) -> np.ndarray:
    split_of = dict(zip(cohort["stay_id"].astype(int), cohort["split"]))
    return pairs["stay_id"].astype(int).map(split_of).to_numpy(object)


def cxr_event_targets(
    pairs: pd.DataFrame, cxr_root: Path, cohort: pd.DataFrame, d, summary: dict
) -> np.ndarray | None:
    """CheXpert targets of each paired image (row for row with ``pairs``), or None without labels.

    Args:
        pairs: Output of :func:`clinical_moe.data.cxr.pair_cxr` (subject_id, study_id per image).
        cxr_root: The MIMIC-CXR release folder.
        cohort: The stays (stay_id, split).
        d: The data config (``cxr_label_source``, ``chexpert_uncertain``, ``chexpert_blank``).
        summary: The preprocessing summary, updated in place (names, kinds, counts).

    Returns:
        float32 ``(len(pairs), 14)`` or None when the label file is absent (counted in
        ``summary["target_counts"]["cxr"]``).
    """
    labels = read_chexpert(cxr_root, d.cxr_label_source)
    stem = CHEXPERT_STEMS[d.cxr_label_source]
    if labels is None:
        summary["target_counts"]["cxr"] = {"labels_file": None, "missing_file": f"{stem}.csv.gz"}
        return None
    table = chexpert_targets(labels, d.chexpert_uncertain, d.chexpert_blank)
    values = (
        lookup(table, pairs[["subject_id", "study_id"]])
        if len(pairs)
        else np.zeros((0, len(CHEXPERT_FINDINGS)), np.float32)
    )
    keys = pd.MultiIndex.from_frame(pairs[["subject_id", "study_id"]].astype("int64"))
    extra = {
        "labels_file": stem,
        "uncertain": d.chexpert_uncertain,
        "blank": d.chexpert_blank,
        "events_without_label_row": int((~keys.isin(table.index)).sum()),
    }
    return _record(summary, "cxr", values, _splits(pairs, cohort), extra)


def ecg_event_targets(
    pairs: pd.DataFrame, ecg_root: Path, cohort: pd.DataFrame, summary: dict
) -> np.ndarray | None:
    """Machine-statement and interval targets of each paired ECG, or None without the table.

    Args:
        pairs: Output of :func:`clinical_moe.data.ecg.pair_ecg` (study_id per record).
        ecg_root: The MIMIC-IV-ECG release folder.
        cohort: The stays (stay_id, split).
        summary: The preprocessing summary, updated in place.

    Returns:
        float32 ``(len(pairs), 12)``: 8 binary statements then 4 intervals standardised with the
        train events' mean / std; None when ``machine_measurements.csv`` is absent.
    """
    from clinical_moe.data.ecg import read_machine_measurements

    measurements = read_machine_measurements(ecg_root)
    if measurements is None:
        warnings.warn(
            f"{Path(ecg_root) / 'machine_measurements.csv'} not found: ECG events get no targets",
            stacklevel=2,
        )
        summary["target_counts"]["ecg"] = {
            "labels_file": None,
            "missing_file": "machine_measurements.csv",
        }
        return None
    # only the paired studies' statements are parsed (the full release has ~800,000 rows)
    measurements = measurements[measurements["study_id"].isin(pairs["study_id"].astype("int64"))]
    table = ecg_targets(measurements)
    values = (
        lookup(table, pairs["study_id"])
        if len(pairs)
        else np.zeros((0, table.shape[1]), np.float32)
    )
    known = pd.Index(pairs["study_id"].astype("int64")).isin(table.index)
    extra = {"labels_file": "machine_measurements", "events_without_label_row": int((~known).sum())}
    return _record(summary, "ecg", values, _splits(pairs, cohort), extra)
