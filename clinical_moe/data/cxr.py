"""Chest X-rays: read MIMIC-CXR DICOMs (or MIMIC-CXR-JPG pictures), index them, pair them with stays.

Every image comes out the same way whatever its encoding: a float32 ``[H, W]`` array in ``[0, 1]``
where bright means dense (bone white, air black). For a DICOM that takes, in order, the modality LUT
(rescale slope/intercept), the VOI LUT or window, the inversion of MONOCHROME1 images, and a min/max
stretch; pydicom does the LUT work. JPEG 2000 decodes through pylibjpeg-openjpeg; JPEG lossless
needs the optional ``pylibjpeg-libjpeg`` (``pip install "clinical-moe[jpeg-lossless]"``).

Any file that cannot be used raises :class:`~clinical_moe.data.errors.LoaderError` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.errors import LoaderError, import_optional
from clinical_moe.data.pairing import locate_table, pair_events, read_csv_table

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png")
METADATA_STEM = "mimic-cxr-2.0.0-metadata"
METADATA_REQUIRED = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
METADATA_DTYPES = {
    "dicom_id": "string",
    "subject_id": "Int64",
    "study_id": "Int64",
    "PerformedProcedureStepDescription": "string",
    "ViewPosition": "string",
    "Rows": "Int64",
    "Columns": "Int64",
    "StudyDate": "string",
    "StudyTime": "float64",
    "ProcedureCodeSequence_CodeMeaning": "string",
    "ViewCodeSequence_CodeMeaning": "string",
    "PatientOrientationCodeSequence_CodeMeaning": "string",
}
# Transfer syntaxes decoded by pylibjpeg-libjpeg (JPEG baseline/extended/lossless, JPEG-LS).
_LIBJPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
}


def read_cxr(path: str | PathLike[str]) -> np.ndarray:
    """Read one radiograph as float32 ``[H, W]`` in ``[0, 1]``, bright = dense.

    ``.jpg`` / ``.jpeg`` / ``.png`` files (MIMIC-CXR-JPG) are read with Pillow and converted to
    grayscale; anything else is read as DICOM. Both end with the same min/max stretch, so a
    constant image becomes all zeros (never NaN).

    Raises:
        LoaderError: Naming the file, with reason ``missing_file``, ``corrupt``, ``truncated``,
            ``bad_header``, ``unsupported`` or ``decode_unavailable``.
    """
    path = Path(path)
    if not path.is_file():
        raise LoaderError(path, "missing_file", "image file does not exist")
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return _to_unit_range(_read_picture(path), path)
    return _read_dicom(path)


def _to_unit_range(image: np.ndarray, path: Path) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise LoaderError(path, "corrupt", "pixel values include NaN or infinity")
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.float32)
    image -= lo
    image *= 1.0 / (hi - lo)
    return image


def _read_picture(path: Path) -> np.ndarray:
    image_mod = import_optional("PIL.Image", "pillow", "read JPEG/PNG radiographs")
    try:
        with image_mod.open(path) as img:
            img.load()
            if img.mode not in ("L", "I;16", "I", "F"):
                img = img.convert("L")
            return np.asarray(img)
    except image_mod.UnidentifiedImageError as err:
        raise LoaderError(path, "corrupt", "not a readable image file") from err
    except OSError as err:
        reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
        raise LoaderError(path, reason, f"image could not be decoded: {err}") from err


def _read_dicom(path: Path) -> np.ndarray:
    """A DICOM's pixels through :func:`display_image`, after checks that name the file."""
    pydicom = import_optional("pydicom", purpose="read DICOM radiographs")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as err:
        raise LoaderError(path, "corrupt", "not a DICOM file (no DICM prefix)") from err
    except EOFError as err:
        raise LoaderError(path, "truncated", f"file ends inside the DICOM header: {err}") from err
    except Exception as err:  # pydicom raises many types on malformed bytes
        raise LoaderError(path, "corrupt", f"unreadable DICOM: {err}") from err

    syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if "PixelData" not in ds or syntax is None:
        if "Rows" in ds or syntax is None:
            raise LoaderError(path, "truncated", "file ends before the pixel data")
        raise LoaderError(path, "bad_header", "no Pixel Data element: not an image")
    for key in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if key not in ds:
            raise LoaderError(path, "bad_header", f"missing DICOM attribute {key}")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise LoaderError(path, "unsupported", f"not a grayscale image ({photometric})")
    if frames != 1:
        raise LoaderError(path, "unsupported", f"multi-frame image ({frames} frames)")

    if syntax.is_compressed:
        _check_decoder(syntax, path)
    else:
        expected = -(-int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8)
        if len(ds.PixelData) < expected:
            raise LoaderError(
                path, "truncated", f"pixel data has {len(ds.PixelData)} of {expected} bytes"
            )
    try:
        pixels = ds.pixel_array
    except Exception as err:
        if "missing" in str(err) and "depend" in str(err):  # pydicom < 3 has no decoder check
            raise LoaderError(path, "decode_unavailable", _decoder_hint(syntax)) from err
        raise LoaderError(
            path, "corrupt", f"pixel data could not be decoded ({syntax.name}): {err}"
        ) from err
    try:
        return display_image(pixels, ds, invert=photometric == "MONOCHROME1", path=path)
    except LoaderError:
        raise
    except Exception as err:
        raise LoaderError(path, "bad_header", f"invalid modality/VOI LUT or window: {err}") from err


