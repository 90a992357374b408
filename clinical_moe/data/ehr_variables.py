"""The EHR variable map (a user-extensible data file) and the cleaning of raw event values.

``resources/variables.csv`` maps MIMIC-IV itemids to the clinical variables (the 17 of
mimic3-benchmarks plus a few labs) with their unit conversion and valid range; users pass their own
copy to add or change variables. :func:`clean_events` turns raw chartevents / labevents rows into
numbers in the target unit: text values (GCS, capillary refill) become numbers, units are converted
(F -> C, inch -> cm, lb -> kg, FiO2 percent -> fraction), and unparseable or impossible values are
dropped and counted per variable. :func:`gcs_total` derives the GCS total.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.tables import TableError

DEFAULT_VARIABLES_FILE = Path(__file__).parent / "resources" / "variables.csv"
_VAR_COLUMNS = [
    "variable",
    "itemid",
    "source",
    "kind",
    "unit",
    "to_unit",
    "conversion",
    "valid_low",
    "valid_high",
]
SOURCES = {"chartevents": "icu/chartevents", "labevents": "hosp/labevents"}
_KINDS = {"numeric", "gcs_eye", "gcs_motor", "gcs_verbal", "gcs_total", "capillary_refill"}
_GCS_PARTS = ("gcs_eye", "gcs_motor", "gcs_verbal")

#: Text values of MIMIC-IV GCS and capillary refill items, lower-cased, mapped to numbers.
TEXT_VALUES: dict[str, dict[str, float]] = {
    "gcs_eye": {"spontaneously": 4, "to speech": 3, "to pain": 2, "none": 1},
    "gcs_motor": {
        "obeys commands": 6,
        "localizes pain": 5,
        "flex-withdraws": 4,
        "abnormal flexion": 3,
        "abnormal extension": 2,
        "no response": 1,
    },
    "gcs_verbal": {
        "oriented": 5,
        "confused": 4,
        "inappropriate words": 3,
        "incomprehensible sounds": 2,
        "no response": 1,
        "no response-ett": 1,
    },
    "capillary_refill": {
        "normal <3 seconds": 0,
        "abnormal >3 seconds": 1,
        "normal <3 secs": 0,
        "abnormal >3 secs": 1,
    },
}

_CONVERSIONS = {
    "": lambda v: v,
    "f_to_c": lambda v: (v - 32.0) * 5.0 / 9.0,
    "inch_to_cm": lambda v: v * 2.54,
    "lb_to_kg": lambda v: v * 0.45359237,
    "percent_to_fraction": lambda v: v / 100.0,
    # FiO2 is charted as a percent (21-100) but sometimes as a fraction (0.21-1): values above 1
    # are percents.
    "fio2_to_fraction": lambda v: np.where(v > 1.0, v / 100.0, v),
}


def load_variables(
    path: str | Path | None = None, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read and validate a variable map (default: the packaged ``resources/variables.csv``).

    One row per itemid with columns ``variable, itemid, source (chartevents|labevents|derived),
    kind (numeric|gcs_eye|gcs_motor|gcs_verbal|gcs_total|capillary_refill), unit, to_unit,
    conversion, valid_low, valid_high``. Valid ranges are in ``to_unit`` (after conversion). The
    order of first appearance of each variable is the column order of the output arrays.

    Args:
        path: A user file with the same columns, to add or change variables.
        names: Keep only these variables (in the file's order).

    Raises:
        TableError: Missing column, unknown source/kind/conversion, an itemid mapped twice, a
            non-derived row without itemid, or ``valid_low > valid_high`` (names file and line).
    """
    path = Path(path) if path is not None else DEFAULT_VARIABLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"variables file not found: {path}")
    try:
        df = pd.read_csv(
            path,
            dtype={
                "itemid": "Int64",
                "variable": "string",
                "source": "string",
                "kind": "string",
                "conversion": "string",
            },
        )
    except pd.errors.EmptyDataError:
        raise TableError(path, "empty", "variables file is empty") from None
    missing = [c for c in _VAR_COLUMNS if c not in df.columns]
    if missing:
        raise TableError(path, "missing_column", f"variables file lacks column(s) {missing}")
    df["conversion"] = df["conversion"].fillna("")
    checks = {
        "unknown source": ~df["source"].isin([*SOURCES, "derived"]),
        "unknown kind": ~df["kind"].isin(_KINDS),
        "unknown conversion": ~df["conversion"].isin(list(_CONVERSIONS)),
        "missing itemid": df["itemid"].isna() & (df["source"] != "derived"),
        "itemid mapped twice": df["itemid"].notna() & df["itemid"].duplicated(keep=False),
        "valid_low > valid_high": df["valid_low"] > df["valid_high"],
        "missing variable name": df["variable"].isna(),
    }
    for reason, bad in checks.items():
        if bool(bad.fillna(True).any()):
            lines = (
                np.flatnonzero(bad.fillna(True).to_numpy()) + 2
            ).tolist()  # +2: header, 1-based
            raise TableError(path, "bad_value", f"variables file: {reason} on line(s) {lines}")
    if names is not None:
        unknown = sorted(set(names) - set(df["variable"]))
        if unknown:
            raise ValueError(f"unknown variable(s) {unknown}; known: {variable_names(df)}")
        df = df[df["variable"].isin(list(names))]
    return df.reset_index(drop=True)


