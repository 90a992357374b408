"""The evaluation's ceiling per point: synthetic truth gives one, real data none (issue 12)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from clinical_moe.config import EvalConfig
from clinical_moe.data.synthetic import sample_truth
from clinical_moe.evaluation.ceiling import ceiling_table
from clinical_moe.evaluation.context import EvalContext
from clinical_moe.evaluation.grid import _masks, _records
from clinical_moe.missingness import grid_specs

MODS = ("ehr", "cxr", "ecg", "notes")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    stays = sample_truth(2500, 5)
    (root / "truth").mkdir()
    stays.drop(columns="observed_risk").to_csv(root / "truth" / "stays.csv.gz", index=False)
    test = stays[stays["in_ihm48"] == 1].reset_index(drop=True)
    rows = test[["stay_id", "true_risk"]]
    dataset = SimpleNamespace(
        store=SimpleNamespace(summary={"data_root": str(root), "task": "ihm48"}), rows=rows
    )
    ctx = EvalContext(
        ids=test["stay_id"].to_numpy(np.int64),
        present=test[[f"has_{m}" for m in MODS]].to_numpy(bool),
        labels=test["label_mortality"].to_numpy(),
        modalities=MODS,
        covariates={"severity": test["severity"].to_numpy(), "age": test["age"].to_numpy(float)},
    )
    return dataset, ctx, test


def test_ceiling_per_point(synthetic):
    dataset, ctx, test = synthetic
    cfg = EvalConfig(mechanisms=["mcar", "mar", "mnar"], rates=[0.0, 0.5])
    specs = grid_specs(cfg.mechanisms, cfg.rates, MODS, True)
    masks, index = _masks(specs, ctx, cfg, 0)
    table, refs, note = ceiling_table(specs, masks, index, ctx, cfg, dataset, 0)
    assert "ceiling from" in note
    t = table.set_index("point")
    nat = t.loc["natural"]
    assert nat["ceiling_auroc"] <= nat["oracle_auroc"]
    assert 0.9 < nat["ceiling_over_oracle"] < 1.0
    # the truth file had no observed_risk: it is recomputed, and MCAR 0 is the natural ceiling
    assert t.loc["mcar@0.00", "ceiling_auroc"] == pytest.approx(nat["ceiling_auroc"], abs=1e-12)
    assert t.loc["mcar@0.50", "ceiling_auroc"] < nat["ceiling_auroc"]
    assert t.loc["pattern:ehr", "ceiling_auroc"] < nat["ceiling_auroc"]
    assert "approximate" in t.loc["mar@0.50", "ceiling_note"]
    assert np.isfinite(t.loc["mnar@0.50", "ceiling_auroc"])
    # the AUROC row of a run carries the ratios; other metrics do not
    rows = _records(
        {"point": "natural"},
        {"auroc": {"value": 0.8}, "auprc": {"value": 0.5}},
        refs["natural"],
    )
    assert rows[0]["auroc_over_ceiling"] == pytest.approx(0.8 / nat["ceiling_auroc"])
    assert rows[0]["auroc_over_oracle"] == pytest.approx(0.8 / nat["oracle_auroc"])
    assert "auroc_over_ceiling" not in rows[1]


def test_real_data_has_no_ceiling(synthetic, tmp_path):
    _, ctx, _ = synthetic
    dataset = SimpleNamespace(store=SimpleNamespace(summary={"data_root": str(tmp_path)}))
    cfg = EvalConfig(mechanisms=["mcar"], rates=[0.5])
    specs = grid_specs(cfg.mechanisms, cfg.rates, MODS, False)
    masks, index = _masks(specs, ctx, cfg, 0)
    table, refs, note = ceiling_table(specs, masks, index, ctx, cfg, dataset, 0)
    assert table.empty and refs == {} and "no ceiling" in note
    row = _records({"point": "natural"}, {"auroc": {"value": 0.8}}, refs.get("natural"))[0]
    assert math.isnan(row.get("auroc_over_ceiling", math.nan))


def test_rate_plot_draws_the_ceiling(tmp_path):
    import pandas as pd

    from clinical_moe.evaluation.plots import metric_vs_rate

    grid = pd.DataFrame(
        {
            "run": ["a", "a"],
            "mechanism": ["mcar", "mcar"],
            "metric": ["auroc", "auroc"],
            "rate": [0.0, 0.5],
            "value": [0.8, 0.7],
            "ci_low": [0.75, 0.65],
            "ci_high": [0.85, 0.75],
            "ceiling_auroc": [0.85, 0.8],
        }
    )
    assert metric_vs_rate(grid, tmp_path / "r.png", "auroc", 0.9).is_file()
