"""Issue 13: ``preprocess --shard I/N`` decodes a deterministic 1/N of the files into the decode
store; ``--finalize`` assembles once all are there (naming what is missing before), giving the
single-process cache byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinical_moe.config import load_config

pytestmark = pytest.mark.xdist_group("synth_shards")

SETTINGS = ["data.workers=1", "data.image_size=16", "data.ecg_samples=100", "data.note_max_len=16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("shard_corpus") / "corpus"
    generate_corpus(root, n_patients=60, seed=9, workers=1, image_size=(32, 32), quiet=True)
    return root


def _cfg(corpus: Path, cache: Path, store: Path):
    overrides = [f"data.root={corpus}", f"data.cache_dir={cache}", f"data.decode_store={store}"]
    return load_config({}, overrides + SETTINGS)


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), less the names in ``skip``."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def _entries(store: Path) -> set[str]:
    return {p.name for p in store.rglob("*~*") if p.is_file()}


def test_shard_jobs_then_finalize_equal_one_build(corpus, tmp_path):
    from clinical_moe.data.cache import build_cache
    from pipelines import preprocess

    one = tmp_path / "one"
    build_cache(_cfg(corpus, one, tmp_path / "store_one"), quiet=True)
    all_entries = _entries(tmp_path / "store_one")
    split, store = tmp_path / "split", tmp_path / "store_split"
    cfg = _cfg(corpus, split, store)
    with pytest.raises(ValueError, match=rf"{len(all_entries)} files are not decoded yet"):
        build_cache(cfg, quiet=True, finalize=True)
    build_cache(cfg, quiet=True, part=(1, 3))
    assert not (split / "manifest.parquet").exists()
    job1 = _entries(store)
    assert 0 < len(job1) < len(all_entries) / 2 and job1 <= all_entries
    with pytest.raises(ValueError, match=rf"{len(all_entries) - len(job1)} files are not decoded"):
        build_cache(cfg, quiet=True, finalize=True)
    build_cache(cfg, quiet=True, part=(0, 3))
    job01 = _entries(store)
    build_cache(cfg, quiet=True, part=(2, 3))
    assert _entries(store) == all_entries and job1 <= job01  # disjoint parts that cover all
    # through the CLI, as a job array's last step would
    argv = ["--quiet", f"data.root={corpus}", f"data.cache_dir={split}", *SETTINGS]
    assert preprocess.main([*argv, f"data.decode_store={store}", "--finalize"]) == 0
    a, b = files_of(one, ("decode_store.json",)), files_of(split, ("decode_store.json",))
    assert sorted(a) == sorted(b)
    differ = [name for name in a if a[name] != b[name]]
    assert differ == [], differ  # references, shard manifests, manifest.parquet, summary.json
    # and the decoded entries are the same bytes, whichever job wrote them
    sa, sb = files_of(tmp_path / "store_one"), files_of(store)
    assert sa.keys() == sb.keys() and all(sa[k] == sb[k] for k in sa if "~" in k)


def test_shard_argument():
    import argparse

    from pipelines.preprocess import shard_part

    assert shard_part("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(argparse.ArgumentTypeError):
            shard_part(bad)
