"""Stage 2 of preprocessing: one task's cache, assembled from the plan and the decode store.

Nothing is decoded here. Each stay's images and ECGs become references (``<m>_ref.npy``, the
store keys of its events) into the decode store of :mod:`clinical_moe.data.decode_store`; EHR
arrays, note token ids, native targets, times and masks are written as before
(:mod:`clinical_moe.data.store`). A file the store recorded as unreadable is dropped from its
stay (with its target row) and counted by reason in ``summary.json``, exactly as when it was
decoded in place. The cache's only pointer to the store is ``decode_store.json``, so that a cache
assembled against one store is byte for byte the cache a from-scratch build writes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.config import Config
from clinical_moe.data.cache_writer import ShardWriter, finalize_cache
from clinical_moe.data.decode_store import (
    DECODED_MODALITIES,
    decode_settings,
    entry_state,
    file_key,
    settings_dir,
    store_root,
)
from clinical_moe.data.fingerprint import cache_fingerprint, fingerprint_inputs
from clinical_moe.data.store import shard_dir, write_json

logger = logging.getLogger(__name__)

#: The cache's pointer to the decode store it refers to (the one file that names a location).
STORE_POINTER = "decode_store.json"


def event_refs(plan, cfg: Config) -> dict[str, dict]:
    """Per decoded modality: its store folder and, per stay, ``[(path, key, hours), ...]``.

    Returns:
        ``{modality: {"dir": Path, "settings": dict, "stays": {stay_id: [(path, key, hours)]}}}``
        for the modalities of ``plan`` whose files are decoded (cxr, ecg; not embedded ones).
    """
    root = store_root(cfg.data)
    out = {}
    for m in DECODED_MODALITIES:
        per_stay = getattr(plan, m)
        if m not in cfg.data.modalities or not per_stay:
            continue
        settings = decode_settings(m, cfg.data)
        stays = {
            sid: [(path, file_key(m, path), hours) for path, hours in items]
            for sid, items in per_stay.items()
        }
        out[m] = {"dir": settings_dir(root, settings), "settings": settings, "stays": stays}
    return out


def unique_files(refs: dict[str, dict]) -> dict[str, list[tuple[str, str]]]:
    """Per modality, the distinct ``(path, key)`` pairs, sorted by key (a deterministic order)."""
    out = {}
    for m, r in refs.items():
        seen = {key: path for items in r["stays"].values() for path, key, _ in items}
        out[m] = sorted(((p, k) for k, p in seen.items()), key=lambda pk: pk[1])
    return out


def missing_entries(
    refs: dict[str, dict], files: dict[str, list[tuple[str, str]]] | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Per modality, the files (default all of ``refs``) the store has no entry for yet."""
    files = unique_files(refs) if files is None else files
    return {
        m: [(p, k) for p, k in fs if entry_state(refs[m]["dir"], k) is None]
        for m, fs in files.items()
    }


def _stay_events(refs_m: dict, sid: int, targets: np.ndarray | None, skips: list, modality: str):
    """``(keys (n,), hours (n,), targets (n, K) | None)`` of the events that decoded, or None."""
    items = refs_m["stays"].get(sid)
    if not items:
        return None
    keys, hours, kept = [], [], []
    for i, (path, key, h) in enumerate(items):
        state = entry_state(refs_m["dir"], key)
        if state is None:
            raise RuntimeError(f"preprocess: {modality} file {path} is not in the decode store")
        if state != "decoded":
            skips.append(
                {
                    "modality": modality,
                    "stay_id": sid,
                    "path": state["path"],
                    "reason": state["reason"],
                }
            )
            continue
        keys.append(key)
        hours.append(h)
        kept.append(i)
    if not keys:
        return None
    keys_arr = np.asarray(keys, dtype=f"<U{ShardWriter.REF_WIDTH}")
    hours_arr = np.asarray(hours, np.float32)
    return keys_arr, hours_arr, None if targets is None else targets[np.asarray(kept)]


