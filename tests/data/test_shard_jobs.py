"""Issue 13: ``preprocess --shard I/N`` decodes a deterministic 1/N of the shards; ``--finalize``
assembles once all are done (naming the missing ones before), giving the single-process cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinical_moe.config import load_config

pytestmark = pytest.mark.xdist_group("synth_shards")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("shard_corpus") / "corpus"
    generate_corpus(root, n_patients=60, seed=9, workers=1, image_size=(32, 32), quiet=True)
    return root


def _cfg(corpus: Path, cache: Path):
    return load_config(
        {},
        [
            f"data.root={corpus}",
            f"data.cache_dir={cache}",
            "data.workers=1",
            "data.image_size=16",
            "data.ecg_samples=100",
            "data.note_max_len=16",
        ],
    )


def _files(cache: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()
    }


def test_shard_jobs_then_finalize_equal_one_build(corpus, tmp_path):
    from clinical_moe.data.cache import build_cache
    from pipelines import preprocess

    one = tmp_path / "one"
    build_cache(_cfg(corpus, one), quiet=True, shard_size=8)
    split = tmp_path / "split"
    cfg = _cfg(corpus, split)
    with pytest.raises(ValueError, match="no shard job has run"):
        build_cache(cfg, quiet=True, finalize=True)
    build_cache(cfg, quiet=True, shard_size=8, part=(1, 3))
    assert not (split / "manifest.parquet").exists()
    done = sorted(p.parent.name for p in split.glob("shards/*/DONE"))
    n = len(list(one.glob("shards/*/DONE")))
    assert n >= 3 and done == [f"{k:05d}" for k in range(n) if k % 3 == 1]
    with pytest.raises(ValueError, match=rf"{n - len(done)} of {n} shards are not done \(00000"):
        build_cache(cfg, quiet=True, finalize=True)
    for i in (0, 2):
        build_cache(cfg, quiet=True, shard_size=8, part=(i, 3))
    # through the CLI, as a job array's last step would
    assert (
        preprocess.main(
            [
                "--quiet",
                f"data.root={corpus}",
                f"data.cache_dir={split}",
                "data.workers=1",
                "data.image_size=16",
                "data.ecg_samples=100",
                "data.note_max_len=16",
                "--finalize",
            ]
        )
        == 0
    )
    a, b = _files(one), _files(split)
    assert sorted(a) == sorted(b)
    differ = [name for name in a if a[name] != b[name]]
    assert differ == [], differ  # arrays, shard manifests, manifest.parquet, summary.json


def test_shard_argument():
    import argparse

    from pipelines.preprocess import shard_part

    assert shard_part("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(argparse.ArgumentTypeError):
            shard_part(bad)
