"""Preprocessing in two stages: decode each file once, then assemble a task's cache cheaply.

1. **Decode** (:mod:`clinical_moe.data.decode_store`): every image and ECG the plan pairs is
   decoded once into a store keyed by the file and the decode settings alone (not the task,
   window or seed), by a local process pool or Ray (:mod:`clinical_moe.data.decode_engine`), or
   in parts by ``--shard I/N`` jobs. The EHR event tables are likewise read once per release
   into the EHR table store (:mod:`clinical_moe.data.ehr_store`).
2. **Assemble** (:mod:`clinical_moe.data.assemble`): cohort, labels, windows, pairing, split,
   note tokens and EHR arrays are computed for the run's task and seed, and the cache refers to
   the decoded entries. A new task or seed on a decoded corpus only does this stage.

A file that cannot be read (corrupt or truncated DICOM / WFDB, missing ``.dat``, wrong rate, NaN
signal, unknown leads) is skipped: that modality becomes missing for that stay, the skip is logged
and counted by reason in ``summary.json``, and the stay is kept. No free text of a patient is
written anywhere but the token ids.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from clinical_moe.config import Config, DataConfig
from clinical_moe.data.fingerprint import (
    cache_fingerprint,
    fingerprint_inputs,
    spelt_as_cached,
    stale_reason,
)
from clinical_moe.data.store import write_json
from clinical_moe.data.table_io import quiet_tables

logger = logging.getLogger(__name__)

#: Written by caches of earlier versions (removed with the rest when a cache is rebuilt).
PLAN_FILE = "plan.json"


def _fingerprint(cfg: Config) -> str:
    """Hash of everything that decides the cache content (see :mod:`clinical_moe.data.fingerprint`).

    The native-target options (``native_targets``, ``cxr_label_source``, ``chexpert_uncertain``,
    ``chexpert_blank``) are data fields, so they count; so does the targets' format version, so a
    cache written by an older vocabulary or parser is rebuilt rather than reused.
    """
    return cache_fingerprint(cfg)


def _complete(cache_dir: Path, summary_file: Path, fp: str) -> bool:
    """A finished build with fingerprint ``fp`` whose shards and decode store are still there."""
    from clinical_moe.data.assemble import shards_done, store_dirs

    manifest = cache_dir / "manifest.parquet"
    if not (summary_file.exists() and manifest.exists()):
        return False
    if json.loads(summary_file.read_text()).get("fingerprint") != fp:
        return False
    return shards_done(cache_dir) and all(p.is_dir() for p in store_dirs(cache_dir).values())


#: Statistics of the last decode stage in this process (for benchmarks and the CLI).
last_decode: dict = {}


def build_cache(
    cfg: Config,
    resume: bool = True,
    quiet: bool = False,
    shard_size: int = 256,
    part: tuple[int, int] | None = None,
    finalize: bool = False,
) -> Path:
    """Preprocess ``cfg.data.root`` into ``cfg.data.cache_dir`` (see :mod:`clinical_moe.data.store`).

    Args:
        cfg: The run config (``data`` section and ``seed``).
        resume: Return a cache that was finished with the same settings as it is (no planning);
            False assembles it again. Decoded files are reused either way: the store is keyed
            by the file and the decode settings, so its entries cannot be stale.
        quiet: No progress bars.
        shard_size: Stays per cache shard.
        part: ``(I, N)``: decode only the files ``k`` with ``k % N == I`` in the plan's sorted
            file list (one job of a SLURM / Kubernetes array) and write no cache.
        finalize: Assemble the cache once the ``part`` jobs have decoded every file; refuses,
            naming the files still missing, before then.

    Returns:
        The cache directory.
    """
    from clinical_moe.data.assemble import assemble, event_refs, missing_entries, unique_files
    from clinical_moe.data.decode_engine import run_jobs
    from clinical_moe.data.decode_store import make_jobs
    from clinical_moe.data.plan import plan_stays

    cfg = spelt_as_cached(cfg)  # the same corpus folder, however it is written, is no change
    d: DataConfig = cfg.data
    last_decode.clear()
    cache_dir = Path(d.cache_dir)
    fp = _fingerprint(cfg)
    fp_file = cache_dir / "fingerprint.json"
    if fp_file.exists() and part is None:
        written = json.loads(fp_file.read_text())
        old = written.get("fingerprint")
        # issue 15: a fingerprint with no shard beside it (a failed run) blocks nothing
        if old != fp and resume and (cache_dir / "shards").is_dir():
            from clinical_moe.data.fingerprint import describe

            what = describe(written.get("inputs") or {}, fingerprint_inputs(cfg))
            what = what if written.get("inputs") else f"{old} != {fp}"
            raise ValueError(
                f"{cache_dir} holds a cache built with other data settings ({what}, cache -> run); "
                "delete it, choose another data.cache_dir, or rebuild it with --no-resume"
            )
    summary_file = cache_dir / "summary.json"  # written last: its fingerprint marks a whole cache
    if resume and part is None and not finalize and _complete(cache_dir, summary_file, fp):
        logger.info("preprocess: %s is complete with these settings; nothing to do", cache_dir)
        return cache_dir
    with quiet_tables(quiet):  # issue 13: row bars with an ETA on the large tables
        plan = plan_stays(cfg, quiet=quiet)  # table errors stop the run here, before any state
    refs = event_refs(plan, cfg)
    files = unique_files(refs)
    if part is not None:
        files = {
            m: [f for k, f in enumerate(fs) if k % part[1] == part[0]] for m, fs in files.items()
        }
    if finalize:
        _refuse_missing(refs)
    else:
        todo = missing_entries(refs, files)
        jobs = [
            job
            for m, fs in todo.items()
            for job in make_jobs(m, refs[m]["dir"], refs[m]["settings"], fs)
        ]
        n_files = sum(len(fs) for fs in files.values())
        workers = max(1, min(d.workers, os.cpu_count() or 1))
        logger.info(
            "preprocess: %d files to decode of %d (%s, %d workers)",
            sum(len(v) for v in todo.values()),
            n_files,
            d.engine,
            workers,
        )
        stats = run_jobs(jobs, d.engine, workers, quiet, d.ray_address)
        last_decode.update(stats, planned=n_files)
    if part is not None:
        logger.info("preprocess: decode job %d/%d done: %s", part[0], part[1], last_decode)
        return cache_dir
    summary_file.unlink(missing_ok=True)  # until this build ends, the cache is not complete
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": fp, "inputs": fingerprint_inputs(cfg)})
    return assemble(cfg, plan, refs, shard_size=shard_size)


def _refuse_missing(refs: dict) -> None:
    """``--finalize`` before every ``--shard`` job is done: one line naming what is missing."""
    from clinical_moe.data.assemble import missing_entries

    missing = missing_entries(refs)
    total = sum(len(v) for v in missing.values())
    if not total:
        return
    named = [p for v in missing.values() for p, _ in v][:3]
    per = ", ".join(f"{m}: {len(v)}" for m, v in missing.items() if v)
    raise ValueError(
        f"preprocess --finalize: {total} files are not decoded yet ({per}; e.g. "
        f"{', '.join(named)}); run (or rerun) the --shard I/N jobs, or preprocess without "
        "--finalize to decode them here"
    )


class StaleCacheError(ValueError):
    """The cache was built with other settings than the run's (the message names them)."""


