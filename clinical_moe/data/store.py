"""The on-disk layout of the preprocessing cache, shared by the writer and the readers.

A cache directory holds::

    manifest.parquet         one row per stay: ids, split, labels, has_<modality>, shard, row
    summary.json             counts, exclusions, skipped files by reason (no patient text)
    ehr_stats.json           mean / std fitted on the train split: per variable, per static feature
    tokenizer.json           note vocabulary fitted on the train split
    shards/00000/            arrays of the stays of one shard (written atomically, then DONE)
        ehr_values.npy (sum L, V) float32   ehr_obs.npy (sum L, V) bool   ehr_times.npy (sum L,)
        ehr_offsets.npy (n + 1,) int64      ehr_static.npy (n, S) float32
        cxr_image.npy (n, N, H, W) uint8    ecg_signal.npy (n, N, 12, S) float16
        notes_ids.npy (n, N, L) int32       <m>_times.npy (n, N) float32   <m>_event_mask.npy (n, N) bool
        <m>_embedding.npy (n, N, F) float32 precomputed vectors, in place of the modality's
                                            decoded array when read from data.embeddings
        <m>_targets.npy (n, N, K_m) float32 modality-native targets of cxr / ecg events, NaN =
                                            unknown (names, kinds, stats in summary.json)
        <m>_ref.npy (n, N) str              cxr / ecg built by the two-stage pipeline (issue 13):
                                            keys of the decoded files in the decode store, in place
                                            of cxr_image / ecg_signal ("" = empty slot)
        meta.parquet  the shard's manifest rows       DONE  marker: the shard is complete
    decode_store.json        the decode-store folders the ``_ref`` arrays point into (relative to
                             the cache when possible; :mod:`clinical_moe.data.decode_store`)

Arrays are memory-mapped on read, so a dataset of any size opens instantly and reads lazily.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

EVENT_MODALITIES = ("cxr", "ecg", "notes")
EVENT_ARRAY = {"cxr": "cxr_image", "ecg": "ecg_signal", "notes": "notes_ids"}


def shard_dir(cache_dir: str | Path, shard: int) -> Path:
    return Path(cache_dir) / "shards" / f"{shard:05d}"


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_pointer(cache_dir: str | Path) -> dict[str, Path]:
    """``decode_store.json`` of a cache: modality -> store folder (relative path first)."""
    pointer = Path(cache_dir) / "decode_store.json"
    if not pointer.is_file():
        return {}
    out = {}
    for m, where in json.loads(pointer.read_text()).items():
        rel = Path(cache_dir) / where["relative"]
        out[m] = rel if rel.is_dir() else Path(where["absolute"])
    return out


class Shard:
    """Lazily memory-mapped arrays of one shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray | None:
        if name not in self._arrays:
            f = self.path / f"{name}.npy"
            if not f.exists():
                return None
            self._arrays[name] = np.load(f, mmap_mode="r")
        return self._arrays[name]


