"""What the missingness simulators may condition on, read once from the test split of a cache.

The masks of an evaluation grid depend on the data only (stay ids, natural presence, labels,
observed covariates and content summaries), never on a model, so that every run of a comparison is
scored on identical masks. This module collects those inputs, fingerprints the test split (runs
trained on different caches cannot be compared), and finds the synthetic corpus's ground truth
(the oracle risk) when there is one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from clinical_moe.data.dataset import CachedDataset, Collator

log = logging.getLogger(__name__)

#: Observed covariates a MAR mechanism can use (see :func:`content_summary` for how they are made).
COVARIATES = ("severity", "age")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Per-row mean of ``x`` over ``mask`` (both ``[B, ...]``, same shape); NaN for empty rows."""
    x = x.reshape(len(x), -1).double()
    mask = mask.reshape(len(mask), -1).double()
    n = mask.sum(1)
    out = (x * mask).sum(1) / n.clamp(min=1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan"))).numpy()


def content_summary(name: str, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """A scalar per row summarising one modality's own content (for MNAR by content).

    - ``ehr``: mean absolute standardised value of the observed measurements (a severity proxy:
      values are z-scored with train statistics, so abnormal physiology scores high);
    - ``cxr``: mean pixel intensity of the kept images (dense, opaque films are brighter);
    - ``ecg``: mean absolute amplitude (mV) of the kept tracings;
    - ``notes``: number of real (non-padding) tokens, i.e. note length;
    - any other modality: mean absolute feature value over real positions.

    Returns:
        ``float64[B]``; NaN where the modality has nothing to summarise.
    """
    if name == "ehr":
        return _masked_mean(inputs["values"].abs(), inputs["obs_mask"])
    if "event_mask" in inputs:
        ev = inputs["event_mask"]  # (B, N)
        if "image" in inputs:  # (B, N, 1, H, W)
            per_event = inputs["image"].flatten(2).double().mean(2)
        elif "signal" in inputs:  # (B, N, 12, S)
            per_event = inputs["signal"].flatten(2).abs().double().mean(2)
        elif "attention_mask" in inputs:  # (B, N, L)
            per_event = inputs["attention_mask"].double().sum(2)
        elif "embedding" in inputs:  # (B, N, F)
            per_event = inputs["embedding"].abs().double().mean(2)
        else:
            return np.full(len(ev), np.nan)
        return _masked_mean(per_event, ev)
    if "x" in inputs and "mask" in inputs:
        x = inputs["x"].abs()  # (B, L, F)
        return _masked_mean(x.mean(2), inputs["mask"])
    return np.full(len(next(iter(inputs.values()))), np.nan)


@dataclass
class EvalContext:
    """The test split as the simulators see it (rows in dataset order).

    Attributes:
        ids: ``int64[N]`` stay ids.
        present: ``bool[N, M]`` natural presence.
        labels: ``[N]`` or ``[N, C]`` labels.
        modalities: Column names of ``present``.
        covariates: Observed per-stay covariates (``"severity"``, ``"age"``), NaN when unknown.
        content: ``float64[N, M]`` content summary per modality (NaN where absent).
        split_hash: Fingerprint of the test split (see :func:`split_hash`).
    """

    ids: np.ndarray
    present: np.ndarray
    labels: np.ndarray
    modalities: tuple[str, ...]
    covariates: dict[str, np.ndarray] = field(default_factory=dict)
    content: np.ndarray | None = None
    split_hash: str = ""

    def simulator_context(self, mar_covariate: str = "severity", strength: float = 1.0) -> dict:
        """Keyword context for :func:`clinical_moe.missingness.simulate`."""
        if mar_covariate not in self.covariates:
            raise ValueError(f"unknown MAR covariate {mar_covariate!r}; use one of {COVARIATES}")
        cov = self.covariates[mar_covariate]
        if not np.isfinite(cov).any():
            log.warning(
                "MAR covariate %r is unknown for every stay: MAR reduces to MCAR", mar_covariate
            )
        return {
            "ids": self.ids,
            "covariate": cov,
            "labels": self.labels,
            "content": self.content,
            "strength": strength,
            "modalities": self.modalities,
        }


def split_hash(dataset: CachedDataset) -> str:
    """SHA-256 of the split's manifest rows (ids, split, labels, presence, storage position).

    Why: two runs can only be compared on identical masks when they score the same stays with the
    same labels and the same natural missingness; a hash of these rows tells that for certain.
    """
    rows = dataset.rows
    cols = sorted(
        c
        for c in rows.columns
        if c in ("stay_id", "subject_id", "split")
        or c.startswith("has_")
        or c in dataset.label_columns
    )
    frame = rows[cols].sort_values("stay_id", kind="stable").reset_index(drop=True)
    digest = hashlib.sha256(",".join(cols).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def build_context(dataset: CachedDataset, batch_size: int = 128) -> EvalContext:
    """Read covariates and content summaries of every stay of ``dataset`` (one pass, no model)."""
    mods = tuple(dataset.modalities)
    n = len(dataset)
    content = np.full((n, len(mods)), np.nan)
    severity, age = np.full(n, np.nan), np.full(n, np.nan)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collator(dataset))
    start = 0
    for batch in loader:
        rows = slice(start, start + len(batch))
        for m, name in enumerate(mods):
            summary = content_summary(name, batch.inputs[name])
            content[rows, m] = np.where(batch.present[:, m].numpy(), summary, np.nan)
        if "ehr" in mods:
            has = batch.present_of("ehr").numpy()
            severity[rows] = np.where(has, content[rows, mods.index("ehr")], np.nan)
            static = batch.inputs["ehr"]["static"][:, 0].double().numpy()  # age, standardised
            age[rows] = np.where(has, static, np.nan)  # (MAR standardises its covariate anyway)
        start += len(batch)
    labels = dataset.labels
    labels = labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels
    return EvalContext(
        ids=np.asarray(dataset.rows["stay_id"], dtype=np.int64),
        present=dataset.present.copy(),
        labels=labels,
        modalities=mods,
        covariates={"severity": severity, "age": age},
        content=content,
        split_hash=split_hash(dataset),
    )


def load_truth(dataset: CachedDataset) -> tuple[pd.DataFrame | None, str]:
    """The true risk of each stay, when the cache was built from a synthetic corpus.

    Looks for ``<data_root>/truth/stays.csv.gz`` (``data_root`` from the cache's summary.json),
    then for a ``true_risk`` column in the manifest (toy caches). The true risk is the probability
    of in-hospital death, so it is only a ceiling for a mortality task.

    Returns:
        (``DataFrame[stay_id, true_risk]`` or None, a short note saying where it came from or
        why there is none).
    """
    summary = dataset.store.summary
    task = summary.get("task")
    root = summary.get("data_root")
    truth = Path(root) / "truth" / "stays.csv.gz" if root else None
    if truth is not None and truth.is_file():
        if task not in (None, "ihm48"):
            return None, f"no oracle: the truth's risk is of mortality, the task is {task}"
        df = pd.read_csv(truth, usecols=["stay_id", "true_risk"])
        return df.astype({"stay_id": "int64"}), f"oracle from {truth}"
    if "true_risk" in dataset.rows.columns:
        return dataset.rows[["stay_id", "true_risk"]].copy(), "oracle from the manifest's true_risk"
    return None, "no oracle: no truth folder (real data)"


def load_ceiling_evidence(dataset: CachedDataset, ids: np.ndarray):
    """What each modality of each test stay reveals, for the ceiling (synthetic corpora only).

    Why: the ceiling (``observed_risk`` under a mask) is recomputed per simulated mask from the
    corpus's truth tables (:mod:`clinical_moe.data.synthetic.observer`).

    Args:
        dataset: The test split.
        ids: ``int64[N]`` stay ids in the order of the evaluation's rows.

    Returns:
        (:class:`~clinical_moe.data.synthetic.ceiling.Evidence` aligned with ``ids``, or None;
        a short note saying where it came from or why there is none).
    """
    summary = dataset.store.summary
    root, task = summary.get("data_root"), summary.get("task")
    if not root or not (Path(root) / "truth" / "stays.csv.gz").is_file():
        return None, "no ceiling: no truth folder (real data)"
    if task not in (None, "ihm48"):
        return None, f"no ceiling: the truth's risk is of mortality, the task is {task}"
    from clinical_moe.data.synthetic.observer import evidence_from_truth

    stays = pd.read_csv(Path(root) / "truth" / "stays.csv.gz")
    path = Path(root) / "truth" / "studies.csv.gz"
    studies = pd.read_csv(path, low_memory=False) if path.is_file() else None
    pos = pd.Series(np.arange(len(stays)), index=stays["stay_id"].astype("int64"))
    rows = pos.reindex(np.asarray(ids, dtype=np.int64)).to_numpy()
    if np.isnan(rows).any():
        return None, f"no ceiling: {int(np.isnan(rows).sum())} test stays are not in the truth"
    ev = evidence_from_truth(stays.iloc[rows.astype(int)].reset_index(drop=True), studies)
    return ev, f"ceiling from {Path(root) / 'truth'}"
