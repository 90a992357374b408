"""The one path every table read takes: explicit dtypes, row-level repair, one-line errors.

All loaders (MIMIC-IV tables, notes, the CXR / ECG CSV indexes) read CSV files through this module,
so they agree on:

* where a table lives: ``<root>/<module>/<table>.csv.gz`` or ``.csv`` (:func:`find_table`);
* dtypes: ids are nullable ``Int64``, codes and free text ``string`` (ICD ``"0389"`` keeps its
  zero), times are parsed to ``datetime64`` (:mod:`.table_schemas`);
* **file-level damage** (0-byte file, empty or truncated gzip, not gzip, unterminated quote, no
  header, a missing column, a header with no rows) raises :class:`TableError`: one line naming the
  file, the data row where reading stopped and the cause. A required table (patients, admissions,
  icustays) stops the run with it; callers of an optional table catch it and record the table as
  missing (:mod:`clinical_moe.data.damage`);
* **row-level damage** never costs the table: a blank or non-numeric id, a line with too many
  fields, an undecodable byte, an unparseable time. Reading is fast (C parser, strict dtypes)
  until something fails to parse; from that chunk on the file is re-read leniently (text first,
  then coerced column by column), so damaged values become missing, rows missing a
  :data:`~.table_schemas.KEY_COLUMNS` value are dropped, and each is counted by table and reason.

Big tables (chartevents, labevents, notes) are streamed by :func:`iter_table` in chunks restricted
to ``usecols``; the caller filters each chunk, so a whole table is never held in memory. Messages
name files, columns and row numbers only, never a cell value.
"""

from __future__ import annotations

import gzip
import logging
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd

from clinical_moe.data import damage
from clinical_moe.data.errors import LoaderError
from clinical_moe.data.table_io import parquet_header, read_parquet_chunks, table_progress
from clinical_moe.data.table_schemas import (
    KEY_COLUMNS,
    PANDAS_DTYPE,
    REQUIRED_TABLES,
    TABLE_SCHEMAS,
    TIME_KIND,
)

__all__ = [
    "KEY_COLUMNS",
    "REQUIRED_TABLES",
    "TABLE_SCHEMAS",
    "TableError",
    "find_table",
    "iter_table",
    "parse_times",
    "read_csv_file",
    "read_header",
    "read_optional",
    "read_table",
    "time_columns",
]

logger = logging.getLogger(__name__)

#: Errors of the byte stream itself: no lenient re-read can get past them.
_STREAM_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError)
#: Errors of content: the lenient re-read handles them row by row.
_CONTENT_ERRORS = (ValueError, TypeError, UnicodeDecodeError)
_NUMERIC = {"Int64", "int64", "Float64", "float64", "float32"}


class TableError(LoaderError):
    """A table exists but cannot be used (empty, truncated, corrupt, missing column).

    A :class:`~clinical_moe.data.errors.LoaderError` (so a ``ValueError``) whose message names the
    file; ``reason`` is one of ``"empty"``, ``"missing_column"``, ``"bad_value"``, ``"corrupt"``,
    ``"truncated"``. Messages never quote patient text.
    """


def find_table(root: str | Path, name: str, required: bool = True) -> Path | None:
    """Locate ``<root>/<name>.parquet`` (a converted copy, preferred), ``.csv.gz`` or ``.csv``.

    Raises:
        FileNotFoundError: If ``required`` and neither file exists; the message names the table,
            the root and every path tried.
    """
    root = Path(root)
    candidates = [root / f"{name}.parquet", root / f"{name}.csv.gz", root / f"{name}.csv"]
    for path in candidates:
        if path.is_file():
            return path
    if required:
        tried = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(
            f"required MIMIC table {name!r} not found under root {root}; tried: {tried}"
        )
    return None


def _stream_error(path, exc: BaseException, rows: int) -> TableError:
    """A :class:`TableError` for a failure of the byte stream after ``rows`` good data rows."""
    truncated = isinstance(exc, EOFError) or "end-of-stream" in str(exc)
    reason = "truncated" if truncated else "corrupt"
    what = "is truncated: the data stop" if truncated else "cannot be decompressed or read"
    return TableError(path, reason, f"{what} after data row {rows} ({type(exc).__name__})")