def assemble(cfg: Config, plan, refs: dict[str, dict], shard_size: int = 256) -> Path:
    """Write every shard of ``plan``, then the manifest and summary (the summary last).

    Args:
        cfg: The run config.
        plan: The :class:`~clinical_moe.data.plan.StayPlan` of ``cfg``.
        refs: :func:`event_refs` of the plan; every file must be in the store.
        shard_size: Stays per shard.

    Returns:
        The cache directory.
    """
    d = cfg.data
    cache_dir = Path(d.cache_dir)
    shutil.rmtree(cache_dir / "shards", ignore_errors=True)  # a rebuild starts from nothing
    shapes = {
        "cxr": (d.image_size, d.image_size),
        "ecg": (12, d.ecg_samples),
        "notes": (d.note_max_len,),
    }
    target_widths = {m: len(n) for m, n in plan.target_names.items()}
    embedding_dims = {m: s["dim"] for m, s in plan.summary.get("embeddings", {}).items()}
    stays = plan.stays
    metas, skips = [], []
    for k, start in enumerate(range(0, len(stays), shard_size)):
        rows = stays.iloc[start : start + shard_size]
        writer = ShardWriter(
            cache_dir,
            k,
            tuple(d.modalities),
            d.max_events,
            shapes,
            plan.num_variables,
            plan.num_static,
            target_widths=target_widths,
            embedding_dims=embedding_dims,
            ref_modalities=tuple(refs),
        )
        shard_skips: list[dict] = []
        for meta in plan.meta(rows):
            sid = meta["stay_id"]
            events = {}
            for m, r in refs.items():
                events[m] = _stay_events(r, sid, plan.targets.get(m, {}).get(sid), shard_skips, m)
            if "notes" in d.modalities and plan.notes.get(sid) is not None:
                events["notes"] = plan.notes[sid]
            for m, per_stay in plan.embedded.items():  # precomputed vectors: nothing to decode
                events[m] = per_stay.get(sid)
            ehr = plan.ehr.get(sid) if "ehr" in d.modalities else None
            writer.add(meta, ehr=ehr, events=events)
        metas.append(writer.close(shard_skips))
        skips += shard_skips
    _write_pointer(cache_dir, refs)
    _finish(cfg, plan, metas, skips)
    return cache_dir


def _write_pointer(cache_dir: Path, refs: dict[str, dict]) -> None:
    """``decode_store.json``: each referenced store folder, relative to the cache and absolute.

    The relative path is tried first (a cache moved together with its store still finds it),
    then the absolute one (a cache copied elsewhere on the same file system).
    """
    pointer = {}
    for m, r in refs.items():
        path = Path(r["dir"]).resolve()
        try:
            rel = os.path.relpath(path, cache_dir.resolve())
        except ValueError:  # another drive (Windows)
            rel = str(path)
        pointer[m] = {"relative": rel, "absolute": str(path)}
    write_json(cache_dir / STORE_POINTER, pointer)


def _finish(cfg: Config, plan, metas: list[pd.DataFrame], skips: list[dict]) -> None:
    for s in skips:
        logger.warning(
            "skipped %s file %s (stay %s): %s", s["modality"], s["path"], s["stay_id"], s["reason"]
        )
    summary = {
        **plan.summary,
        "fingerprint": cache_fingerprint(cfg),
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
    num_variables = plan.num_variables if "ehr" in cfg.data.modalities else None
    finalize_cache(cfg.data.cache_dir, metas, summary, num_variables=num_variables)


def store_dirs(cache_dir: str | Path) -> dict[str, Path]:
    """The decode-store folders a cache refers to (empty for a self-contained cache)."""
    from clinical_moe.data.store import read_pointer

    return read_pointer(cache_dir)


def shards_done(cache_dir: Path) -> bool:
    """Every shard named in the manifest still carries its ``DONE`` marker."""
    manifest = pd.read_parquet(cache_dir / "manifest.parquet", columns=["shard"])
    return all((shard_dir(cache_dir, int(k)) / "DONE").exists() for k in manifest["shard"].unique())
