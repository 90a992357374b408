"""What is attributed: one scalar per stay, the log-odds of a target class, and its baseline.

Every attribution method in this package explains the same scalar, so their numbers can be
compared and the Shapley efficiency identity has a fixed reference point:

- ``binary``: the model's logit ``z`` (``p = sigmoid(z)``).
- ``multilabel``: the logit of one label (``target.index``, default the first label).
- ``multiclass``: the log-odds of one class under the softmax,
  ``log p_t - log(1 - p_t) = z_t - logsumexp(z_{c != t})`` (default class 1, the first class after
  the reference class 0). Raw multiclass logits are only defined up to a shift, log-odds are not.

Why log-odds and not probability: contributions add up in logit space (a logistic model's
coefficients are log-odds ratios, and the synthetic corpus's outcome is a logistic model of its
latent factors), whereas probabilities saturate near 0 and 1.

The baseline ``base_log_odds`` is ``v(empty)``, the value of the empty coalition of modalities: the
model cannot run without any modality (ARCHITECTURE.md invariant 5), so an empty coalition is
assigned the log-odds of the target's prevalence in the *training* split, i.e. the best constant
prediction a model with no input could make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TASKS = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class Target:
    """The scalar that attribution explains.

    Attributes:
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        index: Logit column (binary: 0; multilabel: the label; multiclass: the class).
        base_log_odds: ``v(empty)``: log-odds of the training prevalence of the target.
        name: A label for tables and reports (e.g. the label column).
    """

    task: str = "binary"
    index: int = 0
    base_log_odds: float = 0.0
    name: str = "label"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.index < 0:
            raise ValueError(f"target index must be >= 0, got {self.index}")

    def log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits (B, C)`` -> ``(B,)`` log-odds of the target (see the module docstring)."""
        if logits.dim() != 2 or self.index >= logits.shape[1]:
            raise ValueError(
                f"target index {self.index} does not fit logits of shape {tuple(logits.shape)}"
            )
        if self.task != "multiclass":
            return logits[:, self.index]
        keep = torch.arange(logits.shape[1], device=logits.device) != self.index
        return logits[:, self.index] - torch.logsumexp(logits[:, keep], dim=1)

    @property
    def base_risk(self) -> float:
        """The probability that ``base_log_odds`` stands for (the training prevalence)."""
        return 1.0 / (1.0 + math.exp(-self.base_log_odds))


def prevalence_log_odds(p: float, eps: float = 1e-4) -> float:
    """``log(p / (1 - p))``, ``p`` clipped to ``[eps, 1 - eps]`` (one-class splits stay finite)."""
    p = min(max(float(p), eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


def make_target(
    task: str,
    train_labels: np.ndarray,
    index: int | None = None,
    label_names: list[str] | None = None,
) -> Target:
    """The :class:`Target` of a task, with ``v(empty)`` from the training labels.

    Args:
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        train_labels: Training labels, ``[N]`` or ``[N, C]`` (NaN entries are ignored).
        index: Target column; default 0 (binary / first label) or class 1 (multiclass).
        label_names: Label column names, used for :attr:`Target.name`.

    Returns:
        The target, whose ``base_log_odds`` is the log-odds of the target's training prevalence.
    """
    y = np.asarray(train_labels, dtype=np.float64)
    if task == "multiclass":
        idx = 1 if index is None else int(index)
        col = y.reshape(len(y), -1)[:, 0]
        col = col[~np.isnan(col)]
        p = float(np.mean(col == idx)) if len(col) else 0.5
        name = f"{(label_names or ['class'])[0]}={idx}"
    else:
        idx = 0 if index is None else int(index)
        y = y.reshape(len(y), -1)
        if idx >= y.shape[1]:
            raise ValueError(f"target index {idx} but the labels have {y.shape[1]} column(s)")
        col = y[:, idx][~np.isnan(y[:, idx])]
        p = float(col.mean()) if len(col) else 0.5
        names = label_names or [f"label{j}" for j in range(y.shape[1])]
        name = names[idx] if idx < len(names) else f"label{idx}"
    return Target(task=task, index=idx, base_log_odds=prevalence_log_odds(p), name=name)
