"""12-lead ECGs: read WFDB records (MIMIC-IV-ECG, PTB-XL, ``.mat`` containers), index, pair.

:func:`read_ecg` turns any 12-lead WFDB record into the same thing: float32 ``[12, 5000]`` in mV,
500 Hz, 10 s, leads in the order I, II, III, aVR, aVL, aVF, V1-V6. Leads are matched by name,
case-insensitively (MIMIC-IV-ECG stores aVF before aVL; PTB-XL writes ``AVR``). wfdb reads the
samples and applies gain and baseline; we convert units, resample, pad or crop.

Missing samples (NaN in wfdb's physical signal) follow one rule: a record is rejected when any lead
is entirely NaN or when more than ``max_nan_fraction`` (default 5 %) of all samples are NaN;
otherwise each gap is filled by linear interpolation along its lead (edge gaps take the nearest
valid value) and :attr:`EcgRecord.nan_filled` counts the filled samples.

Any record that cannot be used raises :class:`~clinical_moe.data.errors.LoaderError` naming the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.errors import LoaderError, import_optional
from clinical_moe.data.pairing import locate_table, pair_events, read_csv_table

CANONICAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_LEAD_BY_KEY = {lead.lower(): lead for lead in CANONICAL_LEADS}
_MV_PER_UNIT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "": 1.0}
# fmt: off
# Bytes per sample of WFDB signal formats, to tell a truncated signal file when wfdb fails on it.
_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5,
                     "310": 4 / 3, "311": 4 / 3}
_FS_FIELD = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?(?:/.*)?$")

RECORD_LIST_DTYPES = {"subject_id": "Int64", "study_id": "Int64", "file_name": "string",
                      "ecg_time": "string", "path": "string"}
_MM_TEXT = dict.fromkeys([f"report_{i}" for i in range(18)] + ["bandwidth", "filtering"], "string")
MEASUREMENT_COLUMNS = ("rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end",
                       "p_axis", "qrs_axis", "t_axis")
# fmt: on
MISSING_MEASUREMENT = 29999


@dataclass(eq=False)
class EcgRecord:
    """One ECG, canonicalised.

    Attributes:
        signal: float32 ``[12, fs * seconds]`` in mV, rows in :attr:`leads` order.
        fs: Sampling rate of ``signal`` in Hz.
        leads: Lead names, :data:`CANONICAL_LEADS`.
        source_fs: Sampling rate of the file.
        record_name: The record path without extension.
        nan_filled: Samples (at the source rate) filled by interpolation.
    """

    signal: np.ndarray
    fs: float
    leads: tuple[str, ...]
    source_fs: float
    record_name: str
    nan_filled: int = 0


def canonical_lead_order(
    names, path: str | PathLike[str] = "record", extra_leads: str = "error"
) -> list[int]:
    """Indices that pick the 12 standard leads out of ``names``, in canonical order.

    Args:
        names: Lead names as stored (any case, surrounding spaces ignored).
        path: File named in errors.
        extra_leads: ``"error"`` rejects names that are not one of the 12 leads (e.g. the Frank
            leads vx, vy, vz of the PTB database); ``"ignore"`` skips them.

    Raises:
        LoaderError: ``unknown_leads`` when a lead is missing, repeated, or unknown.
    """
    if extra_leads not in ("error", "ignore"):
        raise ValueError(f"extra_leads must be 'error' or 'ignore', got {extra_leads!r}")
    found: dict[str, int] = {}
    unknown, repeated = [], []
    for index, name in enumerate(names):
        lead = _LEAD_BY_KEY.get(str(name).strip().lower())
        if lead is None:
            unknown.append(name)
        elif lead in found:
            repeated.append(name)
        else:
            found[lead] = index
    missing = [lead for lead in CANONICAL_LEADS if lead not in found]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if repeated:
        problems.append(f"repeated {repeated}")
    if unknown and extra_leads != "ignore":
        problems.append(f"unknown {unknown} (pass extra_leads='ignore' to skip them)")
    if problems:
        raise LoaderError(path, "unknown_leads", f"leads {list(names)}: " + "; ".join(problems))
    return [found[lead] for lead in CANONICAL_LEADS]


def _record_base(record_path: str | PathLike[str]) -> Path:
    path = Path(record_path)
    return path.with_suffix("") if path.suffix.lower() in (".hea", ".dat", ".mat") else path


def _check_record_line(header: Path) -> tuple[float, int | None]:
    """Validate the record line, which wfdb parses leniently (``rec 12 abc 2500`` gives fs=250).

    Returns:
        The sampling frequency and the signal length (None when the header omits it).
    """
    try:
        lines = header.read_text(encoding="latin-1").splitlines()
    except OSError as err:
        raise LoaderError(header, "missing_file", f"header unreadable: {err}") from err
    fields = next(
        (ln.split() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), []
    )
    if len(fields) < 2 or not fields[1].isdigit():
        raise LoaderError(
            header, "bad_header", f"record line {' '.join(fields)!r} lacks a signal count"
        )
    if len(fields) > 2 and not _FS_FIELD.match(fields[2]):
        raise LoaderError(
            header, "bad_header", f"sampling frequency field {fields[2]!r} is not a number"
        )
    if len(fields) > 3 and not fields[3].isdigit():
        raise LoaderError(
            header, "bad_header", f"signal length field {fields[3]!r} is not an integer"
        )
    if len(fields) < 3:  # WFDB would silently assume 250 Hz
        raise LoaderError(header, "wrong_rate", "the record line gives no sampling frequency")
    fs = float(fields[2].split("/")[0])
    if not fs > 0:
        raise LoaderError(header, "wrong_rate", f"sampling frequency {fields[2]!r} is not positive")
    return fs, int(fields[3]) if len(fields) > 3 else None


def _check_layout(header, header_path: Path) -> None:
    """Checks that hold for a wfdb header or record object alike."""
    names, files = header.sig_name or [], header.file_name or []
    if not header.n_sig or len(names) != header.n_sig or len(files) != header.n_sig:
        raise LoaderError(
            header_path,
            "bad_header",
            f"announces {header.n_sig} signals but describes {len(names)}",
        )
    if header.fs is None or not header.fs > 0:
        raise LoaderError(
            header_path, "wrong_rate", f"sampling frequency {header.fs!r} is not positive"
        )


def _diagnose(wfdb, base: Path, header_path: Path, err: Exception) -> LoaderError:
    """Find out why wfdb failed on a record, for an error that names the right file and reason.

    Only run after a failure: parsing a header costs as much as reading the samples.
    """
    try:
        header = wfdb.rdheader(str(base))
    except Exception as parse_err:  # wfdb raises several types on malformed headers
        return LoaderError(header_path, "bad_header", f"unparseable WFDB header: {parse_err}")
    try:
        _check_layout(header, header_path)
        _check_signal_files(header, base)
    except LoaderError as found:
        return found
    reason = "truncated" if "not loaded correctly" in str(err) else "corrupt"
    return LoaderError(header_path, reason, f"wfdb could not read the samples: {err}")


def _check_signal_files(header, base: Path) -> None:
    sizes: dict[str, list] = {}
    for i, name in enumerate(header.file_name):
        spf = (header.samps_per_frame or [1] * header.n_sig)[i] or 1
        offset = (header.byte_offset or [None] * header.n_sig)[i] or 0
        entry = sizes.setdefault(name, [offset, 0.0, True])
        bps = _BYTES_PER_SAMPLE.get(str(header.fmt[i]))
        entry[1] += spf * (bps or 0)
        entry[2] &= bps is not None
    for name, (offset, bytes_per_frame, known) in sizes.items():
        data = base.parent / name
        if not data.is_file():
            raise LoaderError(
                data, "missing_file", f"signal file named by {base.name}.hea does not exist"
            )
        if known and header.sig_len is not None:
            expected = offset + math.floor(bytes_per_frame * header.sig_len)
            actual = data.stat().st_size
            if actual < expected:
                raise LoaderError(data, "truncated", f"{actual} bytes, header implies {expected}")


def _fill_nans(signal: np.ndarray, path: Path, max_nan_fraction: float) -> int:
    nan = np.isnan(signal)
    if not nan.any():
        return 0
    dead = [CANONICAL_LEADS[i] for i in np.flatnonzero(nan.all(axis=1))]
    if dead:
        raise LoaderError(path, "nan_signal", f"lead(s) {dead} contain no valid sample")
    fraction = float(nan.mean())
    if fraction > max_nan_fraction:
        raise LoaderError(
            path, "nan_signal", f"{fraction:.1%} of samples are NaN (limit {max_nan_fraction:.1%})"
        )
    positions = np.arange(signal.shape[1])
    for row in np.flatnonzero(nan.any(axis=1)):
        gaps = nan[row]
        signal[row, gaps] = np.interp(positions[gaps], positions[~gaps], signal[row, ~gaps])
    return int(nan.sum())


def read_ecg(
    record_path: str | PathLike[str],
    fs: float = 500,
    seconds: float = 10.0,
    max_nan_fraction: float = 0.05,
    extra_leads: str = "error",
    pad_short: bool = False,
) -> EcgRecord:
    """Read a 12-lead WFDB record as float32 ``[12, fs * seconds]`` mV in canonical lead order.

    Args:
        record_path: Record path without extension (as wfdb takes it) or with ``.hea``, ``.dat``
            or ``.mat``. The header may point at ``.dat`` or ``.mat`` signal files.
        fs: Output sampling rate; other rates are resampled with a polyphase filter.
        seconds: Output duration: longer records keep their first ``seconds``, shorter ones are
            zero-padded at the end.
        max_nan_fraction: Largest share of NaN samples that is interpolated rather than rejected.
        extra_leads: What to do with channels beyond the 12 leads: ``"error"`` or ``"ignore"``.
        pad_short: A record whose header gives fewer than ``seconds`` of signal (rate x length,
            e.g. 1000 Hz x 5000 samples = 5 s) is refused (``wrong_duration``, a counted skip in
            preprocessing) unless True, when it is zero-padded.

    Raises:
        LoaderError: Naming the file: ``missing_file`` (header or signal file), ``bad_header``
            (malformed fields, unknown units), ``wrong_rate``, ``unknown_leads``, ``truncated``,
            ``corrupt`` or ``nan_signal``.
    """
    wfdb = import_optional("wfdb", purpose="read ECG records")
    from scipy.signal import resample_poly

    base = _record_base(record_path)
    header_path = Path(f"{base}.hea")
    if not header_path.is_file():
        raise LoaderError(header_path, "missing_file", "WFDB header does not exist")
    source_fs, sig_len = _check_record_line(header_path)
    if sig_len == 0:
        raise LoaderError(header_path, "truncated", "header announces zero samples")
    if sig_len and not pad_short and sig_len / source_fs < seconds * 0.98:  # issue 15
        raise LoaderError(
            header_path,
            "wrong_duration",
            f"header gives {source_fs:g} Hz x {sig_len} samples = {sig_len / source_fs:g} s, "
            f"a study is {seconds:g} s",
        )
    # Read only what the output needs, plus a margin for the resampling filter.
    needed = math.ceil(seconds * source_fs) + 64
    try:
        record = wfdb.rdrecord(
            str(base), sampto=min(needed, sig_len) if sig_len else "end", return_res=32
        )
    except Exception as err:  # wfdb raises many types; find the precise cause
        raise _diagnose(wfdb, base, header_path, err) from err
    _check_layout(record, header_path)
    order = canonical_lead_order(record.sig_name, header_path, extra_leads)
    scale = []
    for i in order:
        unit = str((record.units[i] if record.units else None) or "mV").strip().lower()
        if unit not in _MV_PER_UNIT:
            raise LoaderError(
                header_path, "bad_header", f"lead {record.sig_name[i]}: unknown unit {unit!r}"
            )
        scale.append(_MV_PER_UNIT[unit])
    signal = np.ascontiguousarray(record.p_signal[:, order].T, dtype=np.float32)  # (12, T)
    signal *= np.asarray(scale, dtype=np.float32)[:, None]
    if signal.shape[1] == 0:
        raise LoaderError(header_path, "truncated", "record has no samples")
    filled = _fill_nans(signal, header_path, max_nan_fraction)
    n_out = int(round(fs * seconds))
    if abs(source_fs - fs) > 1e-9:
        ratio = (Fraction(str(fs)) / Fraction(str(source_fs))).limit_denominator(1000)
        signal = resample_poly(signal, ratio.numerator, ratio.denominator, axis=1).astype(
            np.float32
        )
    if signal.shape[1] >= n_out:
        signal = np.ascontiguousarray(signal[:, :n_out])
    else:
        signal = np.pad(signal, ((0, 0), (0, n_out - signal.shape[1])))
    return EcgRecord(signal, fs, CANONICAL_LEADS, source_fs, str(base), filled)


def read_record_list(ecg_root: str | PathLike[str]) -> pd.DataFrame:
    """Read MIMIC-IV-ECG ``record_list.csv(.gz)``: subject_id, study_id, file_name, ecg_time, path.

    Args:
        ecg_root: The release folder (or the CSV itself). ``path`` stays relative to it.

    Raises:
        LoaderError: Naming the CSV: ``missing_file``, ``empty``, ``missing_column``, ``bad_value``.
    """
    csv = locate_table(ecg_root, "record_list")
    frame = read_csv_table(
        csv,
        RECORD_LIST_DTYPES,
        tuple(RECORD_LIST_DTYPES),
        datetimes={"ecg_time": "%Y-%m-%d %H:%M:%S"},
        keys=("subject_id", "study_id", "path"),  # issue 15: blank id -> row dropped, counted
    )
    for col in ("subject_id", "study_id", "path"):
        if frame[col].isna().any():
            raise LoaderError(csv, "bad_value", f"column {col!r} has blank values")
    return frame


def read_machine_measurements(ecg_root: str | PathLike[str]) -> pd.DataFrame | None:
    """Read ``machine_measurements.csv(.gz)``, or return None when the release lacks it.

    The cart writes 29999 for "not measured"; it becomes NaN in every numeric column.

    Raises:
        LoaderError: When the file exists but is empty, lacks ids, or has unparseable values.
    """
    root = Path(ecg_root)
    if root.is_dir() and not any(
        (root / f"machine_measurements{s}").is_file() for s in (".csv", ".csv.gz")
    ):
        return None
    csv = locate_table(root, "machine_measurements")
    dtypes = {"subject_id": "Int64", "study_id": "Int64", "cart_id": "Int64", "ecg_time": "string"}
    dtypes |= _MM_TEXT | {c: "float64" for c in MEASUREMENT_COLUMNS}
    frame = read_csv_table(
        csv,
        dtypes,
        ("subject_id", "study_id", "ecg_time"),
        datetimes={"ecg_time": "%Y-%m-%d %H:%M:%S"},
        keys=("subject_id", "study_id"),  # issue 15: blank id -> row dropped, counted
    )
    ids = {"subject_id", "study_id", "cart_id"}
    for col in frame.columns:
        if col not in ids and pd.api.types.is_numeric_dtype(frame[col]):
            frame[col] = frame[col].astype("float64").mask(frame[col] == MISSING_MEASUREMENT)
    return frame


def pair_ecg(
    stays: pd.DataFrame,
    record_list: pd.DataFrame,
    window_hours: float | None = 48.0,
    keep: str = "latest",
    n: int = 1,
) -> pd.DataFrame:
    """Pair ICU stays with ECGs of the same subject recorded in ``[intime, intime + window]``.

    Args:
        stays: ``subject_id``, ``stay_id`` and ``intime`` (datetime64), one row per stay.
        record_list: Output of :func:`read_record_list`.
        window_hours: Window length in hours (both ends included); None = no upper bound.
        keep: ``"latest"``, ``"last_n"`` (with ``n``) or ``"all"``.
        n: ECGs kept per stay with ``keep="last_n"``.

    Returns:
        One row per (stay, ECG): stay_id, subject_id, study_id, file_name, path, ecg_time and hours
        since intime; oldest first within a stay.
    """
    cols = ["subject_id", "study_id", "file_name", "path", "ecg_time"]
    missing = [c for c in cols if c not in record_list.columns]
    if missing:
        raise ValueError(
            f"record_list lacks column(s) {missing}: pass the output of read_record_list"
        )
    return pair_events(
        stays,
        record_list[cols],
        time_col="ecg_time",
        window_hours=window_hours,
        keep=keep,
        n=n,
        tiebreak=("study_id",),
        events_name="record_list",
    )
