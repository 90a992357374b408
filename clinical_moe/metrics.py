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


# ------------------------------------------------------------------------------------------------
# Calibration, thresholds and bootstrap confidence intervals (evaluation under missingness)

#: Metrics scored by :func:`score_with_ci`, in report order.
EVAL_METRICS = ("auroc", "auprc", "f1", "ece", "brier")


def brier(y: np.ndarray, p: np.ndarray, task: str = "binary") -> float:
    """Brier score (mean squared error of the probabilities; lower is better).

    Binary: scikit-learn's ``brier_score_loss``; multilabel: macro over labels; multiclass: the
    unscaled multiclass Brier score (sum over classes, mean over samples).
    """
    from sklearn.metrics import brier_score_loss

    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    if task == "binary":
        return float(brier_score_loss(y.astype(int), p, pos_label=1))
    if task == "multilabel":
        return float(
            np.mean(
                [brier_score_loss(yc.astype(int), pc, pos_label=1) for yc, pc in _columns(y, p)]
            )
        )
    if task == "multiclass":
        return float(
            brier_score_loss(y.astype(int), p, labels=np.arange(p.shape[1]), scale_by_half=False)
        )
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins of [0, 1] (as ``sklearn.calibration.calibration_curve``; 1.0 -> last bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p, side="right")


