"""A torch ``Dataset`` over the preprocessing cache, the collate function that makes a
:class:`~clinical_moe.types.Batch`, and the samplers (including Flex-MoE's warm-up ordering).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from clinical_moe.data.store import CacheStore
from clinical_moe.types import Batch

Sample = dict  # {"id": int, "label": np.ndarray, "present": {m: bool}, m: {key: array} | None}


def present_modalities(cache_dir: str | Path, modalities: Sequence[str]) -> list[str]:
    """``modalities`` less those no stay of the cache has, each dropped with a warning naming it.

    An absent release (e.g. only ``mimic-iv/`` under ``data.root``) makes its modality missing
    for every stay; the model is then built without it rather than failing on its unknown shapes.

    Raises:
        ValueError: No stay of the cache has any of ``modalities``.
    """
    store = CacheStore(cache_dir)
    manifest = store.manifest
    kept, dropped = [], []
    for m in modalities:
        col = f"has_{m}"
        if col in manifest and not manifest[col].astype(bool).any():
            dropped.append(m)
        else:
            kept.append(m)  # present, or not in the cache at all (CachedDataset names it)
    why = store.summary.get("empty_modalities", {}) if dropped else {}
    for m in dropped:
        reason = f" ({why[m]})" if m in why else ""
        warnings.warn(
            f"no stay in the cache {cache_dir} has modality {m!r}{reason}: "
            f"it is dropped from the model",
            stacklevel=2,
        )
    if not kept:
        raise ValueError(
            f"no stay in the cache {cache_dir} has any of the modalities {list(modalities)}; "
            "check data.root and the preprocessing summary"
        )
    return kept


class CachedDataset(Dataset):
    """Stays of one split, read lazily from a cache directory.

    Args:
        cache_dir: A finished cache (see :mod:`clinical_moe.data.store`).
        split: "train", "val", "test" or None for every stay.
        modalities: Which modalities to read, in model order (default: all in the cache).
        label_columns: Label columns (default: the cache's; one column -> binary/multiclass
            ``[B]``, several -> multilabel ``[B, C]``).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str | None = None,
        modalities: Sequence[str] | None = None,
        label_columns: Sequence[str] | None = None,
    ) -> None:
        self.store = CacheStore(cache_dir)
        manifest = self.store.manifest
        if split is not None:
            if split not in set(manifest["split"]):
                raise ValueError(f"split {split!r} has no stays in {cache_dir}")
            manifest = manifest[manifest["split"] == split]
        self.rows = manifest.reset_index(drop=True)
        cached = tuple(self.store.summary.get("modalities", ()))
        self.modalities = tuple(modalities or cached)
        missing = [m for m in self.modalities if m not in cached]
        if missing:
            raise ValueError(
                f"modalities {missing} are not in the cache {cache_dir} (has {cached})"
            )
        self.label_columns = list(label_columns or self.store.label_columns)
        self._present = self.rows[[f"has_{m}" for m in self.modalities]].to_numpy(bool)
        self._labels = self.rows[self.label_columns].to_numpy(np.float32)
        self._shard = self.rows["shard"].to_numpy(np.int64)
        self._row = self.rows["row"].to_numpy(np.int64)
        self._ids = self.rows["stay_id"].to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def present(self) -> np.ndarray:
        """``bool[N, M]``: natural missingness of every stay."""
        return self._present

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, i: int) -> Sample:
        sample: Sample = {"id": int(self._ids[i]), "label": self._labels[i], "present": {}}
        for m, name in enumerate(self.modalities):
            has = bool(self._present[i, m])
            sample["present"][name] = has
            sample[name] = (
                self.store.read(name, int(self._shard[i]), int(self._row[i])) if has else None
            )
        return sample


def _pad_to(arr: np.ndarray, length: int, axis: int = 0) -> np.ndarray:
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (0, length - arr.shape[axis])
    return np.pad(arr, pad)


def _template(samples: list[Sample], name: str) -> dict[str, np.ndarray] | None:
    return next((s[name] for s in samples if s[name] is not None), None)


