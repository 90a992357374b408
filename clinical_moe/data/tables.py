"""Generic reading of MIMIC-style CSV tables with explicit dtypes and clear errors.

Every MIMIC table is read through this module so that all loaders agree on three things:

* where a table lives: ``<root>/<module>/<table>.csv.gz`` or ``.csv`` (either is accepted, see
  :func:`find_table`);
* which dtype each column has: ids are nullable ``Int64``, codes and free text are ``string`` (so
  ICD codes such as ``"0389"`` keep their leading zeros), times are parsed to ``datetime64``;
* what happens on bad input: a missing required table raises :class:`FileNotFoundError` naming the
  table and the paths tried, a missing column or an empty file raises :class:`TableError` naming the
  column and the file, and unparseable timestamps are counted and logged instead of being dropped
  silently.

Big tables (chartevents, labevents, notes) are read with :func:`iter_table`, which yields chunks of
``chunksize`` rows restricted to ``usecols``; the caller filters each chunk before keeping it, so
the whole table is never held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from clinical_moe.data.errors import LoaderError

logger = logging.getLogger(__name__)

# Column kinds: "id" -> Int64, "float" -> float64, "str" -> string, "time" -> datetime64.
_ID, _FLOAT, _STR, _TIME = "id", "float", "str", "time"

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

_PANDAS_DTYPE = {_ID: "Int64", _FLOAT: "float64", _STR: "string", _TIME: "string"}


class TableError(LoaderError):
    """A table exists but cannot be used (empty file, missing column, unparseable content).

    A :class:`~clinical_moe.data.errors.LoaderError` (so a ``ValueError``) whose message names the
    file; ``reason`` is one of ``"empty"``, ``"missing_column"``, ``"bad_value"``, ``"corrupt"``.
    Messages never quote patient text.
    """


def find_table(root: str | Path, name: str, required: bool = True) -> Path | None:
    """Locate ``<root>/<name>.csv.gz`` or ``<root>/<name>.csv``.

    Args:
        root: The dataset root, e.g. the MIMIC-IV directory holding ``hosp/`` and ``icu/``.
        name: Table path relative to the root without extension, e.g. ``"hosp/labevents"``.
        required: If True a missing table raises; otherwise None is returned.

    Returns:
        The path of the first candidate that exists (``.csv.gz`` is preferred), or None.

    Raises:
        FileNotFoundError: If ``required`` and neither file exists; the message names the table,
            the root and every path tried.
    """
    root = Path(root)
    candidates = [root / f"{name}.csv.gz", root / f"{name}.csv"]
    for path in candidates:
        if path.is_file():
            return path
    if required:
        tried = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(
            f"required MIMIC table {name!r} not found under root {root}; tried: {tried}"
        )
    return None


def read_header(path: str | Path) -> list[str]:
    """Column names of a CSV(.gz) file.

    Raises:
        TableError: If the file is empty (no header line) or cannot be parsed as CSV.
    """
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise TableError(path, "empty", "file is empty: no header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise TableError(path, "corrupt", f"cannot be read as CSV ({type(exc).__name__})") from None


def _schema(name: str) -> dict[str, str]:
    return TABLE_SCHEMAS.get(name, {})


def _check_columns(path: Path, header: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise TableError(
            path,
            "missing_column",
            f"required column(s) {missing} missing; columns present: {list(header)}",
        )


def _dtypes(name: str, columns: Sequence[str]) -> dict[str, str]:
    schema = _schema(name)
    return {c: _PANDAS_DTYPE[schema.get(c, _STR)] for c in columns}


def time_columns(name: str, columns: Sequence[str]) -> list[str]:
    """Which of ``columns`` hold timestamps in table ``name``."""
    schema = _schema(name)
    return [c for c in columns if schema.get(c) == _TIME]


def parse_times(df: pd.DataFrame, name: str, path: str | Path | None = None) -> pd.DataFrame:
    """Parse the time columns of ``df`` (in place) and log how many values did not parse.

    Both ``YYYY-MM-DD HH:MM:SS`` and date-only ``YYYY-MM-DD`` (``dod``) are accepted. A value that
    is present but unparseable becomes NaT and is counted in a warning naming table and column.

    Returns:
        ``df`` itself, for chaining.
    """
    for col in time_columns(name, df.columns):
        raw = df[col]
        if pd.api.types.is_datetime64_any_dtype(raw):
            continue
        parsed = pd.to_datetime(raw, errors="coerce", format="ISO8601")
        bad = int((parsed.isna() & raw.notna()).sum())
        if bad:
            logger.warning(
                "%s: %d value(s) of column %r could not be parsed as timestamps and were set "
                "to missing (file: %s)",
                name,
                bad,
                col,
                path,
            )
        df[col] = parsed.astype("datetime64[ns]")
    return df


def read_table(
    root: str | Path,
    name: str,
    columns: Sequence[str] | None = None,
    required: bool = True,
    allow_empty: bool = False,
    optional: Sequence[str] = (),
) -> pd.DataFrame | None:
    """Read a whole (small) table with explicit dtypes.

    Use this for patients, admissions, icustays, dictionaries and diagnoses; use
    :func:`iter_table` for chartevents, labevents and notes.

    Args:
        root: Dataset root.
        name: Table name such as ``"hosp/admissions"``.
        columns: Columns to read; every one must exist in the file. None reads all columns.
        required: If False and the table is absent, return None instead of raising.
        allow_empty: If False a file with a header but no rows raises :class:`TableError`.
        optional: Extra columns read only when the file has them.

    Returns:
        The table with ids as ``Int64``, text as ``string`` and times as ``datetime64[ns]``, or
        None if an optional table is absent.

    Raises:
        FileNotFoundError: Required table absent (names the table and the paths tried).
        TableError: Empty file or a required column missing (names the column and the file).
    """
    path = find_table(root, name, required=required)
    if path is None:
        return None
    header = read_header(path)
    cols = list(header) if columns is None else list(columns)
    _check_columns(path, header, cols)
    cols += [c for c in optional if c in header and c not in cols]
    try:
        df = pd.read_csv(path, usecols=cols, dtype=_dtypes(name, cols))
    except (ValueError, TypeError, pd.errors.ParserError) as exc:
        # The exception text may quote a cell value (patient data): name its type only.
        raise TableError(
            path, "bad_value", f"cannot be parsed with the expected dtypes ({type(exc).__name__})"
        ) from None
    if df.empty and not allow_empty:
        raise TableError(path, "empty", f"table {name!r} has a header but no rows")
    return parse_times(df[cols], name, path)


def iter_table(
    root: str | Path,
    name: str,
    columns: Sequence[str],
    chunksize: int = 1_000_000,
    required: bool = True,
    parse_time_columns: bool = False,
) -> Iterator[pd.DataFrame]:
    """Stream a big table in chunks of ``chunksize`` rows, reading only ``columns``.

    Time columns are left as text unless ``parse_time_columns`` is True, so that callers can
    filter each chunk first (by id / itemid) and parse times only on the few rows they keep, via
    :func:`parse_times`.

    Args:
        root: Dataset root.
        name: Table name such as ``"icu/chartevents"``.
        columns: Columns to read; all must exist in the file.
        chunksize: Rows per chunk.
        required: If False and the table is absent, yield nothing.
        parse_time_columns: Parse time columns of every chunk.

    Yields:
        DataFrames with the explicit dtypes of :data:`TABLE_SCHEMAS`.

    Raises:
        FileNotFoundError, TableError: As for :func:`read_table` (checked before the first chunk).
    """
    path = find_table(root, name, required=required)
    if path is None:
        return
    header = read_header(path)
    cols = list(columns)
    _check_columns(path, header, cols)
    reader = pd.read_csv(path, usecols=cols, dtype=_dtypes(name, cols), chunksize=chunksize)
    with reader:
        rows = 0
        try:
            for chunk in reader:
                chunk = chunk[cols]
                if parse_time_columns:
                    parse_times(chunk, name, path)
                yield chunk
                rows += len(chunk)
        except (ValueError, TypeError, pd.errors.ParserError) as exc:
            raise TableError(
                path,
                "bad_value",
                f"cannot be parsed with the expected dtypes in the chunk starting at data row "
                f"{rows + 1} ({type(exc).__name__})",
            ) from None
