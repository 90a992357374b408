"""Stage 1 of preprocessing: each image and waveform decoded once, into a store keyed by its file.

Decoding (a JPEG 2000 DICOM takes about a second) is the cost that grows with the release, and it
depends on nothing but the file and the decode settings. So it is done once per file, into a
store that is independent of the task, window, seed and split; a cache (stage 2,
:mod:`clinical_moe.data.cache`) only *refers* to the entries of its stays. A new task, seed or
window on an already-decoded corpus then reads tables and writes small index arrays, and never
decodes again.

Layout (``data.decode_store``, default ``<cache_dir>/../decoded``)::

    cxr-<settings digest>/settings.json      what decides the bytes: modality, image size, version
    cxr-<digest>/<ab>/<key>.npy              (H, W) uint8, one decoded DICOM / JPEG
    cxr-<digest>/<ab>/<key>.skip.json        {"reason", "path"} for a file that could not be read
    ecg-<digest>/<ab>/<key>.npy              (12, S) float16 mV, one WFDB record
    notes-<digest>/<ab>/<key>.npy            a note's Hugging Face token ids (:mod:`~.note_store`)
    ehr-<digest>/                            the EHR table store (:mod:`~.ehr_store`)

``key`` is ``<file id>~<bytes>~<mtime ns>``: the ``dicom_id`` or ECG ``study_id`` (the file's stem)
plus the size and modification time of its source files, so a file replaced in place (a
re-generated corpus) gets a new key and is decoded again, never served stale. ``<ab>`` spreads
entries over 256 folders. Every entry is written to a unique temporary name and renamed into
place, and nothing in the store is shared and mutable while it fills: any number of processes,
Ray workers or machines may fill it at once, and a file decoded twice gives the same bytes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha1, sha256
from pathlib import Path

import numpy as np

from clinical_moe.data.errors import LoaderError

#: Version of each modality's decode: bump when the reader or transform changes its output.
DECODE_VERSION = {"cxr": 1, "ecg": 1}
DECODED_MODALITIES = ("cxr", "ecg")


def default_store(cache_dir: str | Path) -> Path:
    """The store beside a cache (shared by the caches of one parent folder)."""
    return Path(cache_dir).resolve().parent / "decoded"


def store_root(data) -> Path:
    """``data.decode_store``, or :func:`default_store` of ``data.cache_dir``."""
    return Path(data.decode_store) if data.decode_store else default_store(data.cache_dir)


def decode_settings(modality: str, data) -> dict:
    """Everything that decides the bytes of a ``modality`` entry (and nothing else)."""
    if modality == "cxr":
        return {
            "modality": "cxr",
            "image_size": int(data.image_size),
            "version": DECODE_VERSION["cxr"],
        }
    if modality == "ecg":
        return {
            "modality": "ecg",
            "ecg_samples": int(data.ecg_samples),
            "version": DECODE_VERSION["ecg"],
        }
    raise ValueError(f"modality {modality!r} is not decoded into the store")


def settings_name(settings: dict) -> str:
    """``<modality>-<digest>``: the folder name of these settings (nothing is created)."""
    text = json.dumps(settings, sort_keys=True)
    return f"{settings['modality']}-{sha256(text.encode()).hexdigest()[:12]}"


def settings_dir(root: str | Path, settings: dict) -> Path:
    """``<root>/<modality>-<digest>`` (created with its ``settings.json``)."""
    path = Path(root) / settings_name(settings)
    if not (path / "settings.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        _atomic_text(path / "settings.json", json.dumps(settings, indent=2, sort_keys=True))
    return path


def _source_files(modality: str, path: str) -> list[Path]:
    if modality == "ecg":
        base = path[:-4] if path.endswith((".hea", ".dat", ".mat")) else path
        return [Path(base + ext) for ext in (".hea", ".dat", ".mat")]
    return [Path(path)]


def file_key(modality: str, path: str) -> str:
    """``<id>~<bytes>~<mtime ns>`` of a file (a WFDB record: its header and signal files).

    The id is the file's stem (MIMIC-CXR's ``dicom_id``, MIMIC-IV-ECG's ``study_id``). A file
    that does not exist gets ``<id>~absent``: it decodes to a ``missing_file`` skip, and a
    key with a size once the file appears.
    """
    size, mtime = 0, 0
    for f in _source_files(modality, path):
        try:
            st = f.stat()
        except OSError:
            continue
        size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    stem = Path(path).stem if modality == "cxr" else Path(_source_files("ecg", path)[0]).stem
    return f"{stem}~absent" if size == 0 and mtime == 0 else f"{stem}~{size}~{mtime}"


def entry_path(store_dir: str | Path, key: str, suffix: str = ".npy") -> Path:
    """Where the entry of ``key`` lives (``suffix`` ``.skip.json`` for a skip record)."""
    bucket = sha1(key.split("~", 1)[0].encode()).hexdigest()[:2]
    return Path(store_dir) / bucket / f"{key}{suffix}"


def entry_state(store_dir: str | Path, key: str) -> str | dict | None:
    """``"decoded"``, the skip record ``{"reason", "path"}``, or None when not decoded yet."""
    if entry_path(store_dir, key).is_file():
        return "decoded"
    skip = entry_path(store_dir, key, ".skip.json")
    if skip.is_file():
        return json.loads(skip.read_text())
    return None


def load_entry(store_dir: str | Path, key: str) -> np.ndarray:
    """The decoded array of ``key`` (cxr (H, W) uint8, ecg (12, S) float16).

    Raises:
        FileNotFoundError: The entry is not in the store (one line naming it and the store).
    """
    path = entry_path(store_dir, key)
    try:
        return np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"decoded entry {path.name} not in the decode store {store_dir}: the store was moved "
            "or pruned; point data.decode_store at it, or run `clinical-moe preprocess` again"
        ) from None


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def decode_file(modality: str, path: str, settings: dict) -> np.ndarray:
    """Decode one file with the store's settings (raises :class:`LoaderError` when unreadable)."""
    if modality == "cxr":
        from clinical_moe.data.cxr import cxr_transform, read_cxr, without_meta_tracking

        with without_meta_tracking():
            img = cxr_transform(settings["image_size"])(read_cxr(path))[0]  # (H, W) in [0, 1]
        return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    from clinical_moe.data.ecg import read_ecg

    # 10 s at the rate that gives ecg_samples (e.g. 1250 -> 125 Hz, anti-aliased)
    sig = read_ecg(path, fs=settings["ecg_samples"] / 10.0).signal  # (12, S) mV
    return sig.astype(np.float16)


