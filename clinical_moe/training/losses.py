"""Task losses and the task inferred from a cache's label columns.

Three tasks cover the cohort definitions: ``binary`` (IHM-48h, LOS > 3 d / 7 d: one logit),
``multiclass`` (one label column of class ids: C logits, cross-entropy) and ``multilabel``
(phenotypes: one column per label, C logits, independent BCE).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clinical_moe.metrics import TASKS


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
