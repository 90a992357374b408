"""Writing shards in the cache layout of :mod:`clinical_moe.data.store`.

The preprocessing pipeline and the test helpers both write through :class:`ShardWriter`, so there
is one definition of the on-disk format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data.store import EVENT_ARRAY, save_array, shard_dir


class ShardWriter:
    """Accumulate the stays of one shard, then write them atomically.

    Args:
        cache_dir: The cache directory.
        shard: Shard index.
        modalities: Modalities stored in the cache.
        num_events: Event slots per stay for event modalities (N).
        event_shapes: Per event modality, the shape of one event's array (e.g. cxr (H, W)).
        num_variables: EHR variables V.
        num_static: EHR static features S.
        target_widths: Per event modality with native targets, their number K_m; those
            modalities get a ``<m>_targets.npy`` ``(n, N, K_m)`` float32 array, NaN where unknown
            (padded slots included).
        embedding_dims: Per event modality read from precomputed embeddings, their size F:
            those modalities store ``<m>_embedding.npy`` ``(n, N, F)`` float32 instead of their
            decoded files.
        ref_modalities: Event modalities stored as references into the decode store
            (``<m>_ref.npy`` ``(n, N)`` of store keys, ``""`` for an empty slot) instead of their
            decoded arrays; their events are ``(keys (n,), times (n,)[, targets])``.
    """

    DTYPES = {"cxr": np.uint8, "ecg": np.float16, "notes": np.int32}
    REF_WIDTH = 128  # characters of a store key (``<id>~<bytes>~<mtime ns>``)

    def __init__(
        self,
        cache_dir: str | Path,
        shard: int,
        modalities: Sequence[str],
        num_events: int,
        event_shapes: dict[str, tuple[int, ...]],
        num_variables: int,
        num_static: int,
        target_widths: dict[str, int] | None = None,
        embedding_dims: dict[str, int] | None = None,
        ref_modalities: Sequence[str] = (),
    ):
        self.path = shard_dir(cache_dir, shard)
        self.shard = shard
        self.modalities = tuple(modalities)
        self.N = num_events
        self.embedding_dims = dict(embedding_dims or {})
        self.refs = frozenset(ref_modalities)
        self.event_shapes = {
            **event_shapes,
            **{m: (f,) for m, f in self.embedding_dims.items()},
            **{m: () for m in self.refs},
        }
        self.V, self.S = num_variables, num_static
        self.rows: list[dict] = []
        self.ehr: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.static: list[np.ndarray] = []
        self.events: dict[str, list[np.ndarray]] = {m: [] for m in modalities if m != "ehr"}
        self.times: dict[str, list[np.ndarray]] = {m: [] for m in modalities if m != "ehr"}
        self.masks: dict[str, list[np.ndarray]] = {m: [] for m in modalities if m != "ehr"}
        self.target_widths = {m: k for m, k in (target_widths or {}).items() if m in self.events}
        self.targets: dict[str, list[np.ndarray]] = {m: [] for m in self.target_widths}

    def _dtype(self, m: str):
        if m in self.refs:
            return np.dtype(f"<U{self.REF_WIDTH}")
        return np.float32 if m in self.embedding_dims else self.DTYPES[m]

    def _array_name(self, m: str) -> str:
        if m in self.refs:
            return f"{m}_ref"
        return f"{m}_embedding" if m in self.embedding_dims else EVENT_ARRAY[m]

    def add(self, meta: dict, ehr: dict | None = None, events: dict | None = None) -> None:
        """Add one stay.

        Args:
            meta: Manifest fields (stay_id, subject_id, split, labels, ...).
            ehr: ``{"values" (L, V), "obs_mask" (L, V), "times" (L,), "static" (S,)}`` or None.
            events: ``{modality: (arrays (n, *shape), times (n,)[, targets (n, K)])}`` or missing
                keys. More than N events keep the last N.
        """
        events = events or {}
        row = dict(meta)
        if "ehr" in self.modalities:
            has = ehr is not None and len(ehr["times"]) > 0
            row["has_ehr"] = has
            if has:
                self.ehr.append(
                    (
                        ehr["values"].astype(np.float32),
                        ehr["obs_mask"].astype(bool),
                        ehr["times"].astype(np.float32),
                    )
                )
            else:
                self.ehr.append(
                    (
                        np.zeros((0, self.V), np.float32),
                        np.zeros((0, self.V), bool),
                        np.zeros(0, np.float32),
                    )
                )
            static = ehr["static"] if ehr is not None else meta.get("_static")
            self.static.append(
                np.zeros(self.S, np.float32) if static is None else np.asarray(static, np.float32)
            )
        row.pop("_static", None)
        for m in self.events:
            shape = self.event_shapes[m]
            arr = np.zeros((self.N, *shape), self._dtype(m))
            t = np.zeros(self.N, np.float32)
            mask = np.zeros(self.N, bool)
            target = None
            if m in self.target_widths:
                target = np.full((self.N, self.target_widths[m]), np.nan, np.float32)  # (N, K)
            if m in events and events[m] is not None and len(events[m][0]):
                data, times = events[m][:2]
                n = min(len(data), self.N)
                arr[:n], t[:n], mask[:n] = data[-n:], times[-n:], True
                if target is not None and len(events[m]) > 2 and events[m][2] is not None:
                    target[:n] = events[m][2][-n:]
            if target is not None:
                self.targets[m].append(target)
            row[f"has_{m}"] = bool(mask.any())
            self.events[m].append(arr)
            self.times[m].append(t)
            self.masks[m].append(mask)
        row["shard"], row["row"] = self.shard, len(self.rows)
        self.rows.append(row)

    def close(self, skips: list[dict] | None = None) -> pd.DataFrame:
        """Write every array and the skip log, then the ``DONE`` marker; returns the manifest rows.

        Args:
            skips: Files skipped while decoding this shard (``modality, stay_id, path, reason``).
        """
        from clinical_moe.data.store import write_json

        self.path.mkdir(parents=True, exist_ok=True)
        n = len(self.rows)
        if "ehr" in self.modalities:
            lengths = np.array([len(t) for _, _, t in self.ehr], np.int64)
            save_array(self.path / "ehr_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
            save_array(
                self.path / "ehr_values.npy",
                np.concatenate([v for v, _, _ in self.ehr])
                if n
                else np.zeros((0, self.V), np.float32),
            )
            save_array(
                self.path / "ehr_obs.npy",
                np.concatenate([o for _, o, _ in self.ehr]) if n else np.zeros((0, self.V), bool),
            )
            save_array(
                self.path / "ehr_times.npy",
                np.concatenate([t for _, _, t in self.ehr]) if n else np.zeros(0, np.float32),
            )
            save_array(
                self.path / "ehr_static.npy",
                np.stack(self.static) if n else np.zeros((0, self.S), np.float32),
            )
        for m in self.events:
            shape = (0, self.N, *self.event_shapes[m])
            name = self._array_name(m)
            save_array(
                self.path / f"{name}.npy",
                np.stack(self.events[m]) if n else np.zeros(shape, self._dtype(m)),
            )
            save_array(
                self.path / f"{m}_times.npy",
                np.stack(self.times[m]) if n else np.zeros((0, self.N), np.float32),
            )
            save_array(
                self.path / f"{m}_event_mask.npy",
                np.stack(self.masks[m]) if n else np.zeros((0, self.N), bool),
            )
        for m, k in self.target_widths.items():
            save_array(
                self.path / f"{m}_targets.npy",
                np.stack(self.targets[m]) if n else np.zeros((0, self.N, k), np.float32),
            )
        meta = pd.DataFrame(self.rows)
        meta.to_parquet(self.path / "meta.parquet", index=False)
        write_json(self.path / "skips.json", skips or [])
        (self.path / "DONE").write_text(str(n))
        return meta


#: Bumped when what ``ehr_stats.json`` holds changes (2: continuous static features standardised);
#: part of the cache fingerprint, so an older cache is rebuilt by ``train``, refused by ``evaluate``.
EHR_STATS_VERSION = 2


def ehr_train_stats(cache_dir: str | Path, manifest: pd.DataFrame, num_variables: int) -> dict:
    """Mean / std fitted on the train split (streamed by shard), for the store to standardise with.

    ``mean`` / ``std``: per time-series variable, over its observed values. ``static_mean`` /
    ``static_std``: per static feature, over the train stays with EHR, for the continuous ones
    (age); a 0/1 indicator (sex, admission type) keeps mean 0 and std 1, i.e. stays 0/1, so a
    rare category is not blown up to several units. Age is standardised because it is stored in
    centuries (mean 0.64, sd 0.16): left so, a head learned almost none of its effect on the
    outcome (issue 12; the heads' EHR attributions had no slope in age where the synthetic truth
    has 0.3 per 15 years).
    """
    total = np.zeros(num_variables)
    sq = np.zeros(num_variables)
    count = np.zeros(num_variables)
    statics = []
    train = manifest[(manifest["split"] == "train") & manifest.get("has_ehr", False)]
    for shard, rows in train.groupby("shard"):
        path = shard_dir(cache_dir, int(shard))
        off = np.load(path / "ehr_offsets.npy")
        values = np.load(path / "ehr_values.npy", mmap_mode="r")
        obs = np.load(path / "ehr_obs.npy", mmap_mode="r")
        sel = np.concatenate(
            [np.arange(off[r], off[r + 1]) for r in rows["row"]] or [np.zeros(0, int)]
        )
        v = np.asarray(values[sel], np.float64)
        o = np.asarray(obs[sel], bool)
        total += np.where(o, v, 0).sum(0)
        sq += np.where(o, v * v, 0).sum(0)
        count += o.sum(0)
        static = path / "ehr_static.npy"
        if static.is_file():
            statics.append(np.load(static)[rows["row"].to_numpy()].astype(np.float64))  # (n, S)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    var = np.divide(sq, count, out=np.ones_like(sq), where=count > 0) - mean**2
    std = np.sqrt(np.clip(var, 1e-6, None))
    std[count == 0] = 1.0
    out = {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist()}
    if statics and sum(len(a) for a in statics):
        s = np.concatenate(statics)  # (N_train, S)
        s_mean, s_std = s.mean(0), s.std(0)
        keep = np.isin(s, (0.0, 1.0)).all(0) | (s_std < 1e-6)  # indicators and constants as is
        s_mean[keep], s_std[keep] = 0.0, 1.0
        out["static_mean"] = s_mean.astype(np.float32).tolist()
        out["static_std"] = s_std.astype(np.float32).tolist()
    return out


def finalize_cache(
    cache_dir: str | Path,
    shard_meta: Sequence[pd.DataFrame],
    summary: dict,
    num_variables: int | None = None,
) -> pd.DataFrame:
    """Join the shards' manifests, fit EHR statistics on train, write manifest and summary."""
    from clinical_moe.data.store import write_json

    cache_dir = Path(cache_dir)
    manifest = pd.concat(list(shard_meta), ignore_index=True) if shard_meta else pd.DataFrame()
    if num_variables and "has_ehr" in manifest:
        write_json(
            cache_dir / "ehr_stats.json", ehr_train_stats(cache_dir, manifest, num_variables)
        )
    mods = [c[4:] for c in manifest.columns if c.startswith("has_")]
    summary = {
        **summary,
        "num_stays": len(manifest),
        "split_counts": manifest["split"].value_counts().to_dict() if len(manifest) else {},
        "present_counts": {m: int(manifest[f"has_{m}"].sum()) for m in mods},
    }
    tmp = cache_dir / "manifest.parquet.tmp"
    manifest.to_parquet(tmp, index=False)
    tmp.replace(cache_dir / "manifest.parquet")
    write_json(cache_dir / "summary.json", summary)
    return manifest
