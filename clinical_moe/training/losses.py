"""Task losses and the task inferred from a cache's label columns.

Three tasks cover the cohort definitions: ``binary`` (IHM-48h, LOS > 3 d / 7 d: one logit),
``multiclass`` (one label column of class ids: C logits, cross-entropy) and ``multilabel``
(phenotypes: one column per label, C logits, independent BCE).

Encoders may also learn modality-native targets per event (:func:`encoder_target_losses`):
masked BCE over the known targets of real events, one weight per modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clinical_moe.metrics import TASKS
from clinical_moe.types import Batch, ModalityTokens


def infer_task(label_columns: Sequence[str], labels: np.ndarray | None = None) -> str:
    """Which task a cache's labels describe.

    Args:
        label_columns: The cache's label columns (``summary.json``).
        labels: Optional label values ``[N]`` or ``[N, C]``; with one column, values beyond
            {0, 1} mean multiclass.

    Returns:
        ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
    """
    if len(label_columns) > 1:
        return "multilabel"
    if labels is not None:
        values = np.unique(np.asarray(labels)[~np.isnan(np.asarray(labels, dtype=float))])
        if len(values) and (values.max() > 1 or values.min() < 0):
            return "multiclass"
    return "binary"


def num_classes_for(
    task: str, label_columns: Sequence[str], labels: np.ndarray | None = None
) -> int:
    """Logits per sample: 1 (binary), the number of columns (multilabel) or of class ids."""
    if task == "binary":
        return 1
    if task == "multilabel":
        return len(label_columns)
    if task == "multiclass":
        if labels is None:
            raise ValueError("a multiclass task needs the labels to count the classes")
        return int(np.nanmax(np.asarray(labels))) + 1
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean task loss of a batch.

    Args:
        logits: ``[B, C]``.
        labels: ``[B]`` (binary 0/1 or class ids) or ``[B, C]`` (multilabel 0/1).
        task: ``"binary"`` (BCE-with-logits on ``logits[:, 0]``), ``"multiclass"`` (cross-entropy)
            or ``"multilabel"`` (BCE-with-logits per label).
    """
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.reshape(-1).to(logits.dtype))
    if task == "multiclass":
        return F.cross_entropy(logits, labels.reshape(-1).long())
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ------------------------------------------------------------------------------------------------
# Encoder targets: modality-native labels per event (CheXpert findings, machine ECG statements)


def event_target_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    continuous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Masked mean loss of per-event target logits over the known targets of real events.

    Binary targets (0/1; CheXpert's uncertain mapped by the loader) take BCE-with-logits;
    ``continuous`` ones (already standardised by the loader) a Huber loss on the raw output.
    Unknown targets (NaN) and events outside ``valid`` contribute nothing, not even a NaN gradient.

    Args:
        logits: ``(B, N, K)`` from the encoder's target head.
        targets: ``(B, N, K)`` float, NaN = unknown.
        valid: ``(B, N)`` bool; real events of rows whose encoder ran (present, not dropped).
        continuous: Optional ``(K,)`` bool; True = continuous target.

    Returns:
        ``(loss, count)``: the mean over the ``count`` known entries (a zero that keeps the graph
        when there are none), and that count.
    """
    targets = targets.to(logits.dtype)
    known = valid.unsqueeze(-1) & torch.isfinite(targets)  # (B, N, K)
    clean = torch.where(known, targets, torch.zeros_like(targets))  # no NaN reaches autograd
    per = F.binary_cross_entropy_with_logits(logits, clean.clamp(0, 1), reduction="none")
    if continuous is not None and bool(continuous.any()):
        huber = F.smooth_l1_loss(logits, clean, reduction="none")  # (B, N, K)
        per = torch.where(continuous.to(logits.device), huber, per)
    count = int(known.sum())
    loss = (per * known).sum() / max(count, 1)  # (); 0 * logits keeps the graph when empty
    return loss, count


def encoder_target_losses(
    tokens: Mapping[str, ModalityTokens],
    batch: Batch,
    weights: Mapping[str, float],
    continuous: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the per-modality target losses of one batch, and the raw parts.

    A modality counts when its weight is > 0, its encoder emitted ``event_logits`` and the batch
    carries ``inputs[m]["targets"]``. Only rows where the modality is present in ``batch.present``
    (the encoder ran there; train-time modality dropout hides modalities from the head only, so
    these rows include dropped ones) and only real events (``event_mask``) are scored.

    Returns:
        ``(total, parts)``: ``sum_m w_m * L_m`` (a scalar in the graph), and ``{"<m>_target_loss":
        L_m}`` detached, unweighted, for logging.
    """
    total = batch.present.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    for m, name in enumerate(batch.modalities):
        w = float(weights.get(name, 0.0))
        toks = tokens.get(name)
        inputs = batch.inputs.get(name, {})
        if w <= 0 or toks is None or toks.event_logits is None or "targets" not in inputs:
            continue
        logits, targets = toks.event_logits, inputs["targets"]  # (B, N, K) each
        if targets.shape != logits.shape:
            raise ValueError(
                f"{name} targets {tuple(targets.shape)} do not match the encoder's target logits "
                f"{tuple(logits.shape)}: build the encoder with num_targets from the cache"
            )
        valid = batch.present[:, m, None] & inputs["event_mask"].bool()  # (B, N)
        loss, _ = event_target_loss(logits, targets, valid, (continuous or {}).get(name))
        total = total.to(loss.dtype) + w * loss
        parts[f"{name}_target_loss"] = loss.detach()
    return total, parts