def display_image(pixels: np.ndarray, ds, invert: bool = False, path=None) -> np.ndarray:
    """Stored pixels -> float32 ``[H, W]`` in ``[0, 1]``: display LUTs, inversion, stretch.

    The same numbers as :func:`apply_display_luts`, then ``-image`` for MONOCHROME1, then a
    min/max stretch, but for integer pixels all three are applied to the lookup table and the
    image is read through it once: one gather per pixel instead of four full-image passes. The
    stretch needs the min/max over the values present; where the table is monotonic between the
    smallest and largest stored value those are its two ends (exact, as both values occur),
    otherwise (a non-monotonic VOI LUT sequence, say) the image is looked up first and scanned.

    Args:
        pixels: Stored values, e.g. ``ds.pixel_array``.
        ds: The dataset holding the LUT / rescale / window attributes.
        invert: Negate after the LUTs (MONOCHROME1: stored high = dark).
        path: Named in the error raised for non-finite values.

    Raises:
        LoaderError: ``corrupt`` when a stored value present maps to NaN or infinity.
    """
    table, lo = _display_table(pixels, ds)
    if table is None:
        image = np.asarray(_pydicom_luts(pixels, ds), dtype=np.float32)
        if invert:
            np.negative(image, out=image)
        return _to_unit_range(image, path)
    if invert:
        np.negative(table, out=table)
    index = _table_index(pixels, lo)
    present = table[int(pixels.min()) - lo :]  # stored values from the smallest to the largest
    step = np.diff(present)  # NaN anywhere fails both tests below
    if not (np.isfinite(present[[0, -1]]).all() and ((step >= 0).all() or (step <= 0).all())):
        # Not monotonic (e.g. a VOI LUT sequence) or not finite: look up, then scan the image.
        return _to_unit_range(table.take(index), path)
    vlo, vhi = sorted((float(present[0]), float(present[-1])))
    if vhi <= vlo:
        return np.zeros(pixels.shape, dtype=np.float32)
    table -= vlo
    table *= 1.0 / (vhi - vlo)
    return table.take(index)


def apply_display_luts(pixels: np.ndarray, ds, as_table: bool | None = None) -> np.ndarray:
    """Apply pydicom's modality LUT then VOI LUT / window to stored pixel values, as float32.

    Both LUTs map each stored value on its own, so for integer pixels pydicom is run once over
    the range of values present and the result is looked up per pixel. That gives the same
    numbers as running it over the image (the tests check this) at a fraction of the cost:
    pydicom's windowing works in float64 with boolean masks, about 40 ms per megapixel.

    Args:
        pixels: Stored values, e.g. ``ds.pixel_array``.
        ds: The dataset holding the LUT / rescale / window attributes.
        as_table: Force (True) or forbid (False) the lookup-table route for integer pixels;
            None picks it when the value range has fewer values than the image has pixels.
    """
    table, lo = _display_table(pixels, ds, as_table)
    if table is None:
        return np.asarray(_pydicom_luts(pixels, ds), dtype=np.float32)
    return table.take(_table_index(pixels, lo))


def _table_index(pixels: np.ndarray, lo: int) -> np.ndarray:
    # Unsigned values index the table directly (numpy takes uint16 indices without a copy).
    return pixels if lo == 0 else pixels.astype(np.int64) - lo


