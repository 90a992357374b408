"""The faithfulness floor's learners (benchmarks/floor_learners.py) on toy games with known answers."""

import numpy as np
import pytest

from benchmarks.floor_learners import (
    FloorData,
    coalition_design,
    fit_coalition_logistic,
    fit_mlp,
    mcar_masks,
    pattern_index,
)


def test_coalition_design_puts_each_row_in_its_own_patterns_block():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    shown = rng.random((50, 2)) < 0.6
    d = coalition_design(x, shown)
    assert d.shape == (50, 4 * (1 + 3))
    onehot, blocks = d[:, :4], d[:, 4:].reshape(50, 4, 3)
    pat = pattern_index(shown)
    assert (onehot.argmax(1) == pat).all() and (onehot.sum(1) == 1).all()
    np.testing.assert_array_equal(blocks[np.arange(50), pat], x)
    blocks[np.arange(50), pat] = 0.0
    assert not blocks.any()  # nothing outside the row's own block


def _toy(n=6000, seed=0):
    """Two modalities whose evidence means something different in each coalition.

    Shown together the log-odds are ``2 x0 + 2 x1``; x0 shown alone counts *against* the outcome
    (``-1.5 x0``), x1 alone ``+1.5 x1``. One linear function shared by all coalitions cannot be
    right in both; a logistic regression per pattern can.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    has = np.ones((n, 2), bool)
    shown = mcar_masks(has, 0.5, rng)
    truth = np.select(
        [shown.all(1), shown[:, 0]], [2 * x[:, 0] + 2 * x[:, 1], -1.5 * x[:, 0]], 1.5 * x[:, 1]
    )
    y = (rng.random(n) < 1 / (1 + np.exp(-truth))).astype(float)

    def features(rows, s):
        return np.column_stack([x[rows] * s, s.astype(float)])

    # the learners see each row once, under the mask its label was drawn with
    data = FloorData(features=features, has=has, y=y, train=np.arange(n), masks=[shown])
    return data, x


@pytest.mark.parametrize("pattern", [(1, 1), (1, 0), (0, 1)])
def test_logistic_per_pattern_recovers_each_coalitions_own_effect(pattern):
    data, x = _toy()
    predict = fit_coalition_logistic(data)
    rows = np.arange(500)
    shown = np.broadcast_to(np.array(pattern, bool), (500, 2)).copy()
    got = predict(rows, shown)
    want = {(1, 1): 2 * x[rows, 0] + 2 * x[rows, 1], (1, 0): -1.5 * x[rows, 0]}.get(
        pattern, 1.5 * x[rows, 1]
    )
    slope = np.polyfit(want, got, 1)[0]
    assert np.corrcoef(got, want)[0, 1] > 0.98 and 0.8 < slope < 1.2, (pattern, slope)


def test_mlp_learns_a_shared_effect_and_answers_every_coalition():
    rng = np.random.default_rng(1)
    n = 3000
    x = rng.normal(size=(n, 2))
    has = np.ones((n, 2), bool)
    y = (rng.random(n) < 1 / (1 + np.exp(-2.5 * x[:, 0]))).astype(float)
    data = FloorData(
        features=lambda rows, s: np.column_stack([x[rows] * s, s.astype(float)]),
        has=has, y=y, train=np.arange(n), masks=[has],
    )  # fmt: skip
    predict = fit_mlp(data, epochs=3)
    rows = np.arange(1000)
    for pattern in ((1, 1), (1, 0), (0, 1)):
        got = predict(rows, np.broadcast_to(np.array(pattern, bool), (1000, 2)).copy())
        assert got.shape == (1000,) and np.isfinite(got).all()
    full = predict(rows, has[rows])
    assert np.corrcoef(full, x[rows, 0])[0, 1] > 0.9  # it learned the effect, not the prior