def collate(
    samples: list[Sample],
    modalities: Sequence[str],
    templates: dict[str, dict[str, np.ndarray]] | None = None,
) -> Batch:
    """Pad a list of samples into a :class:`Batch`; absent modalities become zero rows.

    EHR time points are padded to the longest stay in the batch (``time_mask`` marks real ones);
    event modalities already have a fixed number of event slots (``event_mask``). Native targets
    (``inputs["cxr"]["targets"]`` float ``(B, N, K)``) are NaN for absent stays and padded slots.

    Args:
        samples: Items of :class:`CachedDataset`.
        modalities: Modality order of the batch.
        templates: Per-modality example arrays giving shapes when no sample of the batch has
            that modality (:class:`Collator` provides them).
    """
    B = len(samples)
    inputs: dict[str, dict[str, torch.Tensor]] = {}
    for name in modalities:
        tmpl = _template(samples, name) or (templates or {}).get(name)
        if tmpl is None:
            raise ValueError(
                f"no sample in this batch has modality {name!r}, so its input shapes are unknown; "
                "use Collator(dataset), which knows them"
            )
        if name == "ehr":
            L = max([s[name]["times"].shape[0] for s in samples if s[name] is not None] or [1])
            L = max(L, 1)
            V, S = tmpl["values"].shape[1], tmpl["static"].shape[0]
            values = np.zeros((B, L, V), np.float32)
            obs = np.zeros((B, L, V), bool)
            times = np.zeros((B, L), np.float32)
            tmask = np.zeros((B, L), bool)
            static = np.zeros((B, S), np.float32)
            for b, s in enumerate(samples):
                d = s[name]
                if d is None:
                    continue
                n = d["times"].shape[0]
                values[b, :n], obs[b, :n], times[b, :n] = d["values"], d["obs_mask"], d["times"]
                tmask[b, :n] = True
                static[b] = d["static"]
            arrays = {
                "values": values,
                "obs_mask": obs,
                "times": times,
                "time_mask": tmask,
                "static": static,
            }
        else:
            arrays = {}
            for key, ref in tmpl.items():
                # native targets: NaN (unknown) for absent stays, like their padded slots
                fill = np.nan if key == "targets" else 0
                out = np.full((B, *ref.shape), fill, ref.dtype)
                for b, s in enumerate(samples):
                    if s[name] is not None:
                        out[b] = s[name][key]
                arrays[key] = out
        inputs[name] = {k: torch.from_numpy(v) for k, v in arrays.items()}
    present = torch.tensor(
        [[s["present"][m] for m in modalities] for s in samples], dtype=torch.bool
    )
    labels = torch.from_numpy(np.stack([s["label"] for s in samples]).astype(np.float32))
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # (B,)
    return Batch(
        inputs, present, labels, ids=[s["id"] for s in samples], modalities=tuple(modalities)
    )


class Collator:
    """Picklable collate callable bound to a dataset (knows every modality's shapes).

    Args:
        dataset: The dataset whose samples are collated; used once to learn the shapes of each
            modality so batches where nobody has a modality still get correctly shaped zeros.
    """

    def __init__(self, dataset: CachedDataset) -> None:
        self.modalities = dataset.modalities
        self.templates: dict[str, dict[str, np.ndarray]] = {}
        manifest = dataset.store.manifest
        for m, name in enumerate(self.modalities):
            idx = np.flatnonzero(dataset.present[:, m])
            if len(idx):
                example = dataset[int(idx[0])][name]
            else:  # nobody in this split has it (small cohorts): any stay of the cache gives shapes
                others = manifest[manifest[f"has_{name}"].astype(bool)]
                if not len(others):
                    raise ValueError(
                        f"no stay in the cache {dataset.store.cache_dir} has modality {name!r}; "
                        "remove it from data.modalities or check the preprocessing summary"
                    )
                row = others.iloc[0]
                example = dataset.store.read(name, int(row["shard"]), int(row["row"]))
            self.templates[name] = {k: np.zeros_like(v) for k, v in example.items()}

    def __call__(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.modalities, self.templates)


class ModalityCountSampler(Sampler[int]):
    """Flex-MoE's training order: samples with more observed modalities first during warm-up.

    For the first ``warmup_epochs`` epochs, indices are sorted by the number of observed
    modalities (most first; ties broken by a seeded shuffle); afterwards it shuffles. Works for any
    head. With ``num_replicas > 1`` (DDP) each rank takes an interleaved slice of the same order.

    Args:
        present: ``bool[N, M]`` natural missingness of the dataset.
        warmup_epochs: Epochs that use the ordered pass (paper: 5 of 50).
        seed: Seed of the shuffles (combined with the epoch).
        num_replicas: Number of DDP processes.
        rank: This process's rank.
    """

    def __init__(
        self,
        present: np.ndarray,
        warmup_epochs: int = 5,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.counts = np.asarray(present).sum(1)
        self.warmup_epochs = warmup_epochs
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.counts))
        if self.epoch < self.warmup_epochs:
            perm = perm[np.argsort(-self.counts[perm], kind="stable")]
        n = len(perm) - len(perm) % self.num_replicas if self.num_replicas > 1 else len(perm)
        return perm[:n][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(self.order())
