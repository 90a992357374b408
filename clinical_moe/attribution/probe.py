"""Encoder probes: how well each encoder's pooled output decodes the factor its modality carries.

For each (modality, factor) pair of ``targets`` (default: CXR -> ``pulmonary``, ECG ->
``cardiac``, EHR -> ``infection`` and ``severity>median``, notes -> ``severity>median``):

1. run ``model.encoders[m]`` on the stays that have modality m, train and test split, and pool
   its output as the masked mean of ``ModalityTokens.tokens`` over ``mask`` (``(B, D)``);
2. fit a standardised logistic regression (scikit-learn ``StandardScaler`` +
   ``LogisticRegression``) on the train stays' pooled outputs against the factor from the
   synthetic corpus's ``truth/stays.csv.gz`` (``severity>median``: severity above the train
   stays' median);
3. report its AUROC on the test stays with a seeded, label-stratified percentile bootstrap CI
   (:func:`clinical_moe.metrics.score_with_ci`).

A linear probe measures what the encoder makes linearly readable, not what a head could learn
from its tokens; 0.5 means the pooled output says nothing about the factor. Stays are capped per
modality (``max_train``, ``max_test``; drawn with ``seed``) to keep the pass over the encoders
short. Real MIMIC has no truth: :func:`truth_factors` then returns None and no probe is run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

FACTORS = ("severity", "cardiac", "pulmonary", "infection")
SEVERITY_HIGH = "severity>median"
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "cxr": ("pulmonary",),
    "ecg": ("cardiac",),
    "ehr": ("infection", SEVERITY_HIGH),
    "notes": (SEVERITY_HIGH,),
}
PROBE_COLUMNS = ["modality", "factor", "n_train", "n_test", "auroc", "ci_low", "ci_high", "note"]


def truth_factors(dataset) -> pd.DataFrame | None:
    """``stay_id`` + latent factors from ``<data_root>/truth/stays.csv.gz`` of a cache, or None.

    Unlike the mortality truth, the factors do not depend on the task, so any synthetic cache
    has them.
    """
    root = dataset.store.summary.get("data_root")
    path = Path(root) / "truth" / "stays.csv.gz" if root else None
    if path is None or not path.is_file():
        return None
    df = pd.read_csv(path, usecols=["stay_id", *FACTORS])
    return df.drop_duplicates("stay_id").astype({"stay_id": "int64"})


def _pick(present: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``cap`` rows where ``present`` is True (sorted)."""
    idx = np.flatnonzero(present)
    if cap is not None and len(idx) > cap:
        idx = np.sort(rng.choice(idx, cap, replace=False))
    return idx


@torch.no_grad()
def pooled_outputs(
    model,
    dataset,
    modalities: tuple[str, ...],
    cap: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Masked-mean pooled encoder outputs of the stays that have each modality.

    Args:
        model: A :class:`~clinical_moe.model.MultimodalModel` (its ``encoders`` are used).
        dataset: A :class:`~clinical_moe.data.dataset.CachedDataset` with the model's modalities.
        modalities: Modalities to pool.
        cap: At most this many stays per modality (drawn with ``seed``); None = all.
        seed: Seed of the draw.
        batch_size: Stays per batch.

    Returns:
        ``{modality: (stay_ids int64[N_m], pooled float32[N_m, D])}``.
    """
    from clinical_moe.data.dataset import Collator

    rng = np.random.default_rng(seed)
    order = list(dataset.modalities)
    picks = {m: _pick(dataset.present[:, order.index(m)], cap, rng) for m in modalities}
    union = np.unique(np.concatenate([np.zeros(0, np.int64), *picks.values()]))
    wanted = {m: set(p.tolist()) for m, p in picks.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids: dict[str, list] = {m: [] for m in modalities}
    feats: dict[str, list] = {m: [] for m in modalities}
    loader = DataLoader(
        Subset(dataset, union.tolist()),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collator(dataset),
    )
    start = 0
    for batch in loader:
        rows_here = union[start : start + batch.batch_size]  # dataset indices of this batch
        start += batch.batch_size
        batch = batch.to(device)
        for name in modalities:
            m = order.index(name)
            keep = [
                i
                for i, r in enumerate(rows_here)
                if int(r) in wanted[name] and bool(batch.present[i, m])
            ]
            if not keep:
                continue
            rows = torch.as_tensor(keep, device=device)
            sub = {k: v.index_select(0, rows) for k, v in batch.inputs[name].items()}
            toks = model.encoders[name](sub)
            w = toks.mask.float().unsqueeze(-1)  # (B_m, T, 1)
            pooled = (toks.tokens * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B_m, D)
            feats[name].append(pooled.float().cpu().numpy())
            ids[name].append(np.asarray(batch.ids, dtype=np.int64)[keep])
    model.train(was_training)
    return {
        m: (
            np.concatenate(ids[m]) if ids[m] else np.zeros(0, np.int64),
            np.concatenate(feats[m]) if feats[m] else np.zeros((0, 0), np.float32),
        )
        for m in modalities
    }


def factor_labels(truth: pd.DataFrame, factor: str, threshold: float) -> pd.Series:
    """``stay_id -> 0/1`` of a factor (``severity>median``: above ``threshold``)."""
    x = truth.set_index("stay_id")
    if factor == SEVERITY_HIGH:
        return (x["severity"] > threshold).astype(int)
    return x[factor].astype(int)


def probe_features(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float, str]:
    """Standardised logistic probe: fit on train, AUROC with a bootstrap CI on test.

    Returns:
        ``(auroc, ci_low, ci_high, note)``; NaN and a note when a split has one class only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from clinical_moe.metrics import score_with_ci

    if len(np.unique(y_train)) < 2 or len(np.unique(y_test)) < 2:
        return np.nan, np.nan, np.nan, "one class only in train or test"
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train, y_train)
    p = clf.predict_proba(x_test)[:, 1]
    s = score_with_ci(y_test, p, metrics=("auroc",), n_boot=n_boot, seed=seed)["auroc"]
    return s["value"], s["ci_low"], s["ci_high"], ""