@dataclass
class DecodeJob:
    """A batch of files of one modality to decode into one store folder (picklable)."""

    modality: str
    store_dir: str
    settings: dict
    items: list[tuple[str, str]]  # (path, key)


def run_job(job: DecodeJob) -> dict[str, int]:
    """Decode the job's files that the store lacks; returns counts (runs in any worker).

    A file that cannot be read becomes a skip record (its reason is counted by the cache that
    pairs it). Any other exception is a reader bug or an unforeseen format: it stops the run
    with a message naming the file.
    """
    counts = {"decoded": 0, "skipped": 0, "present": 0}
    bucket_made: set[Path] = set()
    for path, key in job.items:
        target = entry_path(job.store_dir, key)
        if target.is_file() or entry_path(job.store_dir, key, ".skip.json").is_file():
            counts["present"] += 1  # another worker or machine did it
            continue
        if target.parent not in bucket_made:
            target.parent.mkdir(parents=True, exist_ok=True)
            bucket_made.add(target.parent)
        try:
            array = decode_file(job.modality, path, job.settings)
        except LoaderError as err:
            record = {"reason": err.reason, "path": err.path}
            _atomic_text(entry_path(job.store_dir, key, ".skip.json"), json.dumps(record))
            counts["skipped"] += 1
            continue
        except Exception as err:
            raise RuntimeError(
                f"preprocess: unexpected {type(err).__name__} decoding {job.modality} file "
                f"{path}: {err}"
            ) from err
        _atomic_array(target, array)
        counts["decoded"] += 1
    return counts


def make_jobs(
    modality: str,
    store_dir: str | Path,
    settings: dict,
    items: Sequence[tuple[str, str]],
    batch: int = 32,
) -> list[DecodeJob]:
    """Split ``(path, key)`` items into jobs of ``batch`` files."""
    return [
        DecodeJob(modality, str(store_dir), settings, list(items[i : i + batch]))
        for i in range(0, len(items), batch)
    ]
