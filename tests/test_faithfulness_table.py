"""The faithfulness summary of ``benchmarks.faithfulness_table``: per head-seed and pooled."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.faithfulness_table import TARGET_METRIC, faithfulness_targets


def _row(head: str, seed: int, value: float, n: int) -> dict:
    return {
        "method": "shapley",
        "metric": TARGET_METRIC,
        "head": head,
        "seed": seed,
        "value": value,
        "ci_low": value - 0.05,
        "ci_high": min(1.0, value + 0.05),
        "n_stays": n,
        "oracle": 1.0,
    }


def test_pooled_top1_weights_each_seed_by_its_stays():
    table = pd.DataFrame(
        [
            _row("a", 0, 1.0, 10),  # 10 of 10
            _row("a", 1, 0.8, 40),  # 32 of 40: the seeds' plain mean (0.90) would pass
            _row("b", 0, 0.95, 60),
            _row("b", 1, 0.90, 60),
        ]
    )
    out = faithfulness_targets(table)
    assert out["every_head_and_seed_top1_ge_0.90"] is False  # a's seed 1
    a, b = out["top1_pooled"]["a"], out["top1_pooled"]["b"]
    assert a["value"] == pytest.approx(42 / 50) and a["n"] == 50 and not a["met"]
    assert b["value"] == pytest.approx(111 / 120) and b["met"] and b["seeds"] == [0, 1]
    lo, hi = a["ci"]
    assert lo < a["value"] < hi and hi - lo < 0.25  # Wilson 95% at n = 50
    assert b["ci"][1] - b["ci"][0] < a["ci"][1] - a["ci"][0]  # more stays, narrower


def test_bench_quality_prints_the_faithfulness_targets(capsys):
    from benchmarks.bench_quality import print_targets

    table = pd.DataFrame([_row("a", 0, 1.0, 10), _row("a", 1, 0.8, 40)])
    print_targets({"targets_ceiling": {}, "targets_faithfulness": faithfulness_targets(table)})
    err = capsys.readouterr().err
    assert "every_head_and_seed_top1_ge_0.90: NOT met" in err
    assert "single-factor top-1, a, seeds pooled: 0.840" in err and "n=50 (NOT met)" in err