def variable_names(variables: pd.DataFrame) -> list[str]:
    """Variable names in output-column order (first appearance in the map)."""
    return list(dict.fromkeys(variables["variable"].tolist()))


def _to_numbers(raw: pd.DataFrame) -> np.ndarray:
    """Numeric value of each event: valuenum, else the number or known text in ``value``.

    GCS prefers valuenum when charted (MIMIC-IV charts both); capillary refill's text is
    authoritative. Text is only parsed on the rows that need it.
    """
    out = np.array(raw["valuenum"].to_numpy(dtype="float64", na_value=np.nan), copy=True)
    kind = raw["kind"].astype(str).to_numpy()
    idx = np.flatnonzero(np.isnan(out) | (kind == "capillary_refill"))
    if idx.size == 0:
        return out
    text = raw["value"].iloc[idx].astype("string").str.strip().str.lower()
    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    k, cur = kind[idx], out[idx]
    mapped = np.full(idx.size, np.nan)
    for name, mapping in TEXT_VALUES.items():
        sel = k == name
        if sel.any():
            mapped[sel] = text[sel].map(mapping).to_numpy(dtype="float64", na_value=np.nan)
    first = np.where(k == "capillary_refill", mapped, cur)  # GCS / numeric: valuenum first
    second = np.where(k == "capillary_refill", cur, mapped)
    out[idx] = np.where(~np.isnan(first), first, np.where(~np.isnan(second), second, num))
    return out


def clean_events(
    chunk: pd.DataFrame,
    var_map: pd.DataFrame,
    dropped: dict[str, dict[str, int]],
    dropped_rows: list[pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Map itemids to variables, parse, convert and range-check one chunk of raw events.

    Args:
        chunk: Raw rows with ``stay_id``, ``itemid``, ``hours``, ``value`` (text), ``valuenum``.
        var_map: Measured rows of the variable map (:func:`load_variables`).
        dropped: Updated in place: per variable, counts of ``unparseable`` / ``out_of_range``.
        dropped_rows: When given, receives ``stay_id, hours, variable, reason`` of the dropped
            rows (the EHR table store counts them again for any window).

    Returns:
        ``stay_id, hours, variable, kind, value`` for the rows kept, ``value`` in ``to_unit``.
    """
    df = chunk.merge(var_map, on="itemid", how="inner")
    value = _to_numbers(df)
    for conv, idx in df.groupby("conversion", sort=False).indices.items():
        value[idx] = _CONVERSIONS[conv](value[idx])
    unparseable = np.isnan(value)
    out_of_range = ~unparseable & (
        (value < df["valid_low"].to_numpy(dtype="float64"))
        | (value > df["valid_high"].to_numpy(dtype="float64"))
    )
    for reason, bad in (("unparseable", unparseable), ("out_of_range", out_of_range)):
        for var, n in df.loc[bad, "variable"].value_counts().items():
            counts = dropped.setdefault(str(var), {"unparseable": 0, "out_of_range": 0})
            counts[reason] += int(n)
    if dropped_rows is not None:
        for reason, bad in (("unparseable", unparseable), ("out_of_range", out_of_range)):
            if bad.any():
                dropped_rows.append(
                    pd.DataFrame(
                        {
                            "stay_id": df["stay_id"].to_numpy(dtype="int64")[bad],
                            "hours": df["hours"].to_numpy(dtype="float64")[bad],
                            "variable": df["variable"].astype(str).to_numpy()[bad],
                            "reason": reason,
                        }
                    )
                )
    keep = ~(unparseable | out_of_range)
    return pd.DataFrame(
        {
            "stay_id": df["stay_id"].to_numpy()[keep],
            "hours": df["hours"].to_numpy()[keep],
            "variable": df["variable"].astype(str).to_numpy()[keep],
            "kind": df["kind"].astype(str).to_numpy()[keep],
            "value": value[keep],
        }
    )


def gcs_total(events: pd.DataFrame, total_name: str) -> pd.DataFrame:
    """GCS total = eye + motor + verbal where all three are charted at the same time."""
    parts = events[events["kind"].isin(_GCS_PARTS)]
    wide = parts.pivot_table(
        index=["stay_id", "hours"], columns="kind", values="value", aggfunc="mean"
    )
    if wide.empty or not set(_GCS_PARTS) <= set(wide.columns):
        return events.iloc[:0]
    total = wide[list(_GCS_PARTS)].dropna().sum(axis=1)
    return total.rename("value").reset_index().assign(variable=total_name, kind="gcs_total")
