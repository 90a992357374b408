"""Tests of the chest X-ray loader: real and hand-made DICOMs, JPEGs, bad files, metadata, pairing."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pandas as pd
import pytest

pydicom = pytest.importorskip("pydicom")
from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

from clinical_moe.data.cxr import (  # noqa: E402
    apply_display_luts,
    cxr_transform,
    pair_cxr,
    parse_study_datetime,
    read_cxr,
    read_cxr_metadata,
)
from clinical_moe.data.errors import LoaderError  # noqa: E402

RAMP = (np.arange(48 * 64).reshape(48, 64) % 4096).astype(np.uint16)


def write_dx(
    path, pixels, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian, data=None, **attrs
):
    """Write a minimal DX DICOM: 16 bits allocated, 12 stored, unsigned."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes() if data is None else data
    if data is not None:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def expected_window(values, center, width):
    """DICOM PS3.3 C.11.2.1.2 linear window, mapped to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def assert_loader_error(excinfo, path, reason):
    err = excinfo.value
    assert err.reason == reason, str(err)
    assert str(path) in str(err) and err.path == str(path)


# ----------------------------------------------------------------------------- real sample


@pytest.mark.samples
def test_real_j2k_monochrome1_is_inverted(samples_dir):
    path = samples_dir / "dicom" / "RG3_J2KR.dcm"
    image = read_cxr(path)
    raw = pydicom.dcmread(path)
    assert raw.PhotometricInterpretation == "MONOCHROME1"
    stored = raw.pixel_array.astype(np.float64)
    assert image.shape == stored.shape == (1760, 1760)
    assert image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    # MONOCHROME1 stores dense (bright) as low values, so bright = dense flips the sign.
    assert np.corrcoef(image[::8, ::8].ravel(), stored[::8, ::8].ravel())[0, 1] < -0.9


# ----------------------------------------------------------------------------- hand-made DICOMs


def test_monochrome2_window_applied(tmp_path):
    path = write_dx(tmp_path / "m2.dcm", RAMP, WindowCenter=2048, WindowWidth=1024)
    image = read_cxr(path)
    assert image.shape == RAMP.shape and image.dtype == np.float32
    np.testing.assert_allclose(image, expected_window(RAMP.astype(float), 2048, 1024), atol=2e-3)
    assert image[RAMP < 1500].max() == 0.0 and image[RAMP > 2600].min() == 1.0


def test_rescale_is_applied_before_window(tmp_path):
    # Window in rescaled units: 2 * stored - 1000 in [2000, 4000] means stored in [1500, 2500].
    path = write_dx(
        tmp_path / "r.dcm",
        RAMP,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=3000,
        WindowWidth=2000,
    )
    image = read_cxr(path)
    np.testing.assert_allclose(image, expected_window(2.0 * RAMP - 1000, 3000, 2000), atol=2e-3)
    assert image[RAMP <= 1490].max() == 0.0 and image[RAMP >= 2510].min() == 1.0


def test_monochrome1_inverts(tmp_path):
    m2 = read_cxr(write_dx(tmp_path / "m2.dcm", RAMP, WindowCenter=2048, WindowWidth=2048))
    m1 = read_cxr(
        write_dx(tmp_path / "m1.dcm", RAMP, "MONOCHROME1", WindowCenter=2048, WindowWidth=2048)
    )
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert np.corrcoef(m1.ravel(), RAMP.ravel())[0, 1] < -0.9


def test_no_window_is_min_max(tmp_path):
    pixels = RAMP[:, :40] + 100
    image = read_cxr(write_dx(tmp_path / "plain.dcm", pixels))
    np.testing.assert_allclose(image, (pixels - pixels.min()) / np.ptp(pixels), atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    # A VOI LUT of 1024 entries starting at stored value 1000: squares its input.
    item = Dataset()
    item.LUTDescriptor = [1024, 1000, 16]
    item.add_new(0x00283006, "US", [int(v) for v in (np.arange(1024) ** 2 // 16)])  # LUTData
    path = write_dx(tmp_path / "lut.dcm", RAMP, VOILUTSequence=[item])
    index = np.clip(RAMP.astype(int) - 1000, 0, 1023)
    expected = (index**2 // 16) / (1023**2 // 16)
    np.testing.assert_allclose(read_cxr(path), expected, atol=1e-6)


# Display attribute sets: LUT routes must agree on each.
DISPLAY_CASES = {
    "window": {"WindowCenter": 2048, "WindowWidth": 1024},
    "rescale": {
        "RescaleSlope": 2,
        "RescaleIntercept": -1000,
        "WindowCenter": 3000,
        "WindowWidth": 2000,
    },
    "sigmoid": {"WindowCenter": 1500, "WindowWidth": 3000, "VOILUTFunction": "SIGMOID"},
    "signed": {"PixelRepresentation": 1, "WindowCenter": -100, "WindowWidth": 900},
    "none": {},
}


@pytest.mark.parametrize("attrs", DISPLAY_CASES.values(), ids=DISPLAY_CASES.keys())
def test_lookup_table_route_equals_direct_pydicom(tmp_path, attrs):
    pixels = RAMP.astype(np.int32) - (2048 if attrs.get("PixelRepresentation") else 0)
    ds = pydicom.dcmread(write_dx(tmp_path / "x.dcm", pixels, **attrs))
    stored = ds.pixel_array
    assert stored.min() < 0 if attrs.get("PixelRepresentation") else stored.min() >= 0
    direct = apply_display_luts(stored, ds, as_table=False)
    np.testing.assert_allclose(apply_display_luts(stored, ds, as_table=True), direct, rtol=1e-6)


def _reference_display(ds):
    """Display LUTs over every pixel, MONOCHROME1 negation, min/max stretch: the long way."""
    image = apply_display_luts(ds.pixel_array, ds, as_table=False)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = -image
    return (image - image.min()) / (image.max() - image.min())


def _zigzag_voi_lut():
    item = Dataset()  # not monotonic: the folded-table shortcut must fall back to a scan
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", [int(v) for v in np.abs((np.arange(4096) % 512) - 256) * 100])
    return item


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "attrs",
    [*DISPLAY_CASES.values(), {"zigzag": True}],
    ids=[*DISPLAY_CASES.keys(), "zigzag-voi-lut"],
)
def test_folded_table_equals_reference(tmp_path, attrs, photometric):
    # read_cxr folds inversion and stretch into the LUT table; the numbers must not change.
    rng = np.random.default_rng(3)
    pixels = rng.integers(200, 3900, (40, 56)).astype(np.int32)  # min 0 and max 4095 are absent
    if attrs.get("PixelRepresentation"):
        pixels -= 2048
    attrs = dict(attrs)
    if attrs.pop("zigzag", False):
        attrs["VOILUTSequence"] = [_zigzag_voi_lut()]
    path = write_dx(tmp_path / "x.dcm", pixels, photometric, **attrs)
    expected = _reference_display(pydicom.dcmread(path))
    np.testing.assert_allclose(read_cxr(path), expected, atol=2e-6)


def test_non_finite_display_values_are_an_error(tmp_path):
    # An infinite slope: stored 0 becomes NaN and every other value infinity.
    path = write_dx(tmp_path / "nan.dcm", RAMP, RescaleSlope="1e400", RescaleIntercept=0)
    with pytest.warns(RuntimeWarning), pytest.raises(LoaderError) as excinfo:
        read_cxr(path)
    assert_loader_error(excinfo, path, "corrupt")


def test_constant_image_gives_zeros(tmp_path):
    image = read_cxr(write_dx(tmp_path / "c.dcm", np.full((8, 8), 700), "MONOCHROME1"))
    assert not np.isnan(image).any() and (image == 0).all()


# ----------------------------------------------------------------------------- JPEG / PNG


def test_jpg_and_png(tmp_path):
    ramp8 = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))
    Image.fromarray(ramp8, mode="L").save(tmp_path / "x.jpg", quality=95)
    image = read_cxr(tmp_path / "x.jpg")
    assert image.shape == (32, 64) and image.dtype == np.float32
    assert 0.0 <= image.min() < 0.05 and 0.95 < image.max() <= 1.0
    assert np.corrcoef(image.ravel(), ramp8.ravel())[0, 1] > 0.99
    Image.fromarray(np.stack([ramp8] * 3, -1)).save(tmp_path / "rgb.png")
    assert read_cxr(tmp_path / "rgb.png").shape == (32, 64)
    Image.fromarray(ramp8.astype(np.uint16) * 200).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_cxr(tmp_path / "deep.png"), ramp8 / 255.0, atol=1e-4)


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(tmp_path / "nope.dcm")
    assert_loader_error(excinfo, tmp_path / "nope.dcm", "missing_file")


@pytest.mark.parametrize("where", ["in_pixels", "halfway", "in_header"])
def test_truncated_dicom(tmp_path, where):
    full = write_dx(tmp_path / "full.dcm", RAMP).read_bytes()
    keep = {"in_pixels": len(full) - 100, "halfway": len(full) // 2, "in_header": 200}[where]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full[:keep])
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(cut)
    assert_loader_error(excinfo, cut, "truncated")


def test_not_a_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file, not an image\n" * 20)
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(path)
    assert_loader_error(excinfo, path, "corrupt")


def test_bad_jpgs(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        tmp_path / "ok.jpg", quality=90
    )
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((tmp_path / "ok.jpg").read_bytes()[:400])
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(cut)
    assert_loader_error(excinfo, cut, "truncated")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(junk)
    assert_loader_error(excinfo, junk, "corrupt")


def test_colour_and_multiframe_are_unsupported(tmp_path):
    path = write_dx(tmp_path / "rgb.dcm", np.zeros((4, 4)), "RGB")
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(path)
    assert_loader_error(excinfo, path, "unsupported")
    path = write_dx(tmp_path / "mf.dcm", np.zeros((8, 4)), NumberOfFrames=2)
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(path)
    assert_loader_error(excinfo, path, "unsupported")


def test_jpeg_lossless_without_decoder_gives_install_hint(tmp_path):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG lossless decoder is installed; nothing to report")
    path = write_dx(
        tmp_path / "jll.dcm",
        np.zeros((4, 4)),
        syntax=JPEGLosslessSV1,
        data=encapsulate([b"\xff\xd8\xff\xd9"]),
    )
    with pytest.raises(LoaderError) as excinfo:
        read_cxr(path)
    assert_loader_error(excinfo, path, "decode_unavailable")
    assert 'pip install "clinical-moe[jpeg-lossless]"' in str(excinfo.value)
    assert "JPEG Lossless" in str(excinfo.value)


def test_loader_error_pickles():
    err = pickle.loads(pickle.dumps(LoaderError("/x/y.dcm", "corrupt", "bad bytes")))
    assert (err.path, err.reason, err.detail) == ("/x/y.dcm", "corrupt", "bad bytes")
    assert isinstance(err, ValueError) and "/x/y.dcm" in str(err)


# ----------------------------------------------------------------------------- transform


def test_transform_without_meta_tracking_is_the_same():
    from monai.data import get_track_meta

    from clinical_moe.data.cxr import without_meta_tracking

    image = np.random.default_rng(1).random((90, 70), dtype=np.float32)
    tf = cxr_transform(16)
    with without_meta_tracking():
        assert get_track_meta() is False
        fast = tf(image)
    assert get_track_meta() is True
    np.testing.assert_array_equal(fast, tf(image))


def test_transform_shapes_and_range():
    image = np.random.default_rng(0).random((50, 70), dtype=np.float32)
    out = cxr_transform(32)(image)
    assert isinstance(out, np.ndarray) and out.shape == (1, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    sample = cxr_transform((16, 24), keys="image")({"image": image, "stay_id": 7})
    assert sample["image"].shape == (1, 16, 24) and sample["stay_id"] == 7
    assert (cxr_transform(8)(np.zeros((20, 20), np.float32)) == 0).all()


# ----------------------------------------------------------------------------- metadata


META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,"
    "Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
    "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning"
)


def meta_row(dicom_id, subject, study, view, date, time):
    return (
        f"{dicom_id},{subject},{study},CHEST (PORTABLE AP),{view},3056,2544,{date},{time},"
        f"CHEST (PORTABLE AP),antero-posterior,Erect"
    )


def write_meta(root, rows, name="mimic-cxr-2.0.0-metadata.csv", header=META_HEADER):
    text = "\n".join([header, *rows]) + "\n"
    path = root / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_study_time_parsing():
    dates = pd.Series(["21800723", "21800723", "21800723", "21800723", None])
    times = pd.Series([80556.875, 556.0, 235959.999, np.nan, 120000.0])
    parsed = parse_study_datetime(dates, times)
    assert parsed[0] == pd.Timestamp("2180-07-23 08:05:56.875")
    assert parsed[1] == pd.Timestamp("2180-07-23 00:05:56")
    assert parsed[2] == pd.Timestamp("2180-07-23 23:59:59.999")
    assert pd.isna(parsed[3]) and pd.isna(parsed[4])
    for bad_time in (246000.0, 126100.0, 120075.0):
        with pytest.raises(LoaderError, match="StudyTime"):
            parse_study_datetime(pd.Series(["21800723"]), pd.Series([bad_time]))
    with pytest.raises(LoaderError, match="StudyDate"):
        parse_study_datetime(pd.Series(["2180-07-23"]), pd.Series([1.0]))


def test_read_metadata_paths_and_dtypes(tmp_path):
    dicom_id = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    write_meta(
        tmp_path,
        [
            meta_row(dicom_id, 10000032, 50414267, "PA", 21800506, 213014.531),
            meta_row("b" * 8, 19999987, 58971208, "AP", 21800507, 556.0),
        ],
        name="mimic-cxr-2.0.0-metadata.csv.gz",
    )
    meta = read_cxr_metadata(tmp_path)
    assert meta["path"][0] == f"files/p10/p10000032/s50414267/{dicom_id}.dcm"
    assert meta["path"][1] == "files/p19/p19999987/s58971208/bbbbbbbb.dcm"
    assert meta["study_datetime"][0] == pd.Timestamp("2180-05-06 21:30:14.531")
    assert meta["study_datetime"][1] == pd.Timestamp("2180-05-07 00:05:56")
    assert str(meta["subject_id"].dtype) == "Int64" and meta["StudyTime"].dtype == np.float64
    # The JPG release layout is detected from the files present.
    jpg = tmp_path / "files/p10/p10000032/s50414267" / f"{dicom_id}.jpg"
    jpg.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(jpg)
    assert read_cxr_metadata(tmp_path)["path"][0].endswith(".jpg")
    assert read_cxr_metadata(tmp_path, image_format="dcm")["path"][0].endswith(".dcm")


def test_metadata_errors(tmp_path):
    with pytest.raises(LoaderError) as excinfo:
        read_cxr_metadata(tmp_path)
    assert excinfo.value.reason == "missing_file" and "metadata.csv" in str(excinfo.value)
    empty = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    empty.write_text("")
    with pytest.raises(LoaderError) as excinfo:
        read_cxr_metadata(tmp_path)
    assert_loader_error(excinfo, empty, "empty")
    write_meta(tmp_path, [])
    with pytest.raises(LoaderError) as excinfo:
        read_cxr_metadata(tmp_path)
    assert_loader_error(excinfo, empty, "empty")
    path = write_meta(
        tmp_path, ["a,10000032,50414267,21800506"], header="dicom_id,subject_id,study_id,StudyDate"
    )
    with pytest.raises(LoaderError) as excinfo:
        read_cxr_metadata(tmp_path)
    assert_loader_error(excinfo, path, "missing_column")
    assert "ViewPosition" in str(excinfo.value) and "StudyTime" in str(excinfo.value)
    write_meta(tmp_path, [meta_row("a", "x1", 50414267, "AP", 21800506, 1.0)])
    with pytest.raises(LoaderError) as excinfo:
        read_cxr_metadata(tmp_path)
    assert_loader_error(excinfo, path, "bad_value")


# ----------------------------------------------------------------------------- pairing


def _images(rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "dicom_id", "study_datetime", "ViewPosition"])
    frame["study_id"] = range(len(frame))
    frame["path"] = "files/" + frame["dicom_id"] + ".dcm"
    return frame


T0 = pd.Timestamp("2180-01-01 10:00:00")
H = pd.Timedelta(hours=1)
STAYS = pd.DataFrame({"subject_id": [1, 2, 3], "stay_id": [100, 200, 300], "intime": [T0, T0, T0]})
IMAGES = _images(
    [
        (1, "before", T0 - pd.Timedelta(seconds=1), "AP"),
        (1, "at_in", T0, "AP"),
        (1, "mid_pa", T0 + 10 * H, "PA"),
        (1, "mid", T0 + 20 * H, "ap "),
        (1, "at_end", T0 + 48 * H, "AP"),
        (1, "after", T0 + 48 * H + pd.Timedelta(seconds=1), "AP"),
        (2, "other", T0 + 30 * H, "AP"),
        (4, "nostay", T0 + 1 * H, "AP"),
        (2, "no_time", pd.NaT, "AP"),
    ]
)


def test_pair_window_view_and_latest():
    out = pair_cxr(STAYS, IMAGES)
    assert out["dicom_id"].tolist() == ["at_end", "other"]
    assert out["stay_id"].tolist() == [100, 200]
    assert out["hours"].tolist() == [48.0, 30.0]
    assert {"stay_id", "dicom_id", "path", "study_datetime", "hours", "view_position"} <= set(
        out.columns
    )
    everything = pair_cxr(STAYS, IMAGES, keep="all", view_positions=None)
    assert everything.loc[everything.stay_id == 100, "dicom_id"].tolist() == [
        "at_in",
        "mid_pa",
        "mid",
        "at_end",
    ]
    assert (everything.groupby("stay_id")["subject_id"].nunique() == 1).all()
    assert set(everything.loc[everything.stay_id == 200, "dicom_id"]) == {"other"}
    assert 300 not in set(everything.stay_id)


def test_pair_last_n_and_window():
    out = pair_cxr(STAYS, IMAGES, keep="last_n", n=2)
    assert out.loc[out.stay_id == 100, "dicom_id"].tolist() == ["mid", "at_end"]
    assert out.loc[out.stay_id == 100, "hours"].tolist() == [20.0, 48.0]
    short = pair_cxr(STAYS, IMAGES, window_hours=24, keep="last_n", n=5, view_positions=("pa",))
    assert short["dicom_id"].tolist() == ["mid_pa"]


def test_pair_ties_do_not_depend_on_row_order():
    tied = _images([(1, "b", T0 + H, "AP"), (1, "a", T0 + H, "AP")])
    assert pair_cxr(STAYS, tied)["dicom_id"].tolist() == ["b"]
    assert pair_cxr(STAYS, tied.iloc[::-1])["dicom_id"].tolist() == ["b"]


def test_pair_rejects_bad_stays():
    with pytest.raises(ValueError, match="intime"):
        pair_cxr(STAYS.drop(columns="intime"), IMAGES)
    with pytest.raises(ValueError, match="datetime64"):
        pair_cxr(STAYS.assign(intime="2180-01-01"), IMAGES)
    with pytest.raises(ValueError, match="unique"):
        pair_cxr(pd.concat([STAYS, STAYS]), IMAGES)
    with pytest.raises(ValueError, match="keep"):
        pair_cxr(STAYS, IMAGES, keep="first")
