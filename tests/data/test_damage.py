"""Damage suite (issue 15): every damaged table, file or config has one exact, named outcome.

Outcomes: an error naming the file or key (required tables, configs, checkpoints), a warning naming
the file plus ``missing_sources`` (optional tables: damaged = absent, the run goes on), or a counted
row drop / repair in ``damaged_rows``; in every table case no other stay changes. The corpus is
generated once per module; each case copies its tables (images and records are linked), damages
one thing and plans again (tables only, no decoding).
"""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from clinical_moe.config import ConfigError, load_config
from clinical_moe.data.errors import LoaderError
from clinical_moe.data.plan import plan_stays

pytestmark = pytest.mark.xdist_group("damage")

IV, CXR, ECG, NOTE = "mimic-iv", "mimic-cxr", "mimic-iv-ecg", "mimic-iv-note"
REQUIRED = {
    "patients": f"{IV}/hosp/patients.csv.gz",
    "admissions": f"{IV}/hosp/admissions.csv.gz",
    "icustays": f"{IV}/icu/icustays.csv.gz",
}
OPTIONAL = {
    "icu/chartevents": f"{IV}/icu/chartevents.csv.gz",
    "hosp/labevents": f"{IV}/hosp/labevents.csv.gz",
    "note/radiology": f"{NOTE}/note/radiology.csv.gz",
    "note/discharge": f"{NOTE}/note/discharge.csv.gz",
    "mimic-cxr/metadata": f"{CXR}/mimic-cxr-2.0.0-metadata.csv.gz",
    "mimic-iv-ecg/record_list": f"{ECG}/record_list.csv",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("damage") / "corpus"
    generate_corpus(root, n_patients=30, seed=3, workers=1, image_size=(32, 32), quiet=True)
    return root


def _cfg(root: Path, **data):
    over = {"data.root": str(root), "data.cache_dir": str(root.parent / "cache"), **data}
    return load_config({}, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def clean(corpus):
    return plan_stays(_cfg(corpus), quiet=True)


def _copy(corpus: Path, dest: Path) -> Path:
    """Copy the tables; link the image / waveform folders (never damaged here)."""
    shutil.copytree(corpus, dest, ignore=shutil.ignore_patterns("files"))
    for files in corpus.glob("*/files"):
        (dest / files.parent.name / "files").symlink_to(files)
    return dest


def _read_lines(path: Path) -> list[bytes]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.splitlines(keepends=True)


def _write_lines(path: Path, lines: list[bytes]) -> None:
    raw = b"".join(lines)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _set_field(path: Path, row: int, column: str, value: bytes) -> bytes:
    """Set ``column`` of data row ``row`` (simple CSV without quoted commas in that row)."""
    lines = _read_lines(path)
    header = lines[0].rstrip(b"\r\n").split(b",")
    fields = lines[row + 1].rstrip(b"\r\n").split(b",")
    old = fields[header.index(column.encode())]
    fields[header.index(column.encode())] = value
    lines[row + 1] = b",".join(fields) + b"\n"
    _write_lines(path, lines)
    return old


# ------------------------------------------------------------------------ file-level damages
def truncated(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2] if p.suffix == ".gz" else raw[: len(raw) // 2])


def zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


def empty_gzip(p: Path) -> None:
    p.write_bytes(gzip.compress(b"") if p.suffix == ".gz" else b"\n")


def header_only(p: Path) -> None:
    _write_lines(p, _read_lines(p)[:1])


def not_gzip(p: Path) -> None:
    p.write_bytes(b"\x1f\x8b\x08\x00garbage" if p.suffix == ".gz" else b"\x00\x01\x02")


def no_key_column(p: Path) -> None:
    lines = _read_lines(p)
    lines[0] = lines[0].replace(b"subject_id", b"subj").replace(b"itemid", b"item")
    _write_lines(p, lines)


def unterminated_quote(p: Path) -> None:
    lines = _read_lines(p)
    lines.insert(2, b'"' + lines[2])
    _write_lines(p, lines)


FILE_DAMAGES = [truncated, zero_bytes, empty_gzip, header_only, not_gzip, no_key_column]


def _stays(plan) -> list[int]:
    return plan.stays["stay_id"].astype(int).tolist()


def _changed(clean, plan) -> set[int]:
    """Stays whose EHR arrays, paired files or notes differ from the clean plan."""
    out = set()
    for sid in set(_stays(clean)) | set(_stays(plan)):
        a, b = clean.ehr.get(sid), plan.ehr.get(sid)
        if (a is None) != (b is None) or (
            a is not None and not all(np.array_equal(a[k], b[k]) for k in ("values", "times"))
        ):
            out.add(sid)
        for m in ("cxr", "ecg"):
            ea = [h for _, h in getattr(clean, m).get(sid, [])]
            eb = [h for _, h in getattr(plan, m).get(sid, [])]
            if ea != eb:
                out.add(sid)
        na, nb = clean.notes.get(sid), plan.notes.get(sid)
        if (na is None) != (nb is None) or (na is not None and len(na[1]) != len(nb[1])):
            out.add(sid)
    return out


@pytest.mark.parametrize("damage", FILE_DAMAGES + [unterminated_quote], ids=lambda f: f.__name__)
@pytest.mark.parametrize("table", sorted(REQUIRED))
def test_required_table_damage_stops_with_the_file_named(corpus, tmp_path, table, damage):
    root = _copy(corpus, tmp_path / "c")
    path = root / REQUIRED[table]
    damage(path)
    with pytest.raises((LoaderError, FileNotFoundError)) as err:
        plan_stays(_cfg(root), quiet=True)
    msg = str(err.value)
    assert path.name in msg and "\n" not in msg
    assert not (tmp_path / "cache" / "fingerprint.json").exists()


@pytest.mark.parametrize("damage", FILE_DAMAGES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("table", sorted(OPTIONAL))
def test_optional_table_damage_is_an_absent_source(corpus, clean, tmp_path, table, damage):
    root = _copy(corpus, tmp_path / "c")
    path = root / OPTIONAL[table]
    damage(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_stays(_cfg(root), quiet=True)
    named = [str(w.message) for w in caught if path.name in str(w.message)]
    missing = plan.summary["missing_sources"]
    if table in missing:  # damaged = absent: warned, listed, the run went on
        assert named and missing[table]["file"] == str(path)
    else:  # a plain-text file cut in half only loses its last row: counted
        assert damage is truncated and path.suffix == ".csv"
        assert plan.summary["damaged_rows"]
    assert _stays(plan) == _stays(clean)  # the cohort never depends on an optional table
    modality = {"mimic-cxr/metadata": "cxr", "mimic-iv-ecg/record_list": "ecg"}.get(table)
    if modality and table in missing:
        assert getattr(plan, modality) == {}  # and nothing else changed
    if table in missing:
        assert _changed(clean, plan) <= set(_stays(clean))


def test_header_only_chartevents_warns_and_lists_it(corpus, clean, tmp_path):
    root = _copy(corpus, tmp_path / "c")
    header_only(root / OPTIONAL["icu/chartevents"])
    with pytest.warns(UserWarning, match="chartevents.csv.gz.*empty"):
        plan = plan_stays(_cfg(root), quiet=True)
    assert plan.summary["missing_sources"]["icu/chartevents"]["reason"] == "empty"


def test_every_optional_source_gone_empties_modalities_with_reasons(corpus, tmp_path):
    root = _copy(corpus, tmp_path / "c")
    for table in ("mimic-cxr/metadata", "mimic-iv-ecg/record_list", "note/radiology"):
        zero_bytes(root / OPTIONAL[table])
    with pytest.warns(UserWarning, match="empty for every stay"):
        plan = plan_stays(_cfg(root), quiet=True)
    empty = plan.summary["empty_modalities"]
    assert set(empty) == {"cxr", "ecg", "notes"}
    assert "record_list" in empty["ecg"] and "metadata" in empty["cxr"]


# ------------------------------------------------------------------------ row-level damages
ROW_CASES = [
    # (table key, file, column, new value, counted reason, rows' stay changes allowed)
    ("icu/icustays", REQUIRED["icustays"], "stay_id", b"", "blank_stay_id"),
    ("icu/icustays", REQUIRED["icustays"], "subject_id", b"abc", "unparseable_subject_id"),
    ("hosp/admissions", REQUIRED["admissions"], "hadm_id", b"", "blank_hadm_id"),
    (
        "hosp/admissions",
        REQUIRED["admissions"],
        "dischtime",
        b"2000-01-01 00:00:00",
        "dischtime_before_admittime",
    ),
    ("hosp/patients", REQUIRED["patients"], "anchor_age", b"300", "anchor_age_out_of_range"),
    ("hosp/patients", REQUIRED["patients"], "anchor_age", b"-4", "anchor_age_out_of_range"),
    ("hosp/patients", REQUIRED["patients"], "gender", b"Q", "unknown_gender"),
    ("hosp/patients", REQUIRED["patients"], "subject_id", b"1x", "unparseable_subject_id"),
    ("icu/chartevents", OPTIONAL["icu/chartevents"], "itemid", b"22OO45", "unparseable_itemid"),
    ("icu/chartevents", OPTIONAL["icu/chartevents"], "stay_id", b"", "blank_stay_id"),
    (
        "icu/chartevents",
        OPTIONAL["icu/chartevents"],
        "charttime",
        b"yesterday",
        "unparseable_charttime",
    ),
    ("icu/chartevents", OPTIONAL["icu/chartevents"], "charttime", b"", "blank_charttime"),
    ("icu/chartevents", OPTIONAL["icu/chartevents"], "value", b"\xff\xfe", "undecodable_bytes"),
    ("hosp/labevents", OPTIONAL["hosp/labevents"], "itemid", b"x", "unparseable_itemid"),
    ("hosp/labevents", OPTIONAL["hosp/labevents"], "subject_id", b"", "blank_subject_id"),
    (
        "hosp/labevents",
        OPTIONAL["hosp/labevents"],
        "charttime",
        b"2180-13-45 99:00:00",
        "unparseable_charttime",
    ),
    ("note/radiology", OPTIONAL["note/radiology"], "note_type", b"R\xe9", "undecodable_bytes"),
    ("note/radiology", OPTIONAL["note/radiology"], "subject_id", b"?", "unparseable_subject_id"),
    (
        "mimic-cxr-2.0.0-metadata.csv.gz",
        OPTIONAL["mimic-cxr/metadata"],
        "subject_id",
        b"",
        "blank_subject_id",
    ),
    (
        "record_list.csv",
        OPTIONAL["mimic-iv-ecg/record_list"],
        "ecg_time",
        b"23/07/2180",
        "unparseable_ecg_time",
    ),
    (
        "record_list.csv",
        OPTIONAL["mimic-iv-ecg/record_list"],
        "study_id",
        b"s1",
        "unparseable_study_id",
    ),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: f"{c[0].split('/')[-1]}-{c[4]}")
def test_row_damage_is_counted_and_touches_only_its_stay(corpus, clean, tmp_path, case):
    table, rel, column, value, reason = case
    root = _copy(corpus, tmp_path / "c")
    path = root / rel
    lines = _read_lines(path)
    header = lines[0].rstrip(b"\r\n").split(b",")
    row = 0
    subject = (
        int(lines[row + 1].split(b",")[header.index(b"subject_id")] or 0)
        if (b"subject_id" in header)
        else None
    )
    _set_field(path, row, column, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_stays(_cfg(root), quiet=True)
    assert plan.summary["damaged_rows"][table][reason] == 1
    allowed = set(clean.stays.loc[clean.stays["subject_id"] == subject, "stay_id"].astype(int))
    if column in ("subject_id", "stay_id", "hadm_id") or table == "icu/icustays":
        # the damaged id's own stay may change; find it through the clean tables
        allowed |= {int(s) for s in clean.stays["stay_id"]} if subject is None else allowed
    assert _changed(clean, plan) <= allowed


def test_extra_field_line_is_counted_not_fatal(corpus, clean, tmp_path):
    root = _copy(corpus, tmp_path / "c")
    path = root / OPTIONAL["icu/chartevents"]
    lines = _read_lines(path)
    lines[1] = lines[1].rstrip(b"\n") + b",1,2,3\n"
    lines[2] = lines[2].replace(b",", b",x", 1).replace(b",x", b",", 1) + b""
    lines[3] = b"\xff" + lines[3]
    _write_lines(path, lines)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_stays(_cfg(root), quiet=True)
    assert _stays(plan) == _stays(clean)
    assert "icu/chartevents" in plan.summary["damaged_rows"]


# ------------------------------------------------------------------------ configs and commands
@pytest.mark.parametrize(
    "override,key",
    [
        ("data.modalities=[ehr,xray]", "xray"),
        ("data.modalities=[ehr,ehr]", "twice"),
        ("data.modalities=[]", "at least one"),
        ("model.head.top_k=9", "top_k"),
        ("model.head.nonsense=1", "model.head.nonsense"),
        ("model.name=fusemo", "fusemoe"),
        ("data.task=ihm24", "data.task"),
        ("data.split_fractions=[0.5,0.5,0.5]", "split_fractions"),
        ("train.epochs=0", "train.epochs"),
        ("data.chexpert_blank=maybe", "chexpert_blank"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override, key):
    overrides = [override, "model.head.num_experts=4"] if "top_k" in override else [override]
    with pytest.raises(ConfigError) as err:
        load_config({}, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_failed_preprocess_leaves_nothing_that_blocks_the_fix(corpus, tmp_path):
    from clinical_moe.data.cache import build_cache

    root = _copy(corpus, tmp_path / "c")
    good = root / REQUIRED["icustays"]
    saved = good.read_bytes()
    truncated(good)
    cfg = _cfg(root, **{"data.modalities": "[ehr]", "data.workers": 1})
    with pytest.raises(LoaderError, match="icustays.csv.gz"):
        build_cache(cfg, quiet=True)
    assert not (Path(cfg.data.cache_dir) / "fingerprint.json").exists()
    good.write_bytes(saved)
    other = _cfg(root, **{"data.modalities": "[ehr]", "data.workers": 1, "data.max_events": 2})
    assert (build_cache(other, quiet=True) / "summary.json").exists()


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04", b""], ids=["text", "zip", "empty"])
def test_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, content):
    from clinical_moe.training.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_ecg_header_rate_length_disagreeing_with_10s_is_a_counted_skip(tmp_path, samples_dir):
    from clinical_moe.data.ecg import read_ecg

    src = next((samples_dir / "ecg").rglob("*.hea"), None)
    if src is None or not src.with_suffix(".dat").exists():
        pytest.skip("no sample record with signal")
    for f in (src, src.with_suffix(".dat")):
        shutil.copy(f, tmp_path / f.name)
    hea = tmp_path / src.name
    fields = hea.read_text().splitlines()
    first = fields[0].split()
    first[2] = str(float(first[2].split("/")[0]) * 2)  # double the rate: half the duration
    hea.write_text("\n".join([" ".join(first), *fields[1:]]) + "\n")
    with pytest.raises(LoaderError) as err:
        read_ecg(hea.with_suffix(""))
    assert err.value.reason == "wrong_duration" and hea.name in str(err.value)