def probe_encoders(
    model,
    train_dataset,
    test_dataset,
    truth: pd.DataFrame | None = None,
    targets: dict[str, tuple[str, ...]] | None = None,
    max_train: int | None = 3000,
    max_test: int | None = 5000,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Linear probes of every encoder's pooled output for its modality's factors.

    Args:
        model: A trained :class:`~clinical_moe.model.MultimodalModel`.
        train_dataset: Stays the probes are fitted on (e.g. the train split).
        test_dataset: Stays the probes are scored on (e.g. the test split).
        truth: ``stay_id`` + ``severity``, ``cardiac``, ``pulmonary``, ``infection``; None reads
            it from the train cache's corpus (:func:`truth_factors`).
        targets: ``{modality: (factor, ...)}``; default :data:`DEFAULT_TARGETS`, restricted to
            the model's modalities.
        max_train: At most this many train stays per modality (seeded draw).
        max_test: At most this many test stays per modality (seeded draw).
        n_boot: Bootstrap resamples of the AUROC CI.
        seed: Seed of the draws and the bootstrap.
        batch_size: Stays per encoder batch.

    Returns:
        One row per (modality, factor): :data:`PROBE_COLUMNS`. Empty when there is no truth.
    """
    if truth is None:
        truth = truth_factors(train_dataset)
    if truth is None:
        return pd.DataFrame(columns=PROBE_COLUMNS)
    mods = tuple(model.modalities)
    targets = {m: tuple(f) for m, f in (targets or DEFAULT_TARGETS).items() if m in mods}
    train = pooled_outputs(model, train_dataset, tuple(targets), max_train, seed, batch_size)
    test = pooled_outputs(model, test_dataset, tuple(targets), max_test, seed + 1, batch_size)
    truth = truth.drop_duplicates("stay_id")
    known = truth.set_index("stay_id")
    train_ids = np.unique(np.concatenate([v[0] for v in train.values()] or [np.zeros(0)]))
    median = float(known["severity"].reindex(train_ids).median()) if len(train_ids) else 0.0
    rows = []
    for m, factors in targets.items():
        (id_tr, x_tr), (id_te, x_te) = train[m], test[m]
        ok_tr, ok_te = np.isin(id_tr, known.index), np.isin(id_te, known.index)
        for factor in factors:
            y = factor_labels(truth, factor, median)
            y_tr = y.reindex(id_tr[ok_tr]).to_numpy()
            y_te = y.reindex(id_te[ok_te]).to_numpy()
            n_tr, n_te = int(ok_tr.sum()), int(ok_te.sum())
            if n_tr == 0 or n_te == 0:
                auc, lo, hi, note = np.nan, np.nan, np.nan, "no stays with this modality"
            else:
                auc, lo, hi, note = probe_features(
                    x_tr[ok_tr], y_tr, x_te[ok_te], y_te, n_boot, seed
                )
            rows.append(dict(zip(PROBE_COLUMNS, (m, factor, n_tr, n_te, auc, lo, hi, note))))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)
