"""Attribute every stay of a dataset, batch by batch, into per-stay and dataset-level tables.

One pass over the stays; per batch: the encoders once, the head on the natural stays (risk, gates
for the routing and interaction analyses), the head once per coalition of modalities (Shapley
values and ablation by table look-up, :mod:`.shapley`) and the head along the Integrated
Gradients path (:mod:`.gradients`). Tables (pandas DataFrames, keyed by modality):

- ``per_stay``: stay id, label, pattern, log-odds, risk, ``v(empty)``, ``has_<m>`` and, per
  method, ``shapley_<m>`` (log-odds), ``ig_<m>`` (log-odds), ``ablation_<m>`` (risk), plus the IG
  completeness gap ``ig_delta`` and baseline log-odds ``ig_baseline``.
- ``modality_summary``: per method and modality: stays with it, mean attribution and mean
  ``|attribution|`` over those stays, mean ``|attribution|`` over all stays (absent = 0; the
  dataset-level importance) and ``top1_share``, the share of stays with >= 2 modalities, this one
  among them, where it has the largest ``|attribution|``.
- ``pattern_summary``: per missingness pattern, method and modality: mean and mean absolute
  attribution, with the pattern's number of stays and mean risk.
- ``routing_*`` (:mod:`.routing`) and ``interaction*`` (:mod:`.interactions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from clinical_moe.attribution.game import PresenceGame, coalition_name
from clinical_moe.attribution.gradients import modality_integrated_gradients
from clinical_moe.attribution.interactions import InteractionWeights
from clinical_moe.attribution.routing import RoutingAnalysis, pattern_names
from clinical_moe.attribution.shapley import (
    EXACT_MAX_MODALITIES,
    modality_ablation,
    modality_shapley,
)
from clinical_moe.attribution.target import Target
from clinical_moe.data.dataset import CachedDataset, Collator
from clinical_moe.model import MultimodalModel
from clinical_moe.types import Batch

METHODS = ("shapley", "ig", "ablation")
UNITS = {"shapley": "log-odds", "ig": "log-odds", "ablation": "risk"}


def _target_labels(batch: Batch, target: Target) -> list[float]:
    y = batch.labels
    if y is None:
        return [float("nan")] * len(batch)
    y = y.float().reshape(len(batch), -1)
    if target.task == "multiclass":
        return (y[:, 0] == target.index).float().tolist()
    return y[:, min(target.index, y.shape[1] - 1)].tolist()


def attribute_batch(
    model: MultimodalModel,
    batch: Batch,
    target: Target,
    ig_steps: int = 32,
    shapley_samples: int = 64,
    seed: int = 0,
) -> tuple[dict, dict]:
    """All per-stay attributions of one batch.

    Args:
        model: The model, in eval mode.
        batch: The stays.
        target: What is attributed.
        ig_steps: Integrated Gradients steps; 0 skips IG (its columns are NaN).
        shapley_samples: Sampled orders when ``M > 6``.
        seed: Seed of the sampled orders.

    Returns:
        ``(columns, gates)``: per-stay columns (lists) for the ``per_stay`` table, and the head's
        gates on the natural stays together with the encoder outputs (``"_tokens"``).
    """
    mods = model.modalities
    with torch.no_grad():
        tokens = model.encode(batch)
        out = model.head(tokens, batch.present)
    game = PresenceGame(model, batch, target, tokens)
    exact = len(mods) <= EXACT_MAX_MODALITIES
    table = game.coalition_table() if exact else None
    phi = modality_shapley(game, table, exact=exact, n_samples=shapley_samples, seed=seed)
    abl = modality_ablation(game, table)
    if ig_steps > 0:
        ig, delta, ig_base = modality_integrated_gradients(game, n_steps=ig_steps)
    else:  # IG skipped: its columns stay, as NaN
        ig = torch.full((len(batch), len(mods)), float("nan"))
        delta = ig_base = torch.full((len(batch),), float("nan"))
    log_odds = target.log_odds(out.logits.float()).cpu()
    cols: dict[str, list] = {
        "stay_id": [int(i) for i in batch.ids],
        "label": _target_labels(batch, target),
        "pattern": pattern_names(batch.present, mods),
        "n_present": batch.present.sum(1).tolist(),
        "log_odds": log_odds.tolist(),
        "risk": torch.sigmoid(log_odds).tolist(),
        "base_log_odds": [target.base_log_odds] * len(batch),
    }
    present = batch.present.cpu()
    for i, m in enumerate(mods):
        cols[f"has_{m}"] = present[:, i].tolist()
    for name, values in (("shapley", phi), ("ig", ig), ("ablation", abl)):
        for i, m in enumerate(mods):
            cols[f"{name}_{m}"] = values[:, i].tolist()
    cols["ig_delta"], cols["ig_baseline"] = delta.tolist(), ig_base.tolist()
    if table is not None:  # v(S) of every coalition the stay can form (NaN where it cannot)
        for code in range(1, table.shape[1]):
            cols[f"coalition_{coalition_name(code, mods)}"] = table[:, code].tolist()
    return cols, {**out.gates, "_tokens": tokens}


def attribute_dataset(
    model: MultimodalModel,
    dataset: CachedDataset,
    target: Target,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    ig_steps: int = 32,
    shapley_samples: int = 64,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, pd.DataFrame]:
    """Attribute the stays of ``dataset`` (or ``indices`` of it) and build every table.

    Args:
        model: A trained model (put in eval mode here).
        dataset: A split of the cache.
        target: What is attributed (:func:`clinical_moe.attribution.target.make_target`).
        indices: Stays to attribute (default: all).
        batch_size: Stays per batch (one head forward per coalition per batch).
        ig_steps: Integrated Gradients steps (Gauss-Legendre nodes); 0 skips IG (NaN columns),
            which is most of the cost for large heads.
        shapley_samples: Sampled orders when ``M > 6``.
        seed: Seed of the sampled orders.
        quiet: No progress bar.

    Returns:
        ``{"per_stay": ..., "modality_summary": ..., "pattern_summary": ..., "routing_by_modality":
        ..., "routing_by_pattern": ..., "routing_specialisation": ..., "interactions": ...,
        "interaction_summary": ...}``.
    """
    model.eval()
    mods = tuple(model.modalities)
    data = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=Collator(dataset))
    routing = RoutingAnalysis(mods)
    inter = InteractionWeights(model.head, mods)
    columns: dict[str, list] = {}
    for batch in tqdm(loader, desc="attribution", unit="batch", disable=quiet, leave=False):
        cols, gates = attribute_batch(model, batch, target, ig_steps, shapley_samples, seed)
        for k, v in cols.items():
            columns.setdefault(k, []).extend(v)
        tokens = gates.pop("_tokens")
        routing.update(gates, tokens, batch.present, batch.ids)
        inter.update(gates, batch.present, batch.ids)
    per_stay = pd.DataFrame(columns)
    return {
        "per_stay": per_stay,
        "modality_summary": modality_summary(per_stay, mods),
        "pattern_summary": pattern_summary(per_stay, mods),
        **routing.tables(),
        **inter.tables(),
    }


def _attr(df: pd.DataFrame, method: str, mods) -> np.ndarray:
    return df[[f"{method}_{m}" for m in mods]].to_numpy(float)


def modality_summary(per_stay: pd.DataFrame, modalities: Sequence[str]) -> pd.DataFrame:
    """Dataset-level table per method and modality (see the module docstring)."""
    mods = tuple(modalities)
    has = per_stay[[f"has_{m}" for m in mods]].to_numpy(bool)
    multi = has.sum(1) >= 2
    rows = []
    for method in METHODS:
        a = _attr(per_stay, method, mods)
        if not np.isfinite(a).any():
            continue  # skipped (IG with ig_steps=0)
        mag = np.where(has, np.abs(np.nan_to_num(a)), 0.0)  # (N, M)
        top = np.where(has, mag, -1.0).argmax(1)
        for j, m in enumerate(mods):
            sel = has[:, j]
            vals = a[sel, j]
            ranked = sel & multi
            rows.append(
                {
                    "method": method,
                    "unit": UNITS[method],
                    "modality": m,
                    "n_present": int(sel.sum()),
                    "mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else np.nan,
                    "mean_abs": float(np.nanmean(np.abs(vals)))
                    if np.isfinite(vals).any()
                    else np.nan,
                    "mean_abs_all": float(mag[:, j].mean()) if len(mag) else np.nan,
                    "top1_share": float((top[ranked] == j).mean()) if ranked.any() else np.nan,
                }
            )
    return pd.DataFrame(rows)


def pattern_summary(per_stay: pd.DataFrame, modalities: Sequence[str]) -> pd.DataFrame:
    """Mean attribution per missingness pattern, method and modality (present modalities only)."""
    rows = []
    for pattern, part in per_stay.groupby("pattern", sort=True):
        for method in METHODS:
            for m in modalities:
                if not part[f"has_{m}"].all():
                    continue
                vals = part[f"{method}_{m}"].to_numpy(float)
                finite = np.isfinite(vals).any()
                rows.append(
                    {
                        "pattern": pattern,
                        "n_stays": len(part),
                        "mean_risk": float(part["risk"].mean()),
                        "method": method,
                        "modality": m,
                        "mean": float(np.nanmean(vals)) if finite else np.nan,
                        "mean_abs": float(np.nanmean(np.abs(vals))) if finite else np.nan,
                    }
                )
    return pd.DataFrame(
        rows, columns=["pattern", "n_stays", "mean_risk", "method", "modality", "mean", "mean_abs"]
    )
