"""One preprocessing pass: raw MIMIC-layout files -> compact, memory-mapped arrays + manifest.

The pass reads the tables once (events streamed in chunks), pairs images / ECGs / notes to stays,
fits the note tokenizer on the train split, then decodes the signals shard by shard in parallel
worker processes. Each shard is written atomically with a ``DONE`` marker, so an interrupted run
resumes without redoing finished shards. A file that cannot be read (corrupt or truncated DICOM /
WFDB, missing ``.dat``, wrong rate, NaN signal, unknown leads) is skipped: that modality becomes
missing for that stay, the skip is logged and counted by reason in ``summary.json``, and the stay
is kept. No free text of a patient is written anywhere but the token ids.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from clinical_moe.config import Config, DataConfig
from clinical_moe.data.cache_writer import ShardWriter, finalize_cache
from clinical_moe.data.errors import LoaderError
from clinical_moe.data.fingerprint import cache_fingerprint, fingerprint_inputs, stale_reason
from clinical_moe.data.store import shard_dir, write_json
from clinical_moe.data.table_io import quiet_tables

logger = logging.getLogger(__name__)

#: Written by every shard job: what ``--finalize`` needs to assemble without planning again.
PLAN_FILE = "plan.json"


@dataclass
class ShardTask:
    """Everything a worker needs to write one shard (picklable, no open files)."""

    index: int
    meta: list[dict]  # manifest fields per stay
    ehr: list[dict | None]  # per stay raw EHR arrays or None
    cxr: list[list[tuple[str, float]]]  # per stay [(path, hours)]
    ecg: list[list[tuple[str, float]]]
    notes: list[tuple[np.ndarray, np.ndarray] | None]  # per stay (ids (n, L), hours (n,))
    targets: dict[str, list[np.ndarray | None]]  # modality -> per stay (n, K_m) native targets
    modalities: tuple[str, ...]
    num_events: int
    image_size: int
    ecg_samples: int
    note_len: int
    num_variables: int
    num_static: int
    cache_dir: str
    target_widths: dict[str, int] = field(default_factory=dict)  # modality -> K_m
    # issue 13: modality -> per stay (vectors (n, F), hours (n,)[, targets]) from data.embeddings
    embedded: dict[str, list[tuple | None]] = field(default_factory=dict)
    embedding_dims: dict[str, int] = field(default_factory=dict)  # modality -> F
    skips: list[dict] = field(default_factory=list)


def _unexpected(modality: str, path: str, stay_id: int, err: Exception) -> RuntimeError:
    """An error that names the file and stay (worker tracebacks otherwise lose both)."""
    return RuntimeError(
        f"preprocess: unexpected {type(err).__name__} reading {modality} file {path} "
        f"(stay {stay_id}): {err}"
    )


def _read_images(items, image_size, skips, stay_id):
    from clinical_moe.data.cxr import cxr_transform, read_cxr, without_meta_tracking

    tf = cxr_transform(image_size)
    arrays, times, kept = [], [], []
    with without_meta_tracking():
        for i, (path, hours) in enumerate(items):
            try:
                img = tf(read_cxr(path))[0]  # (H, W) in [0, 1]
            except LoaderError as err:
                skips.append(
                    {"modality": "cxr", "stay_id": stay_id, "path": err.path, "reason": err.reason}
                )
                continue
            except Exception as err:  # a reader bug or an unforeseen format: stop, naming the file
                raise _unexpected("cxr", path, stay_id, err) from err
            arrays.append(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
            times.append(hours)
            kept.append(i)
    return _stacked(arrays, times, kept)


def _read_ecgs(items, ecg_samples, skips, stay_id):
    from clinical_moe.data.ecg import read_ecg

    arrays, times, kept = [], [], []
    for i, (path, hours) in enumerate(items):
        try:
            # 10 s at the rate that gives ecg_samples (e.g. 1250 -> 125 Hz, anti-aliased)
            sig = read_ecg(path, fs=ecg_samples / 10.0).signal  # (12, S) mV
        except LoaderError as err:
            skips.append(
                {"modality": "ecg", "stay_id": stay_id, "path": err.path, "reason": err.reason}
            )
            continue
        except Exception as err:
            raise _unexpected("ecg", path, stay_id, err) from err
        arrays.append(sig.astype(np.float16))
        times.append(hours)
        kept.append(i)
    return _stacked(arrays, times, kept)


def _stacked(arrays: list, times: list, kept: list[int]):
    """``(arrays (n, ...), times (n,), kept (n,) indices into the stay's items)`` or None."""
    if not arrays:
        return None
    return np.stack(arrays), np.asarray(times, np.float32), np.asarray(kept, np.int64)


def _with_targets(decoded, targets: np.ndarray | None):
    """Attach the target rows of the events that decoded (a skipped file drops its row too)."""
    if decoded is None:
        return None
    arrays, times, kept = decoded
    if targets is None:
        return arrays, times
    return arrays, times, targets[kept]  # (n, K)


def write_shard(task: ShardTask) -> tuple[pd.DataFrame, list[dict]]:
    """Decode and write one shard (runs in a worker process)."""
    shapes = {
        "cxr": (task.image_size, task.image_size),
        "ecg": (12, task.ecg_samples),
        "notes": (task.note_len,),
    }
    writer = ShardWriter(
        task.cache_dir,
        task.index,
        task.modalities,
        task.num_events,
        shapes,
        task.num_variables,
        task.num_static,
        target_widths=task.target_widths,
        embedding_dims=task.embedding_dims,
    )
    skips: list[dict] = []
    for i, meta in enumerate(task.meta):
        sid = meta["stay_id"]
        events = {}
        if "cxr" in task.modalities and task.cxr[i]:
            events["cxr"] = _with_targets(
                _read_images(task.cxr[i], task.image_size, skips, sid), _target(task, "cxr", i)
            )
        if "ecg" in task.modalities and task.ecg[i]:
            events["ecg"] = _with_targets(
                _read_ecgs(task.ecg[i], task.ecg_samples, skips, sid), _target(task, "ecg", i)
            )
        if "notes" in task.modalities and task.notes[i] is not None:
            events["notes"] = task.notes[i]
        for m, per_stay in task.embedded.items():  # precomputed vectors: nothing to decode
            events[m] = per_stay[i]
        writer.add(meta, ehr=task.ehr[i] if "ehr" in task.modalities else None, events=events)
    return writer.close(skips), skips


def _target(task: ShardTask, modality: str, i: int) -> np.ndarray | None:
    per_stay = task.targets.get(modality)
    return None if per_stay is None else per_stay[i]


def _fingerprint(cfg: Config) -> str:
    """Hash of everything that decides the cache content (see :mod:`clinical_moe.data.fingerprint`).

    The native-target options (``native_targets``, ``cxr_label_source``, ``chexpert_uncertain``,
    ``chexpert_blank``) are data fields, so they count; so does the targets' format version, so a
    cache written by an older vocabulary or parser is rebuilt rather than reused.
    """
    return cache_fingerprint(cfg)


def _complete(cache_dir: Path, summary_file: Path, fp: str) -> bool:
    """A finished build with fingerprint ``fp`` whose every shard is still marked ``DONE``."""
    manifest = cache_dir / "manifest.parquet"
    if not (summary_file.exists() and manifest.exists()):
        return False
    if json.loads(summary_file.read_text()).get("fingerprint") != fp:
        return False
    shards = pd.read_parquet(manifest, columns=["shard"])["shard"].unique()
    return all((shard_dir(cache_dir, int(k)) / "DONE").exists() for k in shards)


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
        resume: Keep shards already marked ``DONE`` by an interrupted run with the same settings;
            a cache that was finished with the same settings is returned as it is (no planning).
            False redoes every shard.
        quiet: No progress bars.
        shard_size: Stays per shard (the unit of parallelism and of resume).
        part: ``(I, N)``: decode only shards ``k`` with ``k % N == I`` (one job of a SLURM /
            Kubernetes array; every job plans the same shards) and leave the cache unfinished.
        finalize: Only assemble the manifest and summary from the shards that the ``part`` jobs
            wrote; refuses, naming them, while some shard is not done.

    Returns:
        The cache directory.
    """
    from clinical_moe.data.plan import plan_stays

    d: DataConfig = cfg.data
    cache_dir = Path(d.cache_dir)
    fp = _fingerprint(cfg)
    fp_file = cache_dir / "fingerprint.json"
    if fp_file.exists():
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
    if finalize:
        return finalize_shards(cfg)
    if resume and _complete(cache_dir, summary_file, fp):
        logger.info("preprocess: %s is complete with these settings; nothing to do", cache_dir)
        return cache_dir
    summary_file.unlink(missing_ok=True)  # until this build ends, the cache is not complete
    with quiet_tables(quiet):  # issue 13: row bars with an ETA on the large tables
        plan = plan_stays(cfg, quiet=quiet)  # table errors stop the run here, before any state
    cache_dir.mkdir(parents=True, exist_ok=True)  # a failed plan leaves no folder behind
    write_json(fp_file, {"fingerprint": fp, "inputs": fingerprint_inputs(cfg)})
    stays = plan.stays
    tasks = []
    for k, start in enumerate(range(0, len(stays), shard_size)):
        if part is not None and k % part[1] != part[0]:
            continue  # another job's shard
        if resume and (shard_dir(cache_dir, k) / "DONE").exists():
            continue
        rows = stays.iloc[start : start + shard_size]
        ids = rows["stay_id"].astype(int).tolist()
        tasks.append(
            ShardTask(
                index=k,
                meta=plan.meta(rows),
                ehr=[plan.ehr.get(s) for s in ids],
                cxr=[plan.cxr.get(s, []) for s in ids],
                ecg=[plan.ecg.get(s, []) for s in ids],
                notes=[plan.notes.get(s) for s in ids],
                targets={m: [t.get(s) for s in ids] for m, t in plan.targets.items()},
                modalities=tuple(d.modalities),
                num_events=d.max_events,
                image_size=d.image_size,
                ecg_samples=d.ecg_samples,
                note_len=d.note_max_len,
                num_variables=plan.num_variables,
                num_static=plan.num_static,
                cache_dir=str(cache_dir),
                target_widths={m: len(n) for m, n in plan.target_names.items()},
                embedded={m: [e.get(s) for s in ids] for m, e in plan.embedded.items()},
                embedding_dims={m: s["dim"] for m, s in plan.summary.get("embeddings", {}).items()},
            )
        )
    n_shards = -(-len(stays) // shard_size)
    write_json(  # what finalize needs, so that it does not plan again (same for every job)
        cache_dir / PLAN_FILE,
        {
            "fingerprint": fp,
            "n_shards": n_shards,
            "num_variables": plan.num_variables if "ehr" in d.modalities else None,
            "summary": plan.summary,
        },
    )
    logger.info("preprocess: %d stays in %d shards (%d to do)", len(stays), n_shards, len(tasks))
    workers = max(1, min(d.workers, len(tasks), os.cpu_count() or 1))
    bar = tqdm(total=len(tasks), desc="preprocess shards", unit="shard", disable=quiet)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(write_shard, tasks):
                bar.update()
    else:
        for t in tasks:
            write_shard(t)
            bar.update()
    bar.close()

    if part is not None:
        logger.info("preprocess: shard job %d/%d done (%d shards)", part[0], part[1], len(tasks))
        return cache_dir
    return finalize_shards(cfg)


def finalize_shards(cfg: Config) -> Path:
    """Join the shards' manifests and skip logs, fit the EHR statistics, write the summary last.

    Raises:
        ValueError: No shard job has run with these settings, or some shard is not done (the
            message names them).
    """
    cache_dir = Path(cfg.data.cache_dir)
    fp = _fingerprint(cfg)
    plan_file = cache_dir / PLAN_FILE
    info = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if info.get("fingerprint") != fp:
        raise ValueError(
            f"preprocess --finalize: no shard job has run with these settings in {cache_dir}; "
            "run `clinical-moe preprocess --shard I/N` jobs first"
        )
    n_shards = int(info["n_shards"])
    missing = [k for k in range(n_shards) if not (shard_dir(cache_dir, k) / "DONE").exists()]
    if missing:
        names = ", ".join(f"{k:05d}" for k in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"preprocess --finalize: {len(missing)} of {n_shards} shards are not done ({names}); "
            "run (or rerun) the --shard jobs that own them"
        )
    metas, skips = [], []
    for k in range(n_shards):
        path = shard_dir(cache_dir, k)
        metas.append(pd.read_parquet(path / "meta.parquet"))
        skips += json.loads((path / "skips.json").read_text())
    for s in skips:
        logger.warning(
            "skipped %s file %s (stay %s): %s", s["modality"], s["path"], s["stay_id"], s["reason"]
        )
    summary = {
        **info["summary"],
        "fingerprint": fp,
        "fingerprint_inputs": fingerprint_inputs(cfg),
        "skipped_files": {
            "total": len(skips),
            "by_modality_reason": {
                f"{m}:{r}": c
                for (m, r), c in sorted(
                    Counter((s["modality"], s["reason"]) for s in skips).items()
                )
            },
            "files": skips[:1000],
        },
    }
    finalize_cache(
        cache_dir,
        metas,
        summary,
        num_variables=info["num_variables"],
    )
    return cache_dir


class StaleCacheError(ValueError):
    """The cache was built with other settings than the run's (the message names them)."""


#: What a build writes at the top of a cache directory (removed before a stale cache is rebuilt).
_CACHE_FILES = (
    "manifest.parquet",
    "summary.json",
    "fingerprint.json",
    "ehr_stats.json",
    "tokenizer.json",
    PLAN_FILE,
)


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
    why = stale_reason(cfg, cache_dir)
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
    why = stale_reason(cfg, cache_dir)
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
