"""Chest radiographs: a rendered chest carrying the ``pulmonary`` factor, written as DX DICOM.

The image is a density map (bright = dense) on normalized coordinates x, y in [-1, 1] (x to the
image right, y downwards): a soft-tissue thorax, two dark lung fields, a bright mediastinum, heart,
spine, diaphragm, ribs and clavicles, then, for ``pulmonary`` = 1, opacities (bright blobs in the
lung fields) and often a pleural effusion that fills a lung base and blunts its costophrenic angle.
Severe patients may show support devices (an endotracheal tube, a central line). Each image gets
its own anatomy jitter, exposure and noise.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom

# Frontal lung fields (cx, cy, rx, ry) in normalized coordinates, before per-image jitter.
# The tests measure lung-field intensity inside these ellipses shrunk by 0.7.
LUNG_FIELDS = ((-0.42, -0.05, 0.27, 0.52), (0.42, -0.05, 0.25, 0.50))
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
VIEW_MEANING = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral"}


def uid_from(*parts) -> str:
    """A DICOM UID derived from ``parts`` (``2.25.<int>``): deterministic, never time-based."""
    digest = hashlib.sha256("|".join(map(str, ("clinical_moe",) + parts)).encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def dicom_id_from(seed: int, study_id: int, k: int) -> str:
    """40 hex characters in dash-separated groups of 8, like MIMIC-CXR dicom ids."""
    h = hashlib.sha1(f"{seed}|{study_id}|{k}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def _soft(inside: np.ndarray, sharp: float = 10.0) -> np.ndarray:
    """Smooth 0..1 indicator of ``inside > 0``."""
    return 1.0 / (1.0 + np.exp(-sharp * inside))


def plan_findings(rng: np.random.Generator, pulmonary: int, severity: float) -> dict:
    """What one study shows (shared by its images, its CheXpert labels and its report)."""
    opacity = bool(pulmonary and rng.random() < 0.85)
    effusion = bool(pulmonary and rng.random() < 0.55) or rng.random() < 0.03
    if pulmonary and not (opacity or effusion):
        opacity = True
    return {
        "opacity": opacity,
        "effusion": effusion,
        "effusion_side": int(rng.integers(0, 3)),  # 0 right, 1 left, 2 both
        "opacity_side": int(rng.integers(0, 2)),
        "devices": bool(severity > 1.0 and rng.random() < 0.75),
        "atelectasis": bool(rng.random() < 0.08 + 0.1 * pulmonary),
        "cardiomegaly": bool(rng.random() < 0.1),
    }


RENDER_MAX = 320  # anatomy is rendered at most this many rows, then upsampled (it is smooth)


def render_chest(
    rng: np.random.Generator, rows: int, cols: int, view: str, findings: dict
) -> np.ndarray:
    """Render a chest radiograph density map in [0, 1], float32 ``(rows, cols)``.

    The smooth anatomy and findings are drawn on a grid of at most ``RENDER_MAX`` rows and
    upsampled (bilinear); the fine noise is added at full resolution.
    """
    r0 = min(rows, RENDER_MAX)
    c0 = max(8, round(cols * r0 / rows))
    y = np.linspace(-1, 1, r0, dtype=np.float32)[:, None]  # (r0, 1)
    x = np.linspace(-1, 1, c0, dtype=np.float32)[None, :]  # (1, c0)
    dx, dy = rng.uniform(-0.04, 0.04, 2)
    sc = rng.uniform(0.94, 1.06)
    x, y = (x - dx) / sc, (y - dy) / sc
    img = 0.08 + 0.47 * _soft(1 - (x / 0.93) ** 2 - (y / 1.2) ** 2, 6)  # thorax, air outside
    if view == "LATERAL":
        lungs = [_soft(1 - ((x + 0.05) / 0.55) ** 2 - ((y + 0.05) / 0.55) ** 2, 8)]
        img = img + 0.22 * np.exp(-(((x - 0.62) / 0.1) ** 2))  # spine (posterior)
        img = img + 0.15 * _soft(1 - ((x + 0.2) / 0.3) ** 2 - ((y - 0.35) / 0.3) ** 2)  # heart
    else:
        lungs = [
            _soft(1 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2, 8)
            for cx, cy, rx, ry in LUNG_FIELDS
        ]
        img = img + 0.18 * np.exp(-((x / 0.09) ** 2)) * _soft(y + 0.95, 5)  # spine + mediastinum
        heart_r = 0.34 if findings["cardiomegaly"] else 0.27
        img = img + 0.16 * _soft(1 - ((x - 0.1) / heart_r) ** 2 - ((y - 0.3) / 0.24) ** 2)
        for side in (-1, 1):  # clavicles
            img = img + 0.12 * np.exp(
                -(((y + 0.62 + 0.25 * (x * side - 0.4) ** 2) / 0.025) ** 2)
            ) * _soft(0.8 - np.abs(x - side * 0.4) * 2.2, 8)
    lung = np.clip(sum(lungs), 0, 1)
    img = img - 0.32 * lung
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 5.5 - 0.9 * x**2 + rng.uniform(0, 1)))
    img = img + 0.06 * ribs * lung
    img = img + 0.2 * _soft(y - (0.5 + 0.18 * x**2), 14)  # diaphragm / abdomen
    img = _add_findings(rng, img, x, y, lungs, view, findings)
    gain, offset, gamma = rng.uniform(0.9, 1.1), rng.uniform(-0.04, 0.04), rng.uniform(0.85, 1.15)
    img = np.clip(img * gain + offset, 0, 1) ** gamma
    small = rng.normal(0, 0.03, (r0 // 16 + 2, c0 // 16 + 2))
    img = img + zoom(small, (r0 / small.shape[0], c0 / small.shape[1]), order=1)[:r0, :c0]
    if (r0, c0) != (rows, cols):
        img = zoom(img, (rows / r0, cols / c0), order=1)  # (rows, cols)
    img = img + np.float32(0.015) * rng.standard_normal((rows, cols), dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _add_findings(rng, img, x, y, lungs, view, f) -> np.ndarray:
    """Opacities, effusion and devices (the ``pulmonary`` and weak ``severity`` signals)."""
    fields = LUNG_FIELDS if view != "LATERAL" else ((-0.05, -0.05, 0.55, 0.55),)
    if f["opacity"]:
        side = min(f["opacity_side"], len(fields) - 1)
        cx, cy, rx, ry = fields[side]
        for _ in range(int(rng.integers(2, 5))):
            r, a = np.sqrt(rng.uniform(0, 0.5)), rng.uniform(0, 2 * np.pi)
            bx, by = cx + r * rx * np.cos(a), cy + r * ry * np.sin(a) + 0.1
            sig = rng.uniform(0.07, 0.14)
            blob = np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sig**2))
            img = img + rng.uniform(0.22, 0.32) * blob * lungs[side]
    if f["effusion"]:
        sides = [0, 1] if f["effusion_side"] == 2 else [f["effusion_side"]]
        for side in sides:
            side = min(side, len(fields) - 1)
            cx, cy, rx, ry = fields[side]
            level = cy + ry * rng.uniform(0.05, 0.35)
            lateral = np.clip((x - cx) * np.sign(cx or 1.0) / rx, 0, 1)
            meniscus = level - 0.3 * ry * lateral  # climbs laterally: blunted costophrenic angle
            img = img + 0.36 * _soft(y - meniscus, 18) * lungs[side]
    if f["devices"] and view != "LATERAL":
        img = img + 0.35 * np.exp(-((x / 0.012) ** 2)) * _soft(-0.25 - y, 30) * _soft(y + 1.0, 30)
        t = rng.uniform(0.3, 0.5)
        line = np.abs(y - (-0.7 + t * (x + 0.8) ** 2))
        img = img + 0.3 * np.exp(-((line / 0.01) ** 2)) * (x < 0.05) * (x > -0.8)
    return img


def write_dx(path: Path, density: np.ndarray, rng: np.random.Generator, meta: dict) -> dict:
    """Write ``density`` as a DX "For Presentation" DICOM file; return its pixel-module choices.

    Args:
        path: output ``.dcm`` path (parents are created).
        density: float ``(rows, cols)`` in [0, 1], bright = dense.
        rng: stream for the encoding choices (bits stored, photometric, window).
        meta: ids and times: subject_id, study_id, dicom_id, seed, view, date, time,
            procedure, orientation.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    bits = int(rng.choice([12, 14, 16]))
    maxv = 2**bits - 1
    mono1 = bool(rng.random() < 0.4)
    stored = np.round(density * maxv * rng.uniform(0.85, 0.98) + rng.uniform(0, 0.01) * maxv)
    stored = np.clip(stored, 0, maxv).astype(np.uint16)
    if mono1:
        stored = (maxv - stored).astype(np.uint16)  # MONOCHROME1: high = dark
    rows, cols = stored.shape
    sop = uid_from(meta["seed"], "sop", meta["dicom_id"])
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = DX_PRESENTATION
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = uid_from("implementation", "clinical_moe", "0.1")
    fm.ImplementationVersionName = "CLINICAL_MOE_01"
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = meta["date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = meta["time"]
    ds.AccessionNumber = ""
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "___"
    ds.PatientID = str(meta["subject_id"])
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta["view"]
    ds.StudyInstanceUID = uid_from(meta["seed"], "study", meta["study_id"])
    ds.SeriesInstanceUID = uid_from(meta["seed"], "series", meta["study_id"], meta["view"])
    ds.StudyID = str(meta["study_id"])
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["A", "F"] if meta["view"] == "LATERAL" else ["L", "F"]
    ds.ImageLaterality = "U"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "R-10206", "SRT"
    code.CodeMeaning = VIEW_MEANING[meta["view"]]
    ds.ViewCodeSequence = Sequence([code])
    proc = Dataset()
    proc.CodeValue, proc.CodingSchemeDesignator = "CXR", "L"
    proc.CodeMeaning = meta["procedure"]
    ds.ProcedureCodeSequence = Sequence([proc])
    ds.PerformedProcedureStepDescription = meta["procedure"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
    ds.ImagerPixelSpacing = ds.PixelSpacing = [round(430.0 / max(rows, cols), 6)] * 2
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    has_window = bool(rng.random() < 0.6)
    if has_window:
        lo, hi = np.percentile(stored[::4, ::4], [1, 99])  # subsampled: fast on 1024^2
        ds.WindowCenter = round(float(lo + hi) / 2, 1)
        ds.WindowWidth = round(max(float(hi - lo), 2.0), 1)
    ds.LossyImageCompression = "00"
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return {
        "bits_stored": bits,
        "photometric": ds.PhotometricInterpretation,
        "has_window": has_window,
    }
