"""Attach time-stamped events (images, ECGs, notes) to ICU stays, MedFuse style.

Also reads the CSV indexes those events come from (:func:`read_csv_table`), with the checks every
index needs: explicit dtypes, required columns, parseable times, errors that name the file.

An event belongs to a stay when it has the stay's ``subject_id`` and its time falls inside
``[intime, intime + window]`` (both ends included). Per stay one keeps the latest event, the last
``n`` (event-token models such as FuseMoE use several, with their times), or all of them.
Everything is one merge on ``subject_id`` followed by vectorised filters: no loop over stays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import pandas as pd

from clinical_moe.data.errors import LoaderError

KEEP_MODES = ("latest", "last_n", "all")


def locate_table(root: str | PathLike[str], stem: str) -> Path:
    """Find ``stem.csv`` or ``stem.csv.gz`` in ``root``, or accept ``root`` itself when it is a file.

    Raises:
        LoaderError: ``missing_file`` naming the path looked for.
    """
    root = Path(root)
    if root.is_file():
        return root
    for suffix in (".csv", ".csv.gz"):
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    raise LoaderError(
        root / f"{stem}.csv", "missing_file", f"neither {stem}.csv nor .csv.gz exists"
    )


def read_csv_table(
    path: str | PathLike[str],
    dtypes: Mapping[str, object],
    required: Sequence[str],
    datetimes: Mapping[str, str] | None = None,
    keys: Sequence[str] = (),
) -> pd.DataFrame:
    """Read a CSV index with explicit dtypes and fail loudly on anything unexpected.

    Args:
        path: The CSV (``.csv`` or ``.csv.gz``).
        dtypes: dtype per column, applied to those columns the file has; other columns are
            read with pandas' defaults.
        required: Columns that must exist (and, among ``dtypes`` ids, be parseable).
        datetimes: ``{column: strftime format}`` to parse; a row whose non-empty value does not
            parse is dropped and counted (an error only when no row parses); empty -> NaT.
        keys: Columns a row cannot do without (blank or unparseable: dropped and counted).

    Raises:
        LoaderError: ``missing_file``, ``empty`` (no header or no rows), ``missing_column`` or
            ``bad_value``, each naming the file and, where it applies, the column.
    """
    from clinical_moe.data import damage
    from clinical_moe.data.tables import read_csv_file

    # issue 15: one table-reading path (clinical_moe.data.tables) for every CSV: damaged files
    # raise one line naming the file; damaged rows are dropped and counted, not fatal.
    path = Path(path)
    frame = read_csv_file(path, dtypes, required, keys=keys, table=path.name)
    for col, fmt in (datetimes or {}).items():
        if col not in frame.columns:
            continue
        parsed = pd.to_datetime(frame[col], format=fmt, errors="coerce")
        bad = parsed.isna() & frame[col].notna()
        if bad.all():
            raise LoaderError(
                path, "bad_value", f"column {col!r}: no value in format {fmt!r} ({int(bad.sum())})"
            )
        damage.current().rows(path.name, f"unparseable_{col}", int(bad.sum()), str(path))
        frame = frame.assign(**{col: parsed})[~bad.to_numpy()].reset_index(drop=True)
    return frame


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks required column(s) {missing}; it has {list(frame.columns)}")


def pair_events(
    stays: pd.DataFrame,
    events: pd.DataFrame,
    *,
    time_col: str,
    window_hours: float | None = 48.0,
    keep: str = "latest",
    n: int = 1,
    tiebreak: Sequence[str] = (),
    start_col: str = "intime",
    subject_col: str = "subject_id",
    stay_col: str = "stay_id",
    events_name: str = "events",
) -> pd.DataFrame:
    """Pair each stay with the events of the same subject inside its time window.

    Args:
        stays: One row per stay with ``subject_col``, ``stay_col`` and ``start_col`` (datetime64).
        events: One row per event with ``subject_col`` and ``time_col`` (datetime64); every other
            column is carried to the output. Events with no time (NaT) never pair.
        time_col: Column of ``events`` holding the event time.
        window_hours: Window length after ``start_col``; None means no upper bound.
        keep: ``"latest"`` (one event per stay), ``"last_n"`` (the ``n`` latest) or ``"all"``.
        n: How many events ``"last_n"`` keeps.
        tiebreak: Event columns that order simultaneous events (the last one wins), so that the
            choice does not depend on input row order.
        start_col: Column of ``stays`` where the window opens.
        subject_col: Patient key shared by both frames.
        stay_col: Stay key of ``stays``; must be unique.
        events_name: How error messages call ``events`` (e.g. the CSV it came from).

    Returns:
        One row per (stay, event), sorted by stay then time (oldest first), with ``stay_col``,
        ``subject_col``, the event columns and ``hours`` (event time minus window start, in hours).
        Stays without a matching event are absent.

    Raises:
        ValueError: Missing columns, non-datetime time columns, duplicated stay ids or bad options.
    """
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
    if keep == "last_n" and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer for keep='last_n', got {n!r}")
    if window_hours is not None and not window_hours >= 0:
        raise ValueError(f"window_hours must be >= 0 or None, got {window_hours!r}")
    _require_columns(stays, [subject_col, stay_col, start_col], "stays")
    _require_columns(events, [subject_col, time_col, *tiebreak], events_name)
    for frame, col, name in ((stays, start_col, "stays"), (events, time_col, events_name)):
        if not pd.api.types.is_datetime64_any_dtype(frame[col]):
            raise ValueError(
                f"{name}[{col!r}] must be datetime64 (use pd.to_datetime), got {frame[col].dtype}"
            )
    dup = stays[stay_col].duplicated()
    if dup.any():
        raise ValueError(
            f"stays[{stay_col!r}] must be unique; duplicated: {stays.loc[dup, stay_col].head().tolist()}"
        )
    if stay_col in events.columns or "hours" in events.columns or "_start" in events.columns:
        raise ValueError(f"{events_name} must not have columns {stay_col!r}, 'hours' or '_start'")

    left = stays[[subject_col, stay_col, start_col]].rename(columns={start_col: "_start"})
    merged = left.merge(events, on=subject_col, how="inner")
    delta = merged[time_col] - merged["_start"]
    inside = delta >= pd.Timedelta(0)
    if window_hours is not None:
        inside &= delta <= pd.Timedelta(hours=float(window_hours))
    merged = merged.loc[inside.fillna(False).astype(bool)].copy()
    merged["hours"] = (merged[time_col] - merged["_start"]) / pd.Timedelta(hours=1)
    merged = merged.drop(columns="_start")
    merged = merged.sort_values([stay_col, time_col, *tiebreak], kind="mergesort")
    if keep != "all":
        merged = merged.groupby(stay_col, sort=False).tail(1 if keep == "latest" else n)
    front = [stay_col, subject_col]
    merged = merged[front + [c for c in merged.columns if c not in front]]
    return merged.reset_index(drop=True)
