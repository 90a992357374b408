"""Learners of the faithfulness floor: each maps what the shown modalities reveal to log-odds.

Every learner gets the same inputs (:func:`benchmarks.faithfulness_floor.features`: exactly what
each shown modality reveals, zero where it is not shown, and a presence flag per modality) and the
same train-split labels, and must answer for every coalition of modalities. They differ only in
how they share what they learn across coalitions, which is what decides their Shapley values:

- :func:`fit_gbm`: gradient-boosted trees on the features (scikit-learn); one model for all
  coalitions, piecewise constant in the log-odds.
- :func:`fit_coalition_logistic`: a separate logistic regression per presence pattern (one-hot
  pattern x features, plus given feature products), fitted jointly by
  scikit-learn. Nothing is shared between coalitions, and each is linear in the log-odds, as
  the generative story is in its factors: the well-specified learner.
- :func:`fit_mlp`: a small MLP trained the way the demo heads are (AdamW, cosine schedule, batch
  32, modality dropout redrawn each epoch); one network for all coalitions, as every head is.

Each ``fit_*`` returns ``predict(rows, shown) -> float64[len(rows)]`` log-odds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class FloorData:
    """One seed's learning problem (arrays over the cache's stays).

    Attributes:
        features: ``(rows, shown) -> float[len(rows), F]`` what the shown modalities reveal.
        has: ``bool[N, M]`` natural presence.
        y: ``float[N]`` the task label.
        train: Indices of the train split.
        masks: ``bool[N, M]`` masks, one per copy of the train rows: the natural presence
            first, then MCAR-dropped ones (:func:`mcar_masks`); only the train rows are read.
    """

    features: Callable[[np.ndarray, np.ndarray], np.ndarray]
    has: np.ndarray
    y: np.ndarray
    train: np.ndarray
    masks: list[np.ndarray]


def mcar_masks(has: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``has`` with each present modality dropped at ``rate``, at least one kept per row."""
    shown = has & ~(rng.random(has.shape) < rate)
    for i in np.flatnonzero(~shown.any(1) & has.any(1)):
        shown[i, rng.choice(np.flatnonzero(has[i]))] = True
    return shown


def pattern_index(shown: np.ndarray) -> np.ndarray:
    """Presence pattern of each row as an integer in ``[0, 2^M)`` (bit m = modality m shown)."""
    return shown.astype(np.int64) @ (1 << np.arange(shown.shape[1]))


def coalition_design(x: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """One-hot presence pattern and, per pattern, its own copy of ``x`` (zero in other blocks).

    ``(N, F), (N, M) -> (N, 2^M * (F + 1))``: a linear model on this is a separate linear model
    per coalition.
    """
    n, m = shown.shape
    onehot = np.zeros((n, 2**m))
    onehot[np.arange(n), pattern_index(shown)] = 1.0
    blocks = onehot[:, :, None] * x[:, None, :]  # (N, 2^M, F)
    return np.column_stack([onehot, blocks.reshape(n, -1)])


def _train_xy(data: FloorData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = data.train
    x = np.vstack([data.features(rows, s[rows]) for s in data.masks])
    shown = np.vstack([s[rows] for s in data.masks])
    return x, shown, np.concatenate([data.y[rows]] * len(data.masks))


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def fit_gbm(data: FloorData, seed: int = 0) -> Predict:
    """Gradient-boosted trees on the features of every train copy."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, _, y = _train_xy(data)
    model = HistGradientBoostingClassifier(
        max_iter=400,
        learning_rate=0.03,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        random_state=seed,
    ).fit(x, y)
    return lambda rows, shown: _log_odds(model.predict_proba(data.features(rows, shown))[:, 1])


def fit_coalition_logistic(
    data: FloorData,
    seed: int = 0,
    c: float = 1.0,
    products: tuple[int, slice] | None = None,
) -> Predict:
    """A logistic regression per presence pattern (:func:`coalition_design`), L2 strength 1/c.

    Args:
        products: ``(j, cols)``: feature j times each feature in ``cols`` is added to the
            features, so that an interaction of the outcome can be expressed (the floor passes
            the EHR's infection and the CXR and note columns: the pulmonary x infection term).
    """
    from sklearn.linear_model import LogisticRegression

    def design(x, shown):
        if products is not None:
            j, cols = products
            x = np.column_stack([x, x[:, [j]] * x[:, cols]])
        return coalition_design(x, shown)

    x, shown, y = _train_xy(data)
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(design(x, shown), y)

    def predict(rows, shown):
        return model.decision_function(design(data.features(rows, shown), shown)).astype(float)

    return predict


def fit_mlp(
    data: FloorData,
    seed: int = 0,
    epochs: int = 6,
    dropout_rate: float = 0.3,
    hidden: int = 64,
    lr: float = 2e-3,
    batch_size: int = 32,
) -> Predict:
    """An MLP (2 GELU layers, dropout 0.1) trained like the demo heads.

    AdamW (weight decay 1e-2), cosine schedule over every step, batch 32, and a fresh MCAR
    modality-dropout mask (``dropout_rate``, at least one kept) per row each epoch, as
    ``train.modality_dropout`` draws them.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = data.train
    width = data.features(rows[:1], data.has[rows[:1]]).shape[1]
    net = torch.nn.Sequential(
        torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, 1),
    )  # fmt: skip
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * -(-len(rows) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    y = torch.tensor(data.y[rows], dtype=torch.float32)
    net.train()
    for _ in range(epochs):
        shown = mcar_masks(data.has[rows], dropout_rate, rng)
        x = torch.tensor(data.features(rows, shown), dtype=torch.float32)  # (n, F)
        for b in torch.randperm(len(rows)).split(batch_size):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[b])[:, 0], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()

    def predict(rows, shown):
        with torch.no_grad():
            x = torch.tensor(data.features(rows, shown), dtype=torch.float32)
            return net(x)[:, 0].double().numpy()

    return predict
