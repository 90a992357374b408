"""Simulated missingness: rates, reproducibility, invariants and the dependence of MAR / MNAR."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr

from clinical_moe import missingness as mx
from clinical_moe.training import sampling


def natural(n: int = 4000, m: int = 4, p: float = 0.75, seed: int = 0) -> np.ndarray:
    """A natural presence mask with >= 1 modality per row and some rows with everything."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, m)) < p
    present[~present.any(1), 0] = True
    return present


def context(present: np.ndarray, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    n, m = present.shape
    return {
        "ids": 30_000_000 + rng.permutation(n * 3)[:n],
        "covariate": rng.normal(size=n),
        "labels": (rng.random(n) < 0.3).astype(float),
        "content": np.where(present, rng.normal(size=(n, m)), np.nan),
        "modalities": tuple(f"m{i}" for i in range(m)),
    }


ALL = ("mcar", "mar", "mnar", "mnar_content")


@pytest.mark.parametrize("mechanism", ALL)
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_masks_only_remove_and_keep_one(mechanism, rate):
    present = natural()
    mask = mx.simulate(mechanism, present, rate, seed=0, **context(present))
    assert mask.dtype == bool and mask.shape == present.shape
    assert not (mask & ~present).any(), "a never-observed modality was revealed"
    assert mask.any(1).all(), "a sample lost every modality"
    if rate == 0.0:
        assert (mask == present).all()
    if rate == 1.0:
        assert (mask.sum(1) == 1).all()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_mcar_rate_within_binomial_bound(rate):
    present = natural(n=5000)
    mask = mx.mcar(present, rate, seed=7, ids=np.arange(len(present)))
    k = present.sum(1)  # observed per row
    # Expected drops per row: k * rate minus the rescue of rows that drew every modality.
    expected = float((k * rate - rate**k * (k > 0)).sum()) / present.sum()
    observed = float((present & ~mask).sum()) / present.sum()
    sd = np.sqrt(rate * (1 - rate) / present.sum())
    assert abs(observed - expected) < 4 * sd, (observed, expected, sd)


def test_per_modality_rates():
    present = np.ones((6000, 3), bool)
    rates = [0.0, 0.2, 0.5]
    mask = mx.mcar(present, rates, seed=0)
    dropped = 1 - mask.mean(0)
    assert dropped[0] == 0.0
    for j in (1, 2):  # all-dropped rows are impossible here (column 0 always stays)
        assert abs(dropped[j] - rates[j]) < 4 * np.sqrt(rates[j] * (1 - rates[j]) / 6000)
    with pytest.raises(ValueError, match="per-modality"):
        mx.mcar(present, [0.1, 0.2], seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mx.mcar(present, 1.5, seed=0)


@pytest.mark.parametrize("mechanism", ALL)
def test_seeded_and_keyed_by_stay_id(mechanism):
    present = natural(n=1000)
    ctx = context(present)
    a = mx.simulate(mechanism, present, 0.4, seed=3, **ctx)
    b = mx.simulate(mechanism, present, 0.4, seed=3, **ctx)
    c = mx.simulate(mechanism, present, 0.4, seed=4, **ctx)
    assert (a == b).all()
    assert (a != c).any()
    # Reordering the stays reorders the masks: a stay's mask does not depend on its row.
    perm = np.random.default_rng(0).permutation(len(present))
    shuffled = {k: (v[perm] if isinstance(v, np.ndarray) else v) for k, v in ctx.items()}
    d = mx.simulate(mechanism, present[perm], 0.4, seed=3, **shuffled)
    assert (d == a[perm]).all()


def test_mcar_mask_of_a_stay_ignores_the_other_stays():
    present = natural(n=500)
    ids = np.arange(500) * 7 + 11
    full = mx.mcar(present, 0.5, seed=0, ids=ids)
    part = mx.mcar(present[100:200], 0.5, seed=0, ids=ids[100:200])
    assert (full[100:200] == part).all()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_patterns_are_exhaustive(m):
    mods = tuple(f"x{i}" for i in range(m))
    patterns = mx.all_patterns(mods)
    assert len(patterns) == 2**m - 1 == len(set(patterns))
    assert all(p and set(p) <= set(mods) for p in patterns)
    for p in patterns:
        assert mx.parse_pattern(mx.pattern_name(p), mods) == p
    specs = mx.grid_specs(["mcar"], [0.0, 0.5], mods, patterns=True)
    assert [s.mechanism for s in specs].count("pattern") == 2**m - 1


def test_pattern_mask_intersects_and_reports_empty_rows():
    mods = ("ehr", "cxr", "ecg", "notes")
    present = natural(n=300, m=4, p=0.5)
    mask = mx.pattern_mask(present, "notes+ehr", mods)
    assert (mask == (present & np.array([True, False, False, True]))).all()
    empty = ~mask.any(1)
    assert empty.any(), "rows without ehr and notes must stay empty (not rescued)"
    assert (empty == ~(present[:, 0] | present[:, 3])).all()
    with pytest.raises(ValueError, match="unknown"):
        mx.pattern_mask(present, "ehr+xray", mods)


def test_mar_depends_on_the_covariate_at_the_requested_rate():
    present = np.ones((6000, 2), bool)
    ctx = context(present)
    mask = mx.mar(present, 0.3, seed=0, covariate=ctx["covariate"], ids=ctx["ids"], strength=1.5)
    dropped = (~mask).astype(float)
    r, p = pearsonr(ctx["covariate"], dropped[:, 1])
    assert r > 0.2 and p < 1e-6
    probs = mx.calibrated_probabilities(present, ctx["covariate"], 0.3, strength=1.5)
    assert np.allclose(probs.mean(0), 0.3, atol=1e-6)
    # no dependence without strength
    flat = mx.mar(present, 0.3, seed=0, covariate=ctx["covariate"], ids=ctx["ids"], strength=0)
    assert abs(pearsonr(ctx["covariate"], (~flat[:, 1]).astype(float))[0]) < 0.06


def test_mnar_depends_on_the_label_and_on_the_content():
    present = np.ones((6000, 3), bool)
    ctx = context(present)
    mask = mx.mnar(present, 0.3, seed=0, labels=ctx["labels"], ids=ctx["ids"])
    drop_pos = (~mask[ctx["labels"] == 1]).mean()
    drop_neg = (~mask[ctx["labels"] == 0]).mean()
    assert drop_pos > drop_neg + 0.2
    mask = mx.mnar(present, 0.3, seed=0, content=ctx["content"], ids=ctx["ids"])
    for j in range(3):  # each modality's own content drives its own missingness
        r, p = pearsonr(ctx["content"][:, j], (~mask[:, j]).astype(float))
        assert r > 0.15 and p < 1e-6
    with pytest.raises(ValueError, match="exactly one"):
        mx.mnar(present, 0.3, seed=0)


def test_dispatcher_errors_and_specs():
    present = natural(n=10)
    with pytest.raises(ValueError, match="unknown missingness mechanism"):
        mx.simulate("mcat", present, 0.1, 0)
    with pytest.raises(ValueError, match="covariate"):
        mx.simulate("mar", present, 0.1, 0)
    assert mx.MissingnessSpec("mcar", 0.3).label == "mcar@0.30"
    assert mx.MissingnessSpec("pattern", 0.0, ("ehr", "notes")).label == "pattern:ehr+notes"
    with pytest.raises(ValueError):
        mx.MissingnessSpec("pattern", 0.0)


def test_train_time_dropout_is_reexported():
    assert mx.modality_dropout is sampling.modality_dropout
