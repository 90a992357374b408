"""Issue 13: every consumer checks the cache's fingerprint against the run's config.

``train`` rebuilds a stale cache saying why in one line; ``evaluate`` / ``attribute`` (through
``load_run``) refuse it with one line naming what differs; a cache with no fingerprint (test
helpers) is taken as it is; old configs keep their old hash.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from hashlib import sha256
from pathlib import Path

import pytest

from clinical_moe.config import load_config
from clinical_moe.data.cache import StaleCacheError, build_cache, check_cache, ensure_cache
from clinical_moe.data.fingerprint import cache_fingerprint, stale_reason
from tests.data.small import small_config, small_corpus

pytestmark = pytest.mark.xdist_group("synth_fingerprint")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("fp_corpus"), n_patients=60, seed=5)


_cfg = small_config


def test_old_configs_keep_their_hash():
    """The hash of a config without the newer options is the one earlier versions wrote (plus
    the EHR statistics' version, which changed what every cache with EHR holds)."""
    from clinical_moe.data.cache_writer import EHR_STATS_VERSION
    from clinical_moe.data.targets import TARGETS_VERSION

    cfg = load_config({}, ["data.task=los7", "seed=3"])
    d = asdict(cfg.data)
    newer = ("embeddings", "split_seed")  # options earlier versions did not have
    for key in ("cache_dir", "workers", "engine", "decode_store", "ray_address", *newer):
        d.pop(key, None)
    d["seed"], d["targets_version"] = 3, TARGETS_VERSION
    d["ehr_stats_version"] = EHR_STATS_VERSION
    old = sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert cache_fingerprint(cfg) == old


def test_stale_cache_is_rebuilt_by_train_and_refused_by_evaluate(corpus, tmp_path, caplog):
    cache = tmp_path / "cache"
    built = _cfg(corpus, cache)
    build_cache(built, quiet=True)
    assert stale_reason(built) is None
    check_cache(built)  # matches: no error

    # evaluate / attribute: refused, one line naming each difference
    for extra, named in [
        (["data.task=los7"], "data.task: ihm48 -> los7"),
        (["seed=1"], "seed: 0 -> 1"),
        (["data.image_size=24"], "data.image_size: 16 -> 24"),
        (["data.modalities=[ehr,cxr]"], "data.modalities:"),
    ]:
        with pytest.raises(StaleCacheError, match=named.replace("[", r"\[")) as err:
            check_cache(_cfg(corpus, cache, *extra))
        assert "\n" not in str(err.value)
    # ensure_cache(rebuild=False) refuses too; settings that do not change content do not count
    with pytest.raises(StaleCacheError):
        ensure_cache(_cfg(corpus, cache, "data.task=los7"), quiet=True, rebuild=False)
    assert stale_reason(_cfg(corpus, cache, "data.workers=2")) is None

    # train: rebuilt in place, one warning line saying why
    from clinical_moe.training import distributed as D
    from pipelines import train as train_pipeline

    los7 = _cfg(corpus, cache, "data.task=los7")
    with caplog.at_level(logging.WARNING, logger="clinical_moe.data.cache"):
        train_pipeline.ensure_cache(los7, D.DistInfo(), quiet=True)
    lines = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(lines) == 1 and "data.task: ihm48 -> los7" in lines[0] and "rebuilding" in lines[0]
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["task"] == "los7"
    assert summary["fingerprint"] == cache_fingerprint(los7)
    assert summary["fingerprint_inputs"]["task"] == "los7"
    assert train_pipeline.data_fingerprint(cache) == cache_fingerprint(los7)
    check_cache(los7)
    # the old task is now the stale one
    with pytest.raises(StaleCacheError, match="data.task: los7 -> ihm48"):
        check_cache(built)


def test_split_seed_trains_new_model_seeds_on_one_split(corpus, tmp_path):
    """``data.split_seed`` fixes the split while ``seed`` moves: such a run reads the cache the
    split's own seed built, and building it afresh gives the same split."""
    import pandas as pd

    from clinical_moe.config import ConfigError

    first = _cfg(corpus, tmp_path / "s0")
    build_cache(first, quiet=True)
    same = _cfg(corpus, tmp_path / "s0", "seed=4", "data.split_seed=0")
    assert stale_reason(same) is None
    check_cache(same)
    assert cache_fingerprint(same) == cache_fingerprint(first)
    with pytest.raises(StaleCacheError, match="seed: 0 -> 4"):
        check_cache(_cfg(corpus, tmp_path / "s0", "data.split_seed=4"))

    def split(cache: Path) -> pd.Series:
        man = pd.read_parquet(cache / "manifest.parquet")
        return man.set_index("stay_id")["split"].sort_index()

    build_cache(_cfg(corpus, tmp_path / "s4a", "seed=4", "data.split_seed=0"), quiet=True)
    build_cache(_cfg(corpus, tmp_path / "s4", "seed=4"), quiet=True)
    pd.testing.assert_series_equal(split(tmp_path / "s4a"), split(tmp_path / "s0"))
    assert not split(tmp_path / "s4").equals(split(tmp_path / "s0"))
    with pytest.raises(ConfigError, match="data.split_seed"):
        _cfg(corpus, tmp_path / "x", "data.split_seed=one")


def test_one_corpus_folder_however_written_is_not_a_change(corpus, tmp_path, monkeypatch):
    """``make demo`` records an absolute ``data.root``; the configs say ``runs/demo/corpus``. A
    relative path or a symlink to the cache's own corpus reads the cache as it is, no rebuild."""
    cache = tmp_path / "cache"
    build_cache(_cfg(corpus, cache), quiet=True)  # corpus: an absolute path
    summary = (cache / "summary.json").read_text()

    monkeypatch.chdir(corpus.parent)
    link = tmp_path / "link"
    link.symlink_to(corpus, target_is_directory=True)
    for root in (corpus.name, f"./{corpus.name}", str(link)):
        cfg = _cfg(root, cache)
        assert stale_reason(cfg) is None, root
        check_cache(cfg)
        build_cache(cfg, quiet=True)  # resume: complete, nothing rewritten
        assert (cache / "summary.json").read_text() == summary
    # another folder is still a change, named
    with pytest.raises(StaleCacheError, match="data.root: .* -> elsewhere"):
        check_cache(_cfg("elsewhere", cache))


def test_unfingerprinted_and_absent_caches(tmp_path):
    from clinical_moe.testing import write_toy_cache

    cfg = load_config({}, [f"data.cache_dir={tmp_path / 'toy'}"])
    with pytest.raises(FileNotFoundError, match="clinical-moe preprocess"):
        check_cache(cfg)
    write_toy_cache(tmp_path / "toy", n_stays=20)
    check_cache(cfg)  # no fingerprint: cannot be checked, taken as it is
    assert ensure_cache(cfg) == tmp_path / "toy"


def test_changed_source_tables_make_the_cache_stale(tmp_path):
    """A regenerated or updated release at the same path is never served from the old cache."""
    import os
    import shutil

    from clinical_moe.data.fingerprint import describe, source_tables

    root = small_corpus(tmp_path, n_patients=40, seed=6)
    cfg = _cfg(root, tmp_path / "cache")
    build_cache(cfg, quiet=True)
    tables = source_tables(root, cfg.data.modalities)
    assert (
        "mimic-iv/hosp/admissions.csv.gz" in tables and "mimic-cxr/cxr-record-list.csv.gz" in tables
    )
    assert not any(k.endswith((".dcm", ".hea", ".dat")) for k in tables)  # files never walked
    assert stale_reason(cfg) is None

    # the same bytes rewritten later (a re-downloaded release): stale, the file named
    adm = root / "mimic-iv" / "hosp" / "admissions.csv.gz"
    st = adm.stat()
    os.utime(adm, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    why = stale_reason(cfg)
    assert why == "source tables changed: mimic-iv/hosp/admissions.csv.gz changed"
    with pytest.raises(StaleCacheError, match="admissions.csv.gz changed"):
        check_cache(cfg)
    # preprocess (resume) refuses to mix the two, naming the file; train's ensure_cache rebuilds
    with pytest.raises(ValueError, match="admissions.csv.gz changed.*--no-resume"):
        build_cache(cfg, quiet=True)
    ensure_cache(cfg, quiet=True)
    assert stale_reason(cfg) is None

    # a table that appears (e.g. a Parquet copy beside the CSV) counts too
    shutil.copyfile(adm, adm.with_name("extra.csv.gz"))
    assert stale_reason(cfg).endswith("mimic-iv/hosp/extra.csv.gz new")
    # a cache written before tables were recorded is rebuilt once, saying why
    old = {k: v for k, v in json.loads((tmp_path / "cache" / "summary.json").read_text())[
        "fingerprint_inputs"
    ].items() if k != "source_tables"}  # fmt: skip
    assert describe(old, {**old, "source_tables": tables}).startswith("source tables: not recorded")
