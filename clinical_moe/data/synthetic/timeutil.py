"""Formatting helpers: int64 epoch seconds -> MIMIC timestamp / date strings."""

from __future__ import annotations

import numpy as np


def fmt_datetime(seconds) -> np.ndarray:
    """Format epoch seconds as ``YYYY-MM-DD HH:MM:SS``; ``None`` / NaN become empty (missing).

    Args:
        seconds: scalar or sequence of epoch seconds (ints, floats or ``None``).

    Returns:
        Object array of strings, ``None`` where the input was missing.
    """
    arr = np.atleast_1d(np.asarray(seconds, dtype=object))
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in arr])
    vals = np.where(missing, 0, arr).astype(np.int64).astype("datetime64[s]")
    text = np.char.replace(np.datetime_as_string(vals, unit="s"), "T", " ").astype(object)
    text[missing] = None
    return text


def fmt_date(seconds) -> np.ndarray:
    """Format epoch seconds as ``YYYY-MM-DD`` (missing -> ``None``)."""
    full = fmt_datetime(seconds)
    return np.array([None if v is None else v[:10] for v in full], dtype=object)


def split_date_time(seconds: int) -> tuple[str, str, float]:
    """``(YYYYMMDD, HHMMSS.fff string, HHMMSS.fff float)`` of one instant, for DICOM / CXR metadata.

    The fractional seconds are derived from the instant itself (deterministic).
    """
    dt = fmt_datetime([int(seconds)])[0]
    frac = (int(seconds) * 7919) % 1000  # deterministic pseudo milliseconds
    hhmmss = dt[11:13] + dt[14:16] + dt[17:19]
    tm = f"{hhmmss}.{frac:03d}"
    return dt[:10].replace("-", ""), tm, float(tm)
