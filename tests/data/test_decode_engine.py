"""Issue 13: the decode store fills the same from a process pool, Ray, or concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from clinical_moe.config import load_config
from tests.data.test_shard_jobs import SETTINGS, files_of

pytestmark = pytest.mark.xdist_group("synth_shards")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("engine_corpus") / "corpus"
    generate_corpus(root, n_patients=60, seed=4, workers=1, image_size=(32, 32), quiet=True)
    return root


def _cfg(corpus: Path, cache: Path, store: Path, *extra: str):
    over = [f"data.root={corpus}", f"data.cache_dir={cache}", f"data.decode_store={store}"]
    return load_config({}, [*over, *SETTINGS, *extra])


def test_ray_engine_writes_the_same_bytes_as_the_pool(corpus, tmp_path):
    pytest.importorskip(
        "ray", reason='needs the optional dependency: pip install "clinical-moe[ray]"'
    )
    from clinical_moe.data.cache import build_cache, last_decode

    build_cache(_cfg(corpus, tmp_path / "pool", tmp_path / "s_pool", "data.workers=2"), quiet=True)
    pool_stats = dict(last_decode)
    build_cache(
        _cfg(corpus, tmp_path / "ray", tmp_path / "s_ray", "data.workers=2", "data.engine=ray"),
        quiet=True,
    )
    assert last_decode["decoded"] == pool_stats["decoded"] > 0  # every file, by Ray tasks
    skip = ("decode_store.json",)
    a, b = files_of(tmp_path / "pool", skip), files_of(tmp_path / "ray", skip)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    sa, sb = files_of(tmp_path / "s_pool"), files_of(tmp_path / "s_ray")
    assert sa.keys() == sb.keys() and [k for k in sa if sa[k] != sb[k]] == []


def _fill(args) -> dict:
    from clinical_moe.data.decode_store import run_job

    return run_job(args)


def test_concurrent_writers_fill_one_store_without_clashing(corpus, tmp_path):
    """Two processes decoding the same files into one store: every entry once, no leftovers."""
    from clinical_moe.data.assemble import event_refs, unique_files
    from clinical_moe.data.decode_store import load_entry, make_jobs
    from clinical_moe.data.plan import plan_stays

    cfg = _cfg(corpus, tmp_path / "cache", tmp_path / "store")
    refs = event_refs(plan_stays(cfg, quiet=True), cfg)
    m, files = "cxr", unique_files(refs)["cxr"]
    jobs = make_jobs(m, refs[m]["dir"], refs[m]["settings"], files, batch=len(files))
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        counts = pool.map(_fill, [jobs[0], jobs[0]])
    assert sum(c["decoded"] + c["skipped"] for c in counts) >= len(files)
    assert not list(Path(refs[m]["dir"]).rglob("*.tmp"))
    serial = tmp_path / "serial"
    _fill(make_jobs(m, serial, refs[m]["settings"], files)[0])
    for _, key in files[:32]:
        assert (load_entry(refs[m]["dir"], key) == load_entry(serial, key)).all()


def test_unknown_engine_is_a_config_error():
    from clinical_moe.config import ConfigError

    with pytest.raises(ConfigError, match="data.engine"):
        load_config({}, ["data.engine=spark"])


def test_a_local_ray_instance_runs_its_workers_at_our_priority(monkeypatch):
    """Ray's default worker niceness (15) starved decoding 10-20x on a busy machine."""
    ray = pytest.importorskip(
        "ray", reason='needs the optional dependency: pip install "clinical-moe[ray]"'
    )
    import os

    from clinical_moe.data.decode_engine import start_ray

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    start_ray(1)
    try:
        theirs = ray.get(ray.remote(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert theirs == os.nice(0)
