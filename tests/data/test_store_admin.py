"""Issue 13: ``clinical-moe store info | prune`` - seeing and reclaiming the decode store.

Pruning must never remove what a cache still refers to, nor a live writer's temporary file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from clinical_moe.data.cache import StaleCacheError, build_cache, check_cache, ensure_cache
from clinical_moe.data.store import CacheStore
from pipelines.cli import main
from tests.data.small import small_config, small_corpus

pytestmark = pytest.mark.xdist_group("synth_store_admin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("admin_corpus"), n_patients=50, seed=8)


_cfg = small_config


def _read_all(cache: Path) -> int:
    """Every stay's images and ECGs read back through the store (raises if one is gone)."""
    store = CacheStore(cache)
    n = 0
    for r in store.manifest.itertuples():
        for m in ("cxr", "ecg"):
            if getattr(r, f"has_{m}"):
                store.read(m, int(r.shard), int(r.row))
                n += 1
    return n


def test_prune_keeps_what_caches_use_and_live_writers(corpus, tmp_path, capsys):
    work = tmp_path / "runs"
    store = work / "decoded"
    a = _cfg(corpus, work / "cache-a", "data.window_hours=12")  # beside the store: found
    elsewhere = tmp_path / "scratch" / "cache-b"  # a 48 h window pairs files a 12 h one does not
    b = _cfg(corpus, elsewhere, f"data.decode_store={store}")
    build_cache(a, quiet=True)
    build_cache(b, quiet=True)
    cxr = next(store.glob("cxr-*"))
    entry = next(cxr.glob("*/*.npy"))

    # an entry no cache refers to, a killed writer's old temp file and a live writer's new one
    stray = entry.with_name("s999999~1~1.npy")
    np.save(stray, np.zeros((16, 16), np.uint8))
    old_tmp = entry.with_name(f".{entry.name}.dead.tmp")
    old_tmp.write_bytes(b"x" * 10)
    hours_ago = time.time() - 3 * 3600
    os.utime(old_tmp, (hours_ago, hours_ago))
    live_tmp = entry.with_name(f".{entry.name}.live.tmp")
    live_tmp.write_bytes(b"x" * 10)

    assert main(["store", "info", "--config", str(_yaml(tmp_path, a))]) == 0
    out = capsys.readouterr().out
    assert "caches beside it that refer to it: 1" in out and cxr.name in out and "*" in out

    keep_b = ["--cache", str(elsewhere)]
    prune = ["store", "prune", "--store", str(store), "--unreferenced"]
    assert main([*prune, *keep_b, "--dry-run"]) == 0
    assert "would remove 1 temporary files, 1 unreferenced entries" in capsys.readouterr().out
    assert stray.exists() and old_tmp.exists()

    assert main([*prune, *keep_b]) == 0
    assert "removed 1 temporary files, 1 unreferenced entries" in capsys.readouterr().out
    assert not stray.exists() and not old_tmp.exists() and live_tmp.exists()
    assert _read_all(work / "cache-a") > 0 and _read_all(elsewhere) > 0
    check_cache(a)
    check_cache(b)

    # without naming cache-b, the entries only it uses go; it is then refused, and rebuilt
    assert main(prune) == 0
    removed = int(capsys.readouterr().out.split("temporary files, ")[1].split()[0])
    assert removed > 0
    check_cache(a)
    with pytest.raises(
        StaleCacheError, match=f"{removed} decoded entries it refers to were pruned"
    ):
        check_cache(b)
    ensure_cache(b, quiet=True)
    assert _read_all(elsewhere) > 0
    check_cache(b)


def test_prune_other_settings_and_its_errors(corpus, tmp_path, capsys):
    work = tmp_path / "runs"
    a = _cfg(corpus, work / "cache-a")
    c = _cfg(corpus, work / "cache-c", "data.image_size=24")
    build_cache(a, quiet=True)
    build_cache(c, quiet=True)
    store = work / "decoded"
    assert len(list(store.glob("cxr-*"))) == 2

    assert main(["store", "prune", "--store", str(store), "--other-settings"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["store", "info", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no decode store at" in capsys.readouterr().err

    assert main(["store", "prune", "--config", str(_yaml(tmp_path, a)), "--other-settings"]) == 0
    out = capsys.readouterr().out
    assert "1 folders" in out and "folder cxr-" in out
    assert len(list(store.glob("cxr-*"))) == 1
    check_cache(a)
    with pytest.raises(StaleCacheError, match="is gone"):
        check_cache(c)
    ensure_cache(c, quiet=True)  # train rebuilds it
    assert _read_all(work / "cache-c") > 0


def _yaml(tmp_path: Path, cfg) -> Path:
    """The config as a YAML file (the CLI takes files)."""
    import yaml

    from clinical_moe.config import to_dict

    path = tmp_path / f"{Path(cfg.data.cache_dir).name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path
