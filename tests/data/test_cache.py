"""The preprocessing cache end to end on a small synthetic corpus: bad files, resume, determinism."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinical_moe.config import load_config
from clinical_moe.data.cache import build_cache
from clinical_moe.data.dataset import CachedDataset, Collator

pytestmark = pytest.mark.xdist_group("synth_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("cache_corpus") / "corpus"
    generate_corpus(root, n_patients=120, seed=3, workers=1, image_size=(48, 64), quiet=True)
    return root


def _cfg(root: Path, cache: Path, **data):
    overrides = {
        "data.root": str(root),
        "data.cache_dir": str(cache),
        "data.workers": 1,
        "data.image_size": 32,
        "data.ecg_samples": 250,
        "data.note_max_len": 32,
        "data.note_vocab": 200,
        **{f"data.{k}": v for k, v in data.items()},
    }
    return load_config({}, [f"{k}={v}" for k, v in overrides.items()])


def _digest(cache: Path) -> str:
    """Hash of every array a stay reads (decoded files included) and of the manifest."""
    from clinical_moe.data.store import CacheStore

    store = CacheStore(cache)
    h = hashlib.sha256()
    for f in sorted(cache.rglob("*.npy")):
        h.update(f.relative_to(cache).as_posix().encode())
        h.update(np.load(f).tobytes())
    for shard, row in zip(store.manifest["shard"], store.manifest["row"]):
        for m in ("ehr", "cxr", "ecg", "notes"):
            for name, a in sorted(store.read(m, int(shard), int(row)).items()):
                h.update(name.encode() + np.ascontiguousarray(a).tobytes())
    h.update(pd.read_parquet(cache / "manifest.parquet").to_csv().encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def clean_cache(corpus, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("clean") / "cache"
    build_cache(_cfg(corpus, cache), quiet=True, shard_size=16)
    return cache


def test_cache_matches_the_cohort_and_truth(corpus, clean_cache):
    import json

    manifest = pd.read_parquet(clean_cache / "manifest.parquet")
    truth = pd.read_csv(corpus / "truth" / "stays.csv.gz")
    cohort = truth[truth["in_ihm48"] == 1]
    assert sorted(manifest["stay_id"]) == sorted(cohort["stay_id"])
    merged = manifest.merge(truth, on="stay_id")
    assert (merged["has_ehr_x"].astype(bool) <= merged["has_ehr_y"].astype(bool)).all()
    # a stay with an in-window radiograph in the truth has CXR in the cache, and vice versa
    assert (merged["has_cxr_x"].astype(bool) == merged["has_cxr_y"].astype(bool)).mean() > 0.95
    # splits are disjoint by subject
    by_subject = manifest.groupby("subject_id")["split"].nunique()
    assert (by_subject == 1).all()
    summary = json.loads((clean_cache / "summary.json").read_text())
    assert summary["num_stays"] == len(manifest)
    assert summary["skipped_files"]["total"] == 0
    assert Path(summary["data_root"]) == corpus.resolve()


def test_batches_from_the_real_cache_have_the_contract_shapes(clean_cache):
    ds = CachedDataset(clean_cache, "train", ["ehr", "cxr", "ecg", "notes"])
    batch = Collator(ds)([ds[i] for i in range(min(8, len(ds)))])
    assert batch.present.shape == (len(batch.ids), 4)
    assert batch.present[:, 0].all()  # every ihm48 stay has EHR observations
    cxr = batch.inputs["cxr"]
    assert cxr["image"].shape[-2:] == (32, 32)
    assert batch.inputs["ecg"]["signal"].shape[-2:] == (12, 250)


def test_corrupt_files_are_counted_skips_and_the_stays_stay(corpus, tmp_path):
    import json

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    truth = pd.read_csv(root / "truth" / "stays.csv.gz")
    ihm = set(truth.loc[truth["in_ihm48"] == 1, "stay_id"])
    dicoms = sorted((root / "mimic-cxr" / "files").rglob("*.dcm"))
    for dcm in dicoms:
        dcm.write_bytes(dcm.read_bytes()[:400])  # every DICOM truncated inside its header
    dats = sorted((root / "mimic-iv-ecg" / "files").rglob("*.dat"))
    for dat in dats:
        dat.write_bytes(dat.read_bytes()[:100])  # every ECG signal file truncated

    cache = tmp_path / "cache"
    build_cache(_cfg(root, cache), quiet=True, shard_size=32)
    summary = json.loads((cache / "summary.json").read_text())
    reasons = summary["skipped_files"]["by_modality_reason"]
    n_cxr = sum(v for k, v in reasons.items() if k.startswith("cxr:"))
    n_ecg = sum(v for k, v in reasons.items() if k.startswith("ecg:"))
    assert n_cxr == summary["cxr"]["paired_images"] > 0
    assert n_ecg == summary["ecg"]["paired_records"] > 0
    skipped = {s["path"] for s in summary["skipped_files"]["files"]}
    assert skipped <= {str(p) for p in dicoms} | {str(p.with_suffix("")) for p in dats} | {
        str(p) for p in dats
    }, "each skip names the file at fault"
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert set(manifest["stay_id"]) == ihm  # no stay dropped
    assert not manifest["has_ecg"].any()  # the modalities became missing instead
    assert not manifest["has_cxr"].any()


def test_interrupted_decode_resumes_only_missing_files(corpus, clean_cache, tmp_path):
    """Issue 13: the unit of resume is the decoded file; entries already there are kept."""
    store = tmp_path / "decoded"
    shutil.copytree(clean_cache.parent / "decoded", store)
    entries = sorted(p for p in store.rglob("*~*.npy"))
    gone, kept = entries[::3], entries[1::3]
    for f in gone:
        f.unlink()  # as if the run had stopped before decoding them
    before = {f: f.stat().st_mtime_ns for f in kept}
    cache = tmp_path / "cache"
    build_cache(_cfg(corpus, cache), resume=True, quiet=True, shard_size=16)
    assert all(f.is_file() for f in gone)
    assert {f: f.stat().st_mtime_ns for f in kept} == before  # not decoded again
    assert _digest(cache) == _digest(clean_cache)


def test_a_decode_store_entry_of_a_replaced_file_is_not_used(corpus, tmp_path):
    """A file rewritten in place (same id) gets a new key: decoded again, never served stale."""
    import json

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    cache = tmp_path / "cache"
    cfg = _cfg(root, cache, modalities=["ehr", "cxr"])
    build_cache(cfg, quiet=True, shard_size=16)

    def refs() -> set[str]:
        return {str(k) for f in cache.rglob("cxr_ref.npy") for k in np.load(f).ravel() if k}

    old_key = sorted(refs())[0]
    dcm = next((root / "mimic-cxr" / "files").rglob(f"{old_key.split('~')[0]}.dcm"))
    dcm.write_bytes(dcm.read_bytes()[:400])  # replaced in place: now unreadable
    build_cache(cfg, resume=False, quiet=True, shard_size=16)
    skipped = json.loads((cache / "summary.json").read_text())["skipped_files"]["files"]
    assert str(dcm) in {s["path"] for s in skipped}  # decoded again, and counted as a skip
    assert old_key not in refs()


def test_a_finished_cache_is_not_planned_again(corpus, clean_cache, tmp_path, monkeypatch):
    import clinical_moe.data.plan as plan

    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    calls = []
    real = plan.plan_stays
    monkeypatch.setattr(plan, "plan_stays", lambda *a, **k: calls.append(1) or real(*a, **k))
    build_cache(_cfg(corpus, cache), resume=True, quiet=True, shard_size=16)
    assert calls == [] and _digest(cache) == _digest(clean_cache)
    build_cache(_cfg(corpus, cache), resume=False, quiet=True, shard_size=16)  # redo on request
    assert calls == [1] and _digest(cache) == _digest(clean_cache)


def test_resume_refuses_a_cache_built_with_other_settings(corpus, clean_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    with pytest.raises(ValueError, match="other data settings"):
        build_cache(_cfg(corpus, cache, image_size=48), resume=True, quiet=True, shard_size=16)


def test_same_corpus_same_cache_bytes_with_two_workers(corpus, clean_cache, tmp_path):
    cache = tmp_path / "cache"
    build_cache(_cfg(corpus, cache, workers=2), quiet=True, shard_size=16)
    assert _digest(cache) == _digest(clean_cache)


def test_missing_required_table_is_a_clear_error(corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(corpus / "mimic-iv", root / "mimic-iv")
    (root / "mimic-iv" / "icu" / "icustays.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="icustays"):
        build_cache(_cfg(root, tmp_path / "cache", modalities=["ehr"]), quiet=True)