def _pydicom_luts(values: np.ndarray, ds) -> np.ndarray:
    """pydicom's modality LUT then VOI LUT / window over ``values`` (float64)."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_voi_lut(apply_modality_lut(values, ds), ds)


def _display_table(pixels: np.ndarray, ds, as_table: bool | None = None):
    """The display LUTs over stored values ``lo..max`` as float32, and ``lo``; ``(None, 0)``
    where the per-pixel route applies (float pixels, a range over 2**20 values, or ``as_table``
    False / None with a range wider than the image)."""
    if pixels.dtype.kind not in "iu" or pixels.size == 0 or as_table is False:
        return None, 0
    lo = 0 if pixels.dtype.kind == "u" else int(pixels.min())
    hi = int(pixels.max())
    span = hi - lo + 1
    if span > 1 << 20 or not (as_table or span < pixels.size):
        return None, 0
    domain = np.arange(lo, hi + 1, dtype=pixels.dtype)
    return np.asarray(_pydicom_luts(domain, ds), dtype=np.float32), lo


def _decoder_hint(syntax) -> str:
    if str(syntax) in _LIBJPEG_SYNTAXES:
        install = 'pip install "clinical-moe[jpeg-lossless]" (pylibjpeg-libjpeg)'
    else:
        install = "pip install pylibjpeg pylibjpeg-openjpeg"
    return f"no decoder installed for transfer syntax {syntax.name} ({syntax}): {install}"


def _check_decoder(syntax, path: Path) -> None:
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom < 3: pixel_array reports it instead
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise LoaderError(path, "decode_unavailable", f"no decoder exists for {syntax}") from err
    if not decoder.is_available:
        raise LoaderError(path, "decode_unavailable", _decoder_hint(syntax))


def cxr_transform(
    size: int | tuple[int, int] = 224, keys: str | Sequence[str] | None = None
) -> Callable:
    """MONAI pipeline that turns a :func:`read_cxr` array into a network input.

    Adds a channel axis, resizes with area interpolation (an average over source pixels, so
    downsampling does not alias), re-stretches to ``[0, 1]`` and returns float32 numpy.

    Args:
        size: Output side, or ``(height, width)``.
        keys: When given, the dictionary version acting on those keys of a sample dict
            (``{"image": array, ...}``), other entries passing through.

    Returns:
        A callable mapping ``[H, W]`` to ``[1, size, size]`` float32 (or a dict holding it).
    """
    spatial = (size, size) if isinstance(size, int) else tuple(size)
    if keys is not None:
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
    return _build_transform(spatial, keys)


@functools.lru_cache(maxsize=16)
def _build_transform(spatial: tuple[int, int], keys: tuple[str, ...] | None) -> Callable:
    # The transforms are deterministic and stateless, so one instance per setting is shared.
    import_optional("monai", purpose="resize radiographs")
    from monai import transforms as mt

    if keys is None:
        return mt.Compose(
            [
                mt.EnsureChannelFirst(channel_dim="no_channel"),
                mt.Resize(spatial, mode="area"),
                mt.ScaleIntensity(minv=0.0, maxv=1.0),
                mt.EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
            ]
        )
    return mt.Compose(
        [
            mt.EnsureChannelFirstd(keys, channel_dim="no_channel"),
            mt.Resized(keys, spatial, mode="area"),
            mt.ScaleIntensityd(keys, minv=0.0, maxv=1.0),
            mt.EnsureTyped(keys, data_type="numpy", dtype=np.float32, track_meta=False),
        ]
    )


@contextlib.contextmanager
def without_meta_tracking():
    """Run :func:`cxr_transform` calls in the block on plain tensors (no MONAI metadata).

    The cache stores plain arrays, so the ``MetaTensor`` bookkeeping (affines, the transform
    stack) is wasted there: it is about 60% of a resize's time on a 0.5-megapixel radiograph.
    The outputs are the same numbers. MONAI's switch is process-wide, so use this around a
    preprocessing loop, not around code whose other threads need metadata.
    """
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


def parse_study_datetime(
    study_date: pd.Series, study_time: pd.Series, source: str = "metadata"
) -> pd.Series:
    """Combine DICOM StudyDate (``YYYYMMDD``) and MIMIC's float StudyTime into datetimes.

    StudyTime is ``HHMMSS.fff`` written as a number, so leading zeros vanish: ``80556.875`` is
    08:05:56.875 and ``556.0`` is 00:05:56. Rows missing either part get NaT.

    Raises:
        LoaderError: ``bad_value`` naming ``source`` when a date or time is out of range.
    """
    date_text = study_date.astype("string").str.strip()
    dates = pd.to_datetime(date_text, format="%Y%m%d", errors="coerce")
    bad = dates.isna() & date_text.notna()
    if bad.any():
        raise LoaderError(
            source, "bad_value", f"StudyDate not YYYYMMDD: {date_text[bad].head(3).tolist()}"
        )
    time = pd.to_numeric(study_time, errors="coerce").astype("float64")
    millis = np.round(time.to_numpy() * 1000.0)
    whole = np.floor_divide(millis, 1000.0)
    hh, mm, ss = whole // 10000, (whole // 100) % 100, whole % 100
    bad = (time < 0) | (hh > 23) | (mm > 59) | (ss > 59)
    if bad.any():
        raise LoaderError(
            source, "bad_value", f"StudyTime not HHMMSS.fff: {time[bad].head(3).tolist()}"
        )
    offset_ms = hh * 3_600_000 + mm * 60_000 + ss * 1000 + (millis - whole * 1000)
    offset = pd.to_timedelta(pd.Series(offset_ms, index=study_time.index), unit="ms")
    return dates + offset


def read_cxr_metadata(cxr_root: str | PathLike[str], image_format: str = "auto") -> pd.DataFrame:
    """Read ``mimic-cxr-2.0.0-metadata.csv(.gz)`` and add ``study_datetime`` and ``path``.

    Args:
        cxr_root: The release folder holding the CSV and ``files/`` (or the CSV path itself, in
            which case its folder is the root).
        image_format: ``"dcm"`` (MIMIC-CXR), ``"jpg"`` (MIMIC-CXR-JPG) or ``"auto"``: probe the
            first rows for existing ``.dcm`` / ``.jpg`` files and fall back to ``.dcm``.

    Returns:
        The metadata with explicit dtypes, ``study_datetime`` (NaT where date or time is blank,
        logged) and ``path`` relative to the root:
        ``files/p{first 2 digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.dcm``.

    Raises:
        LoaderError: Naming the CSV: ``missing_file``, ``empty``, ``missing_column`` or
            ``bad_value`` (ids missing, dates or times unparseable).
    """
    if image_format not in ("auto", "dcm", "jpg"):
        raise ValueError(f"image_format must be 'auto', 'dcm' or 'jpg', got {image_format!r}")
    csv = locate_table(cxr_root, METADATA_STEM)
    meta = read_csv_table(
        csv, METADATA_DTYPES, METADATA_REQUIRED, keys=("dicom_id", "subject_id", "study_id")
    )  # issue 15: a row with a blank id is dropped and counted, not fatal
    for col in ("dicom_id", "subject_id", "study_id"):
        if meta[col].isna().any():
            rows = meta.index[meta[col].isna()][:3].tolist()
            raise LoaderError(csv, "bad_value", f"column {col!r} is blank in row(s) {rows}")
    meta["study_datetime"] = parse_study_datetime(meta["StudyDate"], meta["StudyTime"], str(csv))
    if (n_nat := int(meta["study_datetime"].isna().sum())) > 0:
        log.warning(
            "%s: %d image(s) without StudyDate/StudyTime will never pair with a stay", csv, n_nat
        )
    subject = meta["subject_id"].astype("string")
    stem = (
        "files/p"
        + subject.str[:2]
        + "/p"
        + subject
        + "/s"
        + meta["study_id"].astype("string")
        + "/"
        + meta["dicom_id"]
    )
    root = csv.parent
    if image_format == "auto":
        probe = stem.head(20)
        has_jpg = any((root / f"{s}.jpg").is_file() for s in probe)
        has_dcm = any((root / f"{s}.dcm").is_file() for s in probe)
        image_format = "jpg" if has_jpg and not has_dcm else "dcm"
    meta["path"] = stem + f".{image_format}"
    return meta


def pair_cxr(
    stays: pd.DataFrame,
    metadata: pd.DataFrame,
    window_hours: float | None = 48.0,
    view_positions: Sequence[str] | None = ("AP",),
    keep: str = "latest",
    n: int = 1,
) -> pd.DataFrame:
    """Pair ICU stays with radiographs of the same subject taken in ``[intime, intime + window]``.

    Args:
        stays: ``subject_id``, ``stay_id`` and ``intime`` (datetime64), one row per stay.
        metadata: Output of :func:`read_cxr_metadata`.
        window_hours: Window length in hours (both ends included); None = no upper bound.
        view_positions: ViewPosition values to keep (case-insensitive); None keeps every view.
        keep: ``"latest"``, ``"last_n"`` (with ``n``) or ``"all"``.
        n: Images kept per stay with ``keep="last_n"``.

    Returns:
        One row per (stay, image): stay_id, subject_id, study_id, dicom_id, path, study_datetime,
        view_position and hours since intime; oldest first within a stay.
    """
    missing = [
        c
        for c in ("subject_id", "study_id", "dicom_id", "path", "study_datetime", "ViewPosition")
        if c not in metadata.columns
    ]
    if missing:
        raise ValueError(
            f"metadata lacks column(s) {missing}: pass the output of read_cxr_metadata"
        )
    events = metadata[
        ["subject_id", "study_id", "dicom_id", "path", "study_datetime", "ViewPosition"]
    ]
    events = events.rename(columns={"ViewPosition": "view_position"})
    if view_positions is not None:
        wanted = {str(v).strip().upper() for v in view_positions}
        events = events[events["view_position"].str.strip().str.upper().isin(wanted).fillna(False)]
    return pair_events(
        stays,
        events,
        time_col="study_datetime",
        window_hours=window_hours,
        keep=keep,
        n=n,
        tiebreak=("dicom_id",),
        events_name="metadata",
    )