class CacheStore:
    """Read access to a finished cache directory.

    Args:
        cache_dir: A directory written by :func:`clinical_moe.data.cache.build_cache`.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        manifest = self.cache_dir / "manifest.parquet"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found: run `clinical-moe preprocess` (or build_cache) first"
            )
        self.manifest = pd.read_parquet(manifest)
        self._shards: dict[int, Shard] = {}

    @cached_property
    def summary(self) -> dict:
        return json.loads((self.cache_dir / "summary.json").read_text())

    @cached_property
    def ehr_stats(self) -> dict[str, np.ndarray]:
        path = self.cache_dir / "ehr_stats.json"
        if not path.exists():
            return {}
        raw = json.loads(path.read_text())
        return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}

    @property
    def ehr_scaling(self) -> int:
        """How the store scales EHR inputs: 2 = time series and continuous static features (age)
        standardised on the train split, 1 = time series only (caches before
        ``EHR_STATS_VERSION`` 2), 0 = none. A model expects the scaling it was trained with
        (``clinical_moe.runs.load_run`` checks)."""
        stats = self.ehr_stats
        return 2 if "static_mean" in stats else 1 if stats else 0

    @property
    def target_names(self) -> dict[str, list[str]]:
        """Modality -> names of its native per-event targets (``read(...)["targets"]`` columns).

        Empty for caches written before targets existed or without label files.
        """
        return {m: list(v) for m, v in self.summary.get("targets", {}).items()}

    @cached_property
    def decoded_dirs(self) -> dict[str, Path]:
        """Modality -> the decode-store folder its ``_ref`` arrays point into (may be empty)."""
        return read_pointer(self.cache_dir)

    def _decoded(self, modality: str, keys: np.ndarray) -> np.ndarray:
        """The decoded arrays of one stay's ``keys`` (N,) (zeros in empty slots)."""
        from clinical_moe.data.decode_store import load_entry

        folder = self.decoded_dirs.get(modality)
        if folder is None:
            raise FileNotFoundError(
                f"{self.cache_dir} refers to decoded {modality} files but has no decode_store.json"
            )
        arrays = [load_entry(folder, str(k)) if k else None for k in keys]
        shape = next((a.shape for a in arrays if a is not None), None)
        if shape is None:  # no event: the shape of an empty slot from the cache's settings
            inputs = self.summary.get("fingerprint_inputs") or {}
            shape = (
                (inputs.get("image_size", 64),) * 2
                if modality == "cxr"
                else (12, inputs.get("ecg_samples", 1250))
            )
        dtype = np.uint8 if modality == "cxr" else np.float16
        out = np.zeros((len(keys), *shape), dtype)
        for i, a in enumerate(arrays):
            if a is not None:
                out[i] = a
        return out

    @cached_property
    def embedded(self) -> frozenset[str]:
        """Modalities stored as precomputed embeddings (``read`` gives ``embedding`` (N, F))."""
        return frozenset(self.summary.get("embeddings", {}))

    @property
    def label_columns(self) -> list[str]:
        return list(self.summary.get("label_columns", ["label"]))

    def shard(self, k: int) -> Shard:
        if k not in self._shards:
            self._shards[k] = Shard(shard_dir(self.cache_dir, k))
        return self._shards[k]

    def __getstate__(self):
        # Memory maps are reopened lazily in DataLoader workers rather than pickled.
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def read(self, modality: str, shard: int, row: int) -> dict[str, np.ndarray]:
        """Raw (unpadded) arrays of one stay's modality, in the model's input schema.

        Event modalities give ``times`` (N,), ``event_mask`` (N,), their data and, where the cache
        holds native labels (cxr, ecg), ``targets`` float32 (N, K_m) with NaN where unknown.
        """
        s = self.shard(shard)
        if modality == "ehr":
            off = s.array("ehr_offsets")
            a, b = int(off[row]), int(off[row + 1])
            values = np.array(s.array("ehr_values")[a:b], dtype=np.float32)
            obs = np.array(s.array("ehr_obs")[a:b], dtype=bool)
            static = np.array(s.array("ehr_static")[row], dtype=np.float32)
            stats = self.ehr_stats
            if stats:
                values = (values - stats["mean"]) / stats["std"]
                values[~obs] = 0.0
            if "static_mean" in stats:  # (caches since EHR_STATS_VERSION 2)
                static = (static - stats["static_mean"]) / stats["static_std"]
            return {
                "values": values,
                "obs_mask": obs,
                "times": np.array(s.array("ehr_times")[a:b], dtype=np.float32),
                "static": static,
            }
        out = {
            "times": np.array(s.array(f"{modality}_times")[row], dtype=np.float32),
            "event_mask": np.array(s.array(f"{modality}_event_mask")[row], dtype=bool),
        }
        targets = s.array(f"{modality}_targets")
        if targets is not None:
            out["targets"] = np.array(targets[row], dtype=np.float32)  # (N, K_m), NaN = unknown
        if modality in self.embedded:
            out["embedding"] = np.array(s.array(f"{modality}_embedding")[row], np.float32)
            return out  # (N, F)
        refs = s.array(f"{modality}_ref") if modality in ("cxr", "ecg") else None
        if refs is not None:  # two-stage cache: read the decoded files from the store
            data = self._decoded(modality, np.asarray(refs[row]))
        else:
            data = np.asarray(s.array(EVENT_ARRAY[modality])[row])
        if modality == "cxr":
            out["image"] = (data.astype(np.float32) / 255.0)[:, None]  # (N, 1, H, W)
        elif modality == "ecg":
            out["signal"] = data.astype(np.float32)  # (N, 12, S)
        else:
            out["input_ids"] = data.astype(np.int64)  # (N, L)
            out["attention_mask"] = data != 0
        return out
