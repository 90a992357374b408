"""Per-file decode throughput: our readers against the bare libraries, on the same files.

DICOM: ``pydicom.dcmread(f).pixel_array`` (bare) vs :func:`clinical_moe.data.cxr.read_cxr` (checks,
display LUTs, MONOCHROME1 inversion, [0, 1] stretch) and ``read_cxr`` + the cache's resize
transform (what preprocessing does per image, MONAI metadata tracking off as there). The same
three on MIMIC-CXR-sized JPEG 2000 files (the real release's encoding; ours are uncompressed),
rendered and compressed here so nothing is downloaded. WFDB: ``wfdb.rdrecord(base)`` (bare) vs
:func:`clinical_moe.data.ecg.read_ecg` at the cache's rate (what preprocessing does per record)
and at the file's own rate (no resampling). Methods run interleaved round by round.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import median, ratio, time_interleaved


def _files(root: Path, pattern: str, n: int) -> list[Path]:
    return sorted(root.glob(pattern))[:n]


def _compare(methods: dict[str, Callable[[Path], object]], files: list[Path], reps: int) -> dict:
    """Files/s of each method over ``files`` (median of ``reps`` interleaved rounds)."""

    def over_all(fn):
        return lambda: [fn(f) for f in files]

    times = time_interleaved([over_all(fn) for fn in methods.values()], warmup=1, reps=reps)
    rates = {name: len(files) / median(ts) for name, ts in zip(methods, times)}
    out = {"files": len(files), "reps": reps}
    out.update({f"{name}_files_per_s": float(f"{r:.4g}") for name, r in rates.items()})
    return out, rates


def bench_cxr(root: Path, image_size: int, n: int, reps: int) -> dict | None:
    """DICOM decode: bare pydicom vs ``read_cxr`` vs ``read_cxr`` + resize transform."""
    import pydicom

    files = _files(root, "mimic-cxr/files/p*/p*/s*/*.dcm", n)
    if not files:
        return None
    out, rates = _compare(_cxr_methods(image_size), files, reps)
    px = [pydicom.dcmread(f).pixel_array.size for f in files]
    out["mean_megapixels"] = round(sum(px) / len(px) / 1e6, 4)
    out["cache_image_size"] = image_size
    out["ratio_read_cxr"] = ratio(rates["read_cxr"], rates["bare_pydicom"])
    out["ratio_read_cxr_transform"] = ratio(rates["read_cxr_transform"], rates["bare_pydicom"])
    return out


def _cxr_methods(image_size: int) -> dict[str, Callable[[Path], object]]:
    import pydicom

    from clinical_moe.data.cxr import cxr_transform, read_cxr, without_meta_tracking

    tf = cxr_transform(image_size)

    def as_cached(f):
        with without_meta_tracking():
            return tf(read_cxr(f))

    return {
        "bare_pydicom": lambda f: pydicom.dcmread(f).pixel_array,
        "read_cxr": read_cxr,
        "read_cxr_transform": as_cached,
    }


def write_j2k_radiographs(out: Path, n: int, shape: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` synthetic radiographs of ``shape`` as JPEG 2000 lossless DX files (the MIMIC-CXR
    encoding), through the corpus's own renderer and writer; encoding needs pylibjpeg-openjpeg."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from clinical_moe.data.synthetic.cxr_dicom import plan_findings, render_chest, write_dx

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        density = render_chest(rng, *shape, "PA", plan_findings(rng, k % 2, 0.5))
        meta = {
            "subject_id": 1,
            "study_id": k,
            "dicom_id": f"j2k{k}",
            "seed": seed,
            "view": "PA",
            "date": "21800101",
            "time": "120000",
            "procedure": "CHEST (PA AND LAT)",
            "orientation": "Erect",
        }
        path = out / f"j2k{k}.dcm"
        write_dx(path, density, rng, meta)
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path)
        paths.append(path)
    return paths


def bench_cxr_j2k(image_size: int, n: int, reps: int, shape=(3056, 2544)) -> dict:
    """DICOM decode at the real release's size and encoding: JPEG 2000 lossless, 3056 x 2544."""
    with tempfile.TemporaryDirectory(prefix="bench_j2k_") as tmp:
        try:
            files = write_j2k_radiographs(Path(tmp), n, shape)
        except Exception as err:  # no JPEG 2000 encoder installed
            return {"error": f"could not write JPEG 2000 files: {err}"}
        out, rates = _compare(_cxr_methods(image_size), files, reps)
    out["shape"] = list(shape)
    out["transfer_syntax"] = "JPEG 2000 lossless (1.2.840.10008.1.2.4.90)"
    out["cache_image_size"] = image_size
    out["ratio_read_cxr"] = ratio(rates["read_cxr"], rates["bare_pydicom"])
    out["ratio_read_cxr_transform"] = ratio(rates["read_cxr_transform"], rates["bare_pydicom"])
    return out


def bench_ecg(root: Path, ecg_samples: int, n: int, reps: int) -> dict | None:
    """WFDB decode: bare ``wfdb.rdrecord`` vs ``read_ecg`` (cache rate and native rate)."""
    import wfdb

    from clinical_moe.data.ecg import read_ecg

    bases = [p.with_suffix("") for p in _files(root, "mimic-iv-ecg/files/p*/p*/s*/*.hea", n)]
    if not bases:
        return None
    fs_cache = ecg_samples / 10.0
    native = wfdb.rdheader(str(bases[0])).fs
    methods = {
        "bare_wfdb": lambda b: wfdb.rdrecord(str(b)).p_signal,
        "read_ecg": lambda b: read_ecg(b, fs=fs_cache).signal,
        "read_ecg_native": lambda b: read_ecg(b, fs=native).signal,
    }
    out, rates = _compare(methods, bases, reps)
    out["cache_fs"] = fs_cache
    out["file_fs"] = native
    out["ratio_read_ecg"] = ratio(rates["read_ecg"], rates["bare_wfdb"])
    out["ratio_read_ecg_native"] = ratio(rates["read_ecg_native"], rates["bare_wfdb"])
    return out


def bench_decode(
    root: Path,
    config: str,
    n: int = 200,
    reps: int = 3,
    n_j2k: int = 6,
    j2k_shape: tuple[int, int] = (3056, 2544),
) -> dict:
    """The comparisons on the corpus at ``root`` (and on ``n_j2k`` JPEG 2000 files of
    ``j2k_shape``; 0 skips them), with the data settings of ``config``."""
    from clinical_moe.config import load_config

    d = load_config(config).data
    return {
        "corpus": str(root),
        "cxr": bench_cxr(root, d.image_size, n, reps),
        "cxr_j2k_full_size": bench_cxr_j2k(d.image_size, n_j2k, reps, j2k_shape) if n_j2k else None,
        "ecg": bench_ecg(root, d.ecg_samples, n, reps),
    }