#: What a build writes at the top of a cache directory (removed before a stale cache is rebuilt).
_CACHE_FILES = (
    "manifest.parquet",
    "summary.json",
    "fingerprint.json",
    "ehr_stats.json",
    "tokenizer.json",
    "decode_store.json",
    PLAN_FILE,
)


def _store_gone(cache_dir: Path) -> str | None:
    """Why the decode-store entries the cache refers to are not all there (None when they are).

    A folder that no longer exists is gone. A folder pruned (``clinical-moe store prune
    --unreferenced``, which leaves ``pruned.json``) after the cache was written has each of the
    cache's entries looked up; they are not looked up otherwise (hundreds of thousands of files).
    """
    from clinical_moe.data.assemble import store_dirs
    from clinical_moe.data.store_admin import PRUNED, missing_entries_of

    dirs = store_dirs(cache_dir)
    gone = [str(p) for p in dirs.values() if not p.is_dir()]
    if gone:
        return f"decode store {', '.join(gone)} is gone"
    summary = cache_dir / "summary.json"
    written = summary.stat().st_mtime if summary.is_file() else 0.0
    marks = [p / PRUNED for p in dirs.values()]
    if any(m.is_file() and m.stat().st_mtime >= written for m in marks):
        missing = missing_entries_of(cache_dir)
        if missing:
            return f"{missing} decoded entries it refers to were pruned from the decode store"
    return None


def check_cache(cfg: Config, cache_dir: str | Path | None = None) -> None:
    """Refuse a cache that does not match ``cfg`` (``evaluate`` / ``attribute``).

    Raises:
        FileNotFoundError: No finished cache (no ``manifest.parquet``).
        StaleCacheError: One line naming what differs, e.g. ``data.task: ihm48 -> los7``.
    """
    cache_dir = Path(cache_dir or cfg.data.cache_dir)
    if not (cache_dir / "manifest.parquet").is_file():
        raise FileNotFoundError(
            f"no cache at {cache_dir} (no manifest.parquet); build it with "
            "`clinical-moe preprocess --config <the run's config>`"
        )
    why = stale_reason(cfg, cache_dir) or _store_gone(cache_dir)
    if why:
        raise StaleCacheError(
            f"the cache {cache_dir} was built with other settings than this run ({why}, "
            "cache -> run); rebuild it with `clinical-moe preprocess --config <the run's config>` "
            "or pass the cache that was built for the run"
        )


def ensure_cache(cfg: Config, quiet: bool = False, rebuild: bool = True) -> Path:
    """The cache of ``cfg``: built when absent, rebuilt (saying why, in one line) when stale.

    Args:
        cfg: The run config.
        quiet: No progress bars while building.
        rebuild: False refuses a stale cache (:class:`StaleCacheError`) instead of rebuilding it.

    Returns:
        The cache directory, matching ``cfg``.
    """
    cache_dir = Path(cfg.data.cache_dir)
    if not (cache_dir / "manifest.parquet").is_file():
        logger.warning("no cache at %s: preprocessing %s", cache_dir, cfg.data.root)
        return Path(build_cache(cfg, quiet=quiet))
    why = stale_reason(cfg, cache_dir) or _store_gone(cache_dir)
    if not why:
        return cache_dir
    if not rebuild:
        check_cache(cfg, cache_dir)  # raises, naming the difference
    logger.warning("cache %s is stale (%s, cache -> run): rebuilding it", cache_dir, why)
    import shutil

    shutil.rmtree(cache_dir / "shards", ignore_errors=True)
    for name in _CACHE_FILES:
        (cache_dir / name).unlink(missing_ok=True)
    return Path(build_cache(cfg, resume=False, quiet=quiet))