def read_header(path: str | Path) -> list[str]:
    """Column names of a CSV(.gz) file.

    Raises:
        TableError: If the file is empty (0 bytes, an empty gzip, no header line) or unreadable.
    """
    if str(path).endswith(".parquet"):
        return parquet_header(Path(path))
    try:
        return list(pd.read_csv(path, nrows=0, encoding_errors="replace").columns)
    except pd.errors.EmptyDataError:
        raise TableError(path, "empty", "file is empty: no header line") from None
    except pd.errors.ParserError as exc:
        raise TableError(
            path, "corrupt", f"header cannot be parsed ({type(exc).__name__})"
        ) from None
    except _STREAM_ERRORS as exc:
        raise _stream_error(path, exc, 0) from None


def _check_columns(path: Path, header: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise TableError(
            path,
            "missing_column",
            f"required column(s) {missing} missing; columns present: {list(header)}",
        )


def _dtypes(name: str, columns: Sequence[str]) -> dict[str, str]:
    schema = TABLE_SCHEMAS.get(name, {})
    return {c: PANDAS_DTYPE[schema.get(c, "str")] for c in columns}


def time_columns(name: str, columns: Sequence[str]) -> list[str]:
    """Which of ``columns`` hold timestamps in table ``name``."""
    schema = TABLE_SCHEMAS.get(name, {})
    return [c for c in columns if schema.get(c) == TIME_KIND]


def parse_times(df: pd.DataFrame, name: str, path: str | Path | None = None) -> pd.DataFrame:
    """Parse the time columns of ``df`` (in place), counting values that did not parse.

    Both ``YYYY-MM-DD HH:MM:SS`` and date-only ``YYYY-MM-DD`` (``dod``) are accepted. A value that
    is present but unparseable becomes NaT and is counted (``unparseable_<col>``); a blank key time
    (e.g. ``charttime``) is counted as ``blank_<col>``. Callers drop rows whose key time is NaT.

    Returns:
        ``df`` itself, for chaining.
    """
    keys = KEY_COLUMNS.get(name, ())
    log = damage.current()
    for col in time_columns(name, df.columns):
        raw = df[col]
        if pd.api.types.is_datetime64_any_dtype(raw):
            continue
        parsed = pd.to_datetime(raw, errors="coerce", format="ISO8601")
        log.rows(name, f"unparseable_{col}", int((parsed.isna() & raw.notna()).sum()), path)
        if col in keys:
            log.rows(name, f"blank_{col}", int(raw.isna().sum()), path)
        df[col] = parsed.astype("datetime64[ns]")
    return df


def _coerce(chunk: pd.DataFrame, dtypes: Mapping[str, object], table: str, keys, path, log):
    """Lenient chunk (all text) -> target dtypes; bad values become missing and are counted.

    Returns:
        The chunk and a boolean mask of rows already counted as damaged in a key column.
    """
    counted = pd.Series(False, index=chunk.index)
    for col in chunk.columns:
        raw = chunk[col]
        dtype = str(dtypes.get(col, "string"))
        if dtype in _NUMERIC:
            num = pd.to_numeric(raw, errors="coerce")
            if dtype in ("Int64", "int64"):
                num = num.where(num.isna() | (num % 1 == 0))
            bad = raw.notna() & num.isna()
            log.rows(table, f"unparseable_{col}", int(bad.sum()), path)
            chunk[col] = num.astype("Int64" if dtype == "int64" else dtype)
            if col in keys:
                counted |= bad
        else:
            text = raw.astype("string")
            log.rows(table, "undecodable_bytes", int(text.str.contains("\ufffd").sum()), path)
            chunk[col] = text
    return chunk, counted


def _drop_blank_keys(chunk, keys, counted, table, path, log) -> pd.DataFrame:
    """Drop rows missing an id/text key (time keys are counted by :func:`parse_times`)."""
    drop = pd.Series(False, index=chunk.index)
    for col in keys:
        if col not in chunk.columns or pd.api.types.is_datetime64_any_dtype(chunk[col]):
            continue
        if col in time_columns(table, [col]):
            continue
        na = chunk[col].isna()
        log.rows(table, f"blank_{col}", int((na & ~counted & ~drop).sum()), path)
        drop |= na
    return chunk[~drop] if drop.any() else chunk


def _read_chunks(path: Path, table: str, *args) -> Iterator[pd.DataFrame]:
    """:func:`_read_rows`, dropping (and counting) the last row of a plain CSV cut mid-line.

    A ``.csv`` whose last byte is not a newline was cut: its last row may hold a shortened id or
    path that would pass as valid. (A cut ``.csv.gz`` fails its stream check instead.)
    """
    if path.suffix == ".parquet":
        yield from read_parquet_chunks(path, table, *args)
        return
    cut = path.suffix == ".csv" and _last_byte(path) not in (b"\n", b"")
    held = None
    for chunk in _read_rows(path, table, *args):
        if held is not None:
            yield held
        held = chunk
    if held is not None:
        if cut and len(held):
            damage.current().rows(table, "truncated_last_line", 1, str(path))
            held = held.iloc[:-1]
        yield held


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return b""
        f.seek(-1, 2)
        return f.read(1)


def _read_rows(
    path: Path,
    table: str,
    usecols: Sequence[str] | None,
    dtypes: Mapping[str, object],
    chunksize: int,
    keys: Sequence[str],
) -> Iterator[pd.DataFrame]:
    """Stream ``path``: fast strict reading, then a lenient re-read from the first bad chunk.

    Raises:
        TableError: ``truncated`` / ``corrupt`` for a damaged byte stream or an unterminated
            quote, ``empty`` for a header with no rows; each naming the data row reached.
    """
    log = damage.current()
    rows = 0  # data rows taken from the file so far (before any row was dropped)
    cols = list(usecols) if usecols is not None else None
    try:
        with pd.read_csv(path, usecols=cols, dtype=dict(dtypes), chunksize=chunksize) as reader:
            for chunk in reader:
                rows += len(chunk)
                yield _drop_blank_keys(
                    chunk, keys, pd.Series(False, index=chunk.index), table, str(path), log
                )
        lenient = False
    except _STREAM_ERRORS as exc:
        raise _stream_error(path, exc, rows) from None
    except _CONTENT_ERRORS as exc:
        lenient = True
        logger.info(
            "%s: strict parse failed after data row %d (%s); reading leniently",
            path,
            rows,
            type(exc).__name__,
        )
    if lenient:
        yield from _read_lenient(path, table, cols, dtypes, chunksize, keys, rows, log)
    elif rows == 0:
        raise TableError(path, "empty", f"table {table!r} has a header but no rows")


def _read_lenient(path, table, cols, dtypes, chunksize, keys, skip, log):
    """The lenient re-read of :func:`_read_chunks`, from data row ``skip`` + 1 on."""
    seen = bad_lines = 0
    try:
        reader = pd.read_csv(
            path,
            usecols=cols,
            dtype=str,
            chunksize=chunksize,
            encoding_errors="replace",
            on_bad_lines="warn",
        )
        with reader:
            while True:
                # Catch the parser's per-line warnings around the read only, never around a
                # yield (the consumer's own warnings must reach the user).
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", pd.errors.ParserWarning)
                    chunk = next(reader, None)
                bad_lines += sum("Skipping line" in str(w.message) for w in caught)
                if chunk is None:
                    break
                start, seen = seen, seen + len(chunk)
                if seen <= skip:
                    continue
                chunk = chunk.iloc[max(0, skip - start) :]
                chunk, counted = _coerce(chunk, dtypes, table, keys, str(path), log)
                yield _drop_blank_keys(chunk, keys, counted, table, str(path), log)
    except _STREAM_ERRORS as exc:
        raise _stream_error(path, exc, seen) from None
    except pd.errors.ParserError as exc:
        raise TableError(
            path,
            "corrupt",
            f"cannot be parsed after data row {seen} ({type(exc).__name__}, e.g. an "
            "unterminated quote)",
        ) from None
    finally:
        log.rows(table, "malformed_line", bad_lines, str(path))
    if seen == 0:
        raise TableError(path, "empty", f"table {table!r} has a header but no rows")


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
        allow_empty: If True a header-only file gives an empty frame instead of raising.
        optional: Extra columns read only when the file has them.

    Returns:
        The table with ids as ``Int64``, text as ``string`` and times as ``datetime64[ns]``
        (rows with a blank or unparseable key dropped and counted), or None if absent.

    Raises:
        FileNotFoundError: Required table absent (names the table and the paths tried).
        TableError: Damaged file, no rows, or a required column missing (names the file).
    """
    path = find_table(root, name, required=required)
    if path is None:
        return None
    header = read_header(path)
    cols = list(header) if columns is None else list(columns)
    _check_columns(path, header, cols)
    cols += [c for c in optional if c in header and c not in cols]
    keys = [k for k in KEY_COLUMNS.get(name, ()) if k in cols]
    try:
        parts = list(_read_chunks(path, name, cols, _dtypes(name, cols), 1_000_000, keys))
    except TableError as err:
        if err.reason == "empty" and allow_empty:
            parts = []
        else:
            raise
    df = pd.concat(parts, ignore_index=True) if parts else _empty_frame(name, cols)
    df = parse_times(df[cols], name, path)
    time_keys = [k for k in keys if k in time_columns(name, cols)]
    if time_keys:
        df = df.dropna(subset=time_keys).reset_index(drop=True)
    if df.empty and not allow_empty:
        raise TableError(path, "empty", f"table {name!r} has no usable rows")
    return df


def _empty_frame(name: str, cols: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _dtypes(name, cols).items()})


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
    :func:`parse_times`. Rows with a blank or unparseable id key are dropped and counted.

    Raises:
        FileNotFoundError: A required table is absent.
        TableError: A damaged, empty or header-only file, or a missing column; raised before the
            first chunk when the header is at fault, else at the chunk where reading stopped
            (callers of an optional table discard what they read and record it as missing).
    """
    path = find_table(root, name, required=required)
    if path is None:
        return
    header = read_header(path)
    cols = list(columns)
    _check_columns(path, header, cols)
    keys = [k for k in KEY_COLUMNS.get(name, ()) if k in cols]
    with table_progress(path, name) as bar:
        for chunk in _read_chunks(path, name, cols, _dtypes(name, cols), chunksize, keys):
            chunk = chunk[cols]
            if parse_time_columns:
                parse_times(chunk, name, path)
            bar.advance(len(chunk))
            yield chunk


def read_csv_file(
    path: str | Path,
    dtypes: Mapping[str, object],
    required: Sequence[str],
    keys: Sequence[str] = (),
    table: str | None = None,
) -> pd.DataFrame:
    """Read a whole CSV index (CXR metadata, ECG record list, ...) through the same path.

    Args:
        path: The CSV (``.csv`` or ``.csv.gz``).
        dtypes: Pandas dtype per column, applied to the columns the file has.
        required: Columns that must exist.
        keys: Columns a row cannot do without: blank or unparseable -> row dropped and counted.
        table: Name used in the counts (default the file name).

    Raises:
        TableError: ``missing_file``, ``empty``, ``missing_column``, ``truncated``, ``corrupt``,
            or ``bad_value`` when no row survives; each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(path, "missing_file", "file does not exist")
    header = read_header(path)
    _check_columns(path, header, required)
    dtype = {c: t for c, t in dtypes.items() if c in header}
    name = table or path.name
    before = sum(damage.current().row_counts.get(name, {}).values())
    parts = list(_read_chunks(path, name, None, dtype, 1_000_000, list(keys)))
    frame = pd.concat(parts, ignore_index=True)
    if frame.empty:
        dropped = sum(damage.current().row_counts.get(name, {}).values()) - before
        raise TableError(path, "bad_value", f"no usable row: {dropped} damaged row(s) dropped")
    return frame


def read_optional(
    table: str,
    reader: Callable[..., pd.DataFrame],
    *args,
    empty: Mapping[str, object],
    consequence: str = "",
) -> pd.DataFrame:
    """Run ``reader(*args)`` for an optional table; if it is absent or unusable, warn and go on.

    Args:
        table: Name for the warning and ``missing_sources``, e.g. ``"mimic-cxr/metadata"``.
        reader: A loader raising :class:`~clinical_moe.data.errors.LoaderError` naming the file.
        *args: Its arguments.
        empty: Column -> dtype of the empty frame returned instead.
        consequence: What the run loses, for the warning.

    Returns:
        The reader's frame, or an empty frame with the ``empty`` columns.
    """
    try:
        return reader(*args)
    except (LoaderError, FileNotFoundError) as err:
        reason = getattr(err, "reason", "absent")
        reason = "absent" if reason == "missing_file" else reason
        detail = getattr(err, "detail", None) or str(err)
        damage.current().missing_source(
            table, getattr(err, "path", None), reason, detail, consequence
        )
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in empty.items()})
