"""Report helpers: small-n notes and paired AUROC differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clinical_moe.evaluation.paired import paired_auroc_rows
from clinical_moe.evaluation.report import paired_table, small_n_note


def test_small_n_note_flags_few_stays_or_positives():
    assert small_n_note(14, 3) == "n=14, 3 positives: unreliable"
    assert small_n_note(500, 4) == "n=500, 4 positives: unreliable"
    assert small_n_note(500, 495) != ""  # few negatives
    assert small_n_note(60, 1) == "n=60, 1 positive: unreliable"
    assert small_n_note(500, 60) == ""
    assert small_n_note(20, None) == "n=20: unreliable"


def test_paired_differences_match_aurocs_and_share_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = y + rng.normal(0, 1.0, 300)
    b = y + rng.normal(0, 1.5, 300)
    (row,) = paired_auroc_rows("natural", y, {"a": a, "b": b}, "binary", 200, [0, 1])
    assert row["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    assert row["n"] == 300 and row["n_pos"] == int(y.sum())
    (same,) = paired_auroc_rows("natural", y, {"a": a, "c": a.copy()}, "binary", 200, [0, 1])
    assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0  # paired
    rows = paired_auroc_rows("p", y, {"a": a, "b": b, "c": a}, "binary", 50, 3)
    assert [(r["run_a"], r["run_b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    table = paired_table(pd.DataFrame(rows))
    assert list(table.columns) == ["n", "positives", "a − b", "a − c", "b − c", "caution"]
    assert table.loc["p", "a − c"].startswith("+0.000 [+0.000, +0.000]")