def ece(y: np.ndarray, p: np.ndarray, task: str = "binary", n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins.

    ``ECE = sum_b (n_b / N) |mean(y in b) - mean(p in b)|``. Binary: on the positive-class
    probability; multilabel: macro over labels; multiclass: top-label confidence vs accuracy.
    Why equal-width bins: they are the usual reporting convention, comparable across models.
    """
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    w = np.ones((1, len(y)))
    return float(_weighted(task, "ece", w, y, p, None, n_bins)[0])


def best_threshold(y: np.ndarray, p: np.ndarray, task: str = "binary"):
    """The probability threshold that maximises F1 (chosen on a validation split).

    Why: F1 at 0.5 is meaningless for rare outcomes and for uncalibrated models; the threshold is
    picked once on validation data (natural missingness) and then reused unchanged on every test
    condition, as a deployed model would be.

    Returns:
        Binary: a float (0.5 when the split has one class); multilabel: ``float[C]``, one per label;
        multiclass: None (predictions are the argmax, no threshold).
    """
    from sklearn.metrics import precision_recall_curve

    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if task == "multiclass":
        return None
    if task not in ("binary", "multilabel"):
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    out = []
    for yc, pc in _columns(y, p):
        if not _binary_defined(yc):
            out.append(0.5)
            continue
        prec, rec, thr = precision_recall_curve(yc.astype(int), pc)
        f = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)  # one per threshold
        out.append(float(thr[int(np.argmax(f))]))
    return out[0] if task == "binary" else np.asarray(out)


# -- vectorised weighted metrics: row b of W holds the multiplicity of each sample in resample b --


def _groups(p: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    return np.flatnonzero(np.r_[True, p[1:] != p[:-1]])


def _w_auroc(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUROC of each weighted sample (Mann-Whitney with ties counted one half): ``[B]``."""
    order = np.argsort(p, kind="mergesort")
    ps, ys, Ws = p[order], y[order], W[:, order]  # ascending scores
    starts = _groups(ps)
    wp = np.add.reduceat(Ws * ys, starts, axis=1)  # (B, G) positive weight per score group
    wn = np.add.reduceat(Ws * (1 - ys), starts, axis=1)  # (B, G)
    below = np.cumsum(wn, axis=1) - wn  # negatives strictly below each group
    den = wp.sum(1) * wn.sum(1)
    num = (wp * (below + 0.5 * wn)).sum(1)
    return np.divide(num, den, out=np.full(len(W), np.nan), where=den > 0)


def _w_auprc(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Average precision (step-wise, as scikit-learn) of each weighted sample: ``[B]``."""
    order = np.argsort(-p, kind="mergesort")
    ps, ys, Ws = p[order], y[order], W[:, order]  # descending scores
    starts = _groups(ps)
    wp = np.add.reduceat(Ws * ys, starts, axis=1)  # (B, G)
    wn = np.add.reduceat(Ws * (1 - ys), starts, axis=1)
    tp, fp = np.cumsum(wp, axis=1), np.cumsum(wn, axis=1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    pos, neg = tp[:, -1], fp[:, -1]
    ap = np.divide((wp * precision).sum(1), pos, out=np.full(len(W), np.nan), where=pos > 0)
    return np.where(neg > 0, ap, np.nan)  # undefined with one class, like auprc()


def _w_f1(W: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """F1 of fixed 0/1 predictions per weighted sample (0 when nothing is positive): ``[B]``."""
    tp = W @ (pred * y)
    fp = W @ (pred * (1 - y))
    fn = W @ ((1 - pred) * y)
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros(len(W)), where=den > 0)


def _w_brier(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return (W @ (p - y) ** 2) / W.sum(1)


def _w_ece(W: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    onehot = np.eye(n_bins)[_bin_index(p, n_bins)]  # (N, n_bins)
    gap = W @ (onehot * (y - p)[:, None])  # (B, n_bins): sum of (y - p) per bin
    return np.abs(gap).sum(1) / W.sum(1)


def _weighted(
    task: str, metric: str, W: np.ndarray, y: np.ndarray, p: np.ndarray, threshold, n_bins: int = 10
) -> np.ndarray:
    """One metric for every row of ``W`` (``[B, N]`` sample weights): ``[B]``."""
    W = np.asarray(W, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if task == "multiclass":
        C = p.shape[1]
        yi = np.asarray(y).astype(int).reshape(-1)
        onehot = np.eye(C)[yi]  # (N, C)
        if metric == "brier":
            return W @ ((p - onehot) ** 2).sum(1) / W.sum(1)
        if metric == "ece":  # top-label confidence vs accuracy
            correct = (p.argmax(1) == yi).astype(np.float64)
            return _w_ece(W, correct, p.max(1), n_bins)
        pred = np.eye(C)[p.argmax(1)]  # (N, C)
        cols = [(onehot[:, c], p[:, c], pred[:, c]) for c in range(C)]
    elif task in ("binary", "multilabel"):
        y2 = np.asarray(y, dtype=np.float64).reshape(len(p), -1)
        p2 = p.reshape(len(p), -1)
        thr = np.broadcast_to(
            np.asarray(0.5 if threshold is None else threshold, np.float64), (p2.shape[1],)
        )
        cols = [
            (y2[:, c], p2[:, c], (p2[:, c] >= thr[c]).astype(np.float64))
            for c in range(p2.shape[1])
        ]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    per = []
    for yc, pc, predc in cols:
        if metric == "auroc":
            per.append(_w_auroc(W, yc, pc))
        elif metric == "auprc":
            per.append(_w_auprc(W, yc, pc))
        elif metric == "f1":
            v = _w_f1(W, yc, predc)
            if task == "multiclass":  # macro over classes seen in y or predicted (as sklearn)
                v = np.where(W @ np.maximum(yc, predc) > 0, v, np.nan)
            per.append(v)
        elif metric == "brier":
            per.append(_w_brier(W, yc, pc))
        elif metric == "ece":
            per.append(_w_ece(W, yc, pc, n_bins))
        else:
            raise ValueError(f"unknown metric {metric!r}; expected one of {EVAL_METRICS}")
    per = np.stack(per, axis=1)  # (B, C)
    if per.shape[1] == 1:
        return per[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        return np.nanmean(per, axis=1)


def bootstrap_weights(
    y: np.ndarray, n_boot: int, seed: int, task: str = "binary", stratified: bool = True
) -> np.ndarray:
    """``int[n_boot, N]`` resample multiplicities (each row sums to N).

    Stratified for binary labels: positives and negatives are resampled separately, so every
    resample keeps the prevalence and AUROC stays defined. Other tasks resample plainly.
    """
    y = np.asarray(y)
    n = len(y)
    rng = np.random.default_rng(seed)
    if not stratified or task != "binary":
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) if n else np.zeros((n_boot, 0))
    W = np.zeros((n_boot, n), dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(y.reshape(n) == cls)
        if len(idx):
            W[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return W


def score_with_ci(
    y: np.ndarray,
    p: np.ndarray,
    task: str = "binary",
    threshold=None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
    metrics=EVAL_METRICS,
    stratified: bool = True,
) -> dict[str, dict[str, float]]:
    """Point estimates and percentile bootstrap CIs of AUROC, AUPRC, F1, ECE and Brier.

    Point estimates come from the scikit-learn based functions above; the ``n_boot`` resamples are
    scored all at once with vectorised weighted versions of the same metrics (one weight row per
    resample), so 1000 resamples of a few thousand stays take well under a second.

    Args:
        y: Labels (``[N]`` or ``[N, C]``).
        p: Probabilities (see :func:`probabilities`).
        task: binary | multilabel | multiclass.
        threshold: F1 threshold(s) (e.g. from :func:`best_threshold` on validation); None = 0.5.
        n_boot: Resamples (0 gives NaN intervals).
        seed: Seed of the resamples (same seed and labels -> same resamples, so two models scored
            on the same stays get paired intervals).
        alpha: 1 - confidence level.
        n_bins: ECE bins.
        metrics: Which of :data:`EVAL_METRICS`.
        stratified: Stratify resamples by label (binary only).

    Returns:
        ``{metric: {"value", "ci_low", "ci_high"}}``.
    """
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    thr = 0.5 if threshold is None else threshold
    point = {
        "auroc": lambda: auroc(y, p, task),
        "auprc": lambda: auprc(y, p, task),
        "f1": lambda: f1(y, p, task, thr),
        "ece": lambda: ece(y, p, task, n_bins),
        "brier": lambda: brier(y, p, task),
    }
    out = {}
    W = bootstrap_weights(y, n_boot, seed, task, stratified) if n_boot > 0 and len(y) else None
    for name in metrics:
        value = point[name]() if len(y) else math.nan
        lo = hi = math.nan
        if W is not None:
            reps = []
            chunk = max(1, int(4_000_000 // max(1, len(y))))  # bound the (B, N) temporaries
            for i in range(0, len(W), chunk):
                reps.append(_weighted(task, name, W[i : i + chunk], y, p, threshold, n_bins))
            reps = np.concatenate(reps)
            if np.isfinite(reps).any():
                lo, hi = (float(v) for v in np.nanpercentile(reps, [50 * alpha, 100 - 50 * alpha]))
        out[name] = {"value": float(value), "ci_low": lo, "ci_high": hi}
    return out


def prevalence(y: np.ndarray, task: str = "binary") -> float:
    """Fraction of positives (binary), mean positive rate over labels (multilabel), or the
    fraction of the most frequent class (multiclass)."""
    y = np.asarray(y)
    if len(y) == 0:
        return math.nan
    if task == "multiclass":
        return float(np.bincount(y.astype(int).reshape(-1)).max() / len(y))
    return float(np.mean(y))
