"""Classification metrics for binary, multilabel and multiclass tasks (scikit-learn underneath).

Every function takes numpy arrays of labels and *probabilities* (not logits; see
:func:`probabilities`) and returns a float. A split that holds only one class has no defined
AUROC / AUPRC: the functions return NaN rather than raising, so a tiny validation split never
crashes a training run. Multilabel scores are macro averages over the labels that are defined;
multiclass AUROC is one-vs-rest.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

TASKS = ("binary", "multiclass", "multilabel")


def probabilities(logits: torch.Tensor | np.ndarray, task: str) -> np.ndarray:
    """Logits ``[N, C]`` -> probabilities: sigmoid (binary ``[N]``, multilabel ``[N, C]``) or softmax."""
    x = torch.as_tensor(logits, dtype=torch.float32)
    if task == "binary":
        return torch.sigmoid(x.reshape(x.shape[0], -1)[:, 0]).numpy()
    if task == "multilabel":
        return torch.sigmoid(x).numpy()
    if task == "multiclass":
        return torch.softmax(x, dim=-1).numpy()
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _columns(y: np.ndarray, p: np.ndarray):
    """Per-label (y, p) pairs of a multilabel problem."""
    y, p = np.asarray(y).reshape(len(y), -1), np.asarray(p).reshape(len(p), -1)
    return [(y[:, c], p[:, c]) for c in range(y.shape[1])]


def _binary_defined(y: np.ndarray) -> bool:
    return len(y) > 0 and 0 < float(np.sum(y)) < len(y)


def _macro(fn, y: np.ndarray, p: np.ndarray) -> float:
    vals = [fn(yc, pc) for yc, pc in _columns(y, p) if _binary_defined(yc)]
    return float(np.mean(vals)) if vals else math.nan


def auroc(y: np.ndarray, p: np.ndarray, task: str = "binary") -> float:
    """Area under the ROC curve (multilabel: macro; multiclass: one-vs-rest macro); NaN if undefined."""
    y, p = np.asarray(y), np.asarray(p)
    if task == "binary":
        return float(roc_auc_score(y, p)) if _binary_defined(y) else math.nan
    if task == "multilabel":
        return _macro(roc_auc_score, y, p)
    if task == "multiclass":
        classes = np.unique(y.astype(int))
        if len(classes) < 2:
            return math.nan
        onehot = np.eye(p.shape[1])[y.astype(int)]  # (N, C)
        return _macro(roc_auc_score, onehot, p)  # classes absent from y are skipped
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def auprc(y: np.ndarray, p: np.ndarray, task: str = "binary") -> float:
    """Average precision (area under the precision-recall curve); NaN if undefined."""
    y, p = np.asarray(y), np.asarray(p)
    if task == "binary":
        return float(average_precision_score(y, p)) if _binary_defined(y) else math.nan
    if task == "multilabel":
        return _macro(average_precision_score, y, p)
    if task == "multiclass":
        onehot = np.eye(p.shape[1])[y.astype(int)]  # (N, C)
        return _macro(average_precision_score, onehot, p)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def f1(y: np.ndarray, p: np.ndarray, task: str = "binary", threshold: float = 0.5) -> float:
    """F1 of thresholded probabilities (multiclass: argmax, macro; multilabel: macro per label)."""
    y, p = np.asarray(y), np.asarray(p)
    if len(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-division warnings when a class is never predicted
        if task == "binary":
            return float(f1_score(y.astype(int), (p >= threshold).astype(int), zero_division=0))
        if task == "multilabel":
            pred = (p >= threshold).astype(int)
            return float(f1_score(y.astype(int), pred, average="macro", zero_division=0))
        if task == "multiclass":
            return float(f1_score(y.astype(int), p.argmax(1), average="macro", zero_division=0))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def classification_metrics(
    y: np.ndarray, p: np.ndarray, task: str = "binary", threshold: float | None = None
) -> dict[str, float]:
    """``{"auroc", "auprc", "f1"}`` (F1 at 0.5), plus ``"f1_at_threshold"`` when a threshold is given."""
    out = {"auroc": auroc(y, p, task), "auprc": auprc(y, p, task), "f1": f1(y, p, task, 0.5)}
    if threshold is not None:
        out["f1_at_threshold"] = f1(y, p, task, threshold)
    return out
