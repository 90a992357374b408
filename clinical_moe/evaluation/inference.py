"""Predictions of one model under many presence masks, running the encoders once per batch.

Removing a modality from a sample is exactly what :meth:`MultimodalModel.encode` does for an
absent one: zero tokens, an all-False token mask, zero token times. Because encoders see one
sample at a time in eval mode (ARCHITECTURE.md invariant 2), the tokens of the naturally present
modalities can be computed once and then masked for every simulated condition, so a grid of ~50
conditions costs one encoder pass plus ~50 (cheap) fusion-head passes. The tests check that this
equals calling the model on ``batch.with_present(mask)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from clinical_moe.data.dataset import CachedDataset, Collator
from clinical_moe.metrics import probabilities
from clinical_moe.model import MultimodalModel
from clinical_moe.types import ModalityTokens


def mask_tokens(
    tokens: dict[str, ModalityTokens], present: torch.Tensor, modalities: tuple[str, ...]
) -> dict[str, ModalityTokens]:
    """Tokens as the encoders would give them had ``present`` been the presence mask.

    Args:
        tokens: Encoder outputs under the natural presence (a superset of ``present``).
        present: ``BoolTensor[B, M]``.
        modalities: Column order of ``present``.
    """
    out = {}
    for m, name in enumerate(modalities):
        t = tokens[name]
        keep = present[:, m].to(t.tokens.device)  # (B,)
        times = None if t.times is None else t.times * keep[:, None].to(t.times.dtype)  # (B, T)
        out[name] = ModalityTokens(
            t.tokens * keep[:, None, None].to(t.tokens.dtype),  # (B, T, D)
            t.mask & keep[:, None],
            times,
        )
    return out


@torch.no_grad()
def predict_under_masks(
    model: MultimodalModel,
    dataset: CachedDataset,
    masks: np.ndarray,
    task: str,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Probabilities of every stay of ``dataset`` under each of ``K`` presence masks.

    Args:
        model: A trained model (put in eval mode here).
        dataset: The split to score; row ``i`` of each mask belongs to ``dataset[i]``.
        masks: ``bool[K, N, M]``, each a subset of the natural presence. Rows with no modality
            cannot be scored and get NaN.
        task: binary | multilabel | multiclass (how logits become probabilities).
        batch_size: Stays per encoder pass.
        device: Where the model runs.
        progress: Called with the number of stays after each batch (progress bars).

    Returns:
        ``float[K, N]`` (binary) or ``float[K, N, C]``.
    """
    model.eval().to(device)
    masks = np.asarray(masks, dtype=bool)
    K, N, _ = masks.shape
    if len(dataset) != N:
        raise ValueError(f"masks cover {N} stays but the dataset has {len(dataset)}")
    natural = dataset.present
    if np.any(masks & ~natural[None]):
        raise ValueError("a mask reveals a modality that was never observed")
    row_of = {int(s): i for i, s in enumerate(dataset.rows["stay_id"])}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collator(dataset))
    out: np.ndarray | None = None
    mods = tuple(dataset.modalities)
    for batch in loader:
        rows = np.asarray([row_of[int(i)] for i in batch.ids])
        batch = batch.to(device)
        tokens = model.encode(batch)  # once per batch, natural presence
        for k in range(K):
            mask = masks[k, rows]  # (B, M)
            scorable = mask.any(1)
            if not scorable.any():
                continue
            mask = np.where(scorable[:, None], mask, natural[rows])  # placeholders, dropped below
            present = torch.from_numpy(mask).to(device)
            logits = model.head(mask_tokens(tokens, present, mods), present, labels=None).logits
            probs = probabilities(logits.float().cpu(), task)  # (B,) or (B, C)
            if out is None:
                out = np.full((K, N, *probs.shape[1:]), np.nan)
            out[k, rows[scorable]] = probs[scorable]
        if progress is not None:
            progress(len(rows))
    if out is None:
        out = np.full((K, N), np.nan)
    return out
