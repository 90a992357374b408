"""End to end: two tiny trained runs -> ``clinical-moe evaluate`` -> tables, plots, HTML, MLflow."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clinical_moe.config import EvalConfig
from clinical_moe.evaluation import IncomparableRunsError, evaluate_runs, run_grid
from clinical_moe.evaluation.inference import predict_under_masks
from clinical_moe.metrics import probabilities
from clinical_moe.missingness import mcar
from clinical_moe.runs import load_run
from pipelines import cli
from pipelines import evaluate as evaluate_pipeline

from .conftest import HEADS

SMALL = ["--rates", "0", "0.5", "0.9", "--mechanisms", "mcar", "mar", "mnar", "--bootstrap", "50"]
TABLES = ("grid.csv", "natural.csv", "runs.csv", "oracle.csv")


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.fixture(scope="module")
def loaded(trained_runs, eval_store):
    return [load_run(run_id=trained_runs[h], tracking_uri=eval_store) for h in HEADS]


def test_masked_tokens_equal_a_model_call_on_the_masked_batch(loaded):
    """Encoders once + masked tokens must give what the model gives on batch.with_present(mask)."""
    from clinical_moe.data.dataset import Collator

    test = loaded[0].data.test
    masks = np.stack([test.present, mcar(test.present, 0.6, seed=0, ids=test.rows["stay_id"])])
    batch = Collator(test)([test[i] for i in range(len(test))])
    for run in loaded:
        fast = predict_under_masks(run.model, test, masks, run.data.task, batch_size=16)
        with torch.no_grad():
            slow = run.model(batch.with_present(torch.from_numpy(masks[1]))).logits
        assert np.allclose(fast[1], probabilities(slow, run.data.task), atol=1e-5)
        assert not np.allclose(fast[0], fast[1]), "dropping modalities changed nothing"


def test_cli_compares_two_runs_and_is_reproducible(
    trained_runs, eval_store, tmp_path, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", eval_store)
    ids = [trained_runs[h] for h in HEADS]
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        argv = [
            "evaluate",
            "--run-id",
            ids[0],
            "--run-id",
            ids[1],
            *SMALL,
            "--out",
            str(out),
            "--quiet",
        ]
        assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert str(outs[1].resolve()) in printed and "MLflow" in printed

    for name in (
        *TABLES,
        "grid.parquet",
        "natural.parquet",
        "masks.parquet",
        "summary.md",
        "report.html",
        "auroc_vs_rate.png",
        "patterns.png",
        "natural_patterns.png",
    ):
        assert (outs[0] / name).is_file(), name
    for name in (*TABLES, "masks.parquet", "grid.parquet"):  # identical numbers twice
        a, b = (
            pd.read_parquet(o / name) if name.endswith("parquet") else pd.read_csv(o / name)
            for o in outs
        )
        pd.testing.assert_frame_equal(a, b, check_exact=True)

    grid = pd.read_csv(outs[0] / "grid.csv")
    assert set(grid["head"]) == set(HEADS)
    assert set(grid["metric"]) == {"auroc", "auprc", "f1", "ece", "brier"}
    points = set(grid["point"])
    assert {"natural", "mcar@0.50", "mar@0.90", "mnar@0.50", "pattern:ehr+notes"} <= points
    assert len([p for p in points if p.startswith("pattern:")]) == 15
    rows = grid[grid["metric"] == "auroc"]
    ok = rows["value"].notna()
    assert (
        (rows.loc[ok, "ci_low"] <= rows.loc[ok, "value"] + 1e-12)
        & (rows.loc[ok, "value"] <= rows.loc[ok, "ci_high"] + 1e-12)
    ).all()
    # identical masks for both runs: same n / prevalence / kept fraction at every point
    per_point = grid.groupby("point")[["n", "prevalence", "kept_fraction"]].nunique()
    assert (per_point == 1).all().all()
    mcar_kept = grid[grid["mechanism"] == "mcar"].groupby("rate")["kept_fraction"].first()
    assert mcar_kept.is_monotonic_decreasing and mcar_kept.iloc[-1] < 0.5
    # natural point = rate 0 of every mechanism
    nat = rows[rows["point"] == "natural"].set_index("run")["value"]
    zero = rows[rows["point"] == "mcar@0.00"].set_index("run")["value"]
    pd.testing.assert_series_equal(nat, zero, check_names=False)

    # oracle from the toy cache's true risk, on the same test stays
    oracle = pd.read_csv(outs[0] / "oracle.csv").set_index("metric")
    test = load_run(run_id=ids[0], tracking_uri=eval_store).data.test
    expected = roc_auc_score(test.labels[:, 0], test.rows["true_risk"])
    assert oracle.at["auroc", "value"] == pytest.approx(expected)

    html = (outs[0] / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img" in html
    masks = pd.read_parquet(outs[0] / "masks.parquet")
    assert set(masks.columns) == {"point", "stay_id", "has_ehr", "has_cxr", "has_ecg", "has_notes"}
    assert set(masks["stay_id"]) == set(test.rows["stay_id"])

    client = MlflowClient(eval_store)
    runs = client.search_runs(
        [client.get_run(ids[0]).info.experiment_id], "tags.evaluation = 'missingness'"
    )
    assert len(runs) == 2  # one comparison run per invocation
    parent = runs[0]
    assert set(parent.data.tags["compared_run_ids"].split(",")) == set(ids)
    assert {
        "evaluation/grid.csv",
        "evaluation/report.html",
        "evaluation/auroc_vs_rate.png",
    } <= artifact_paths(client, parent.info.run_id)
    assert any(k.startswith("eval/") and k.endswith("/natural/auroc") for k in parent.data.metrics)
    for run_id in ids:  # each compared run also holds its own metrics (sortable in the UI)
        assert "eval/natural/auroc" in client.get_run(run_id).data.metrics


def test_single_run_logs_into_the_evaluated_run(trained_runs, eval_store, tmp_path):
    from mlflow.tracking import MlflowClient

    run_id = trained_runs[HEADS[0]]
    grid = evaluate_pipeline.evaluate(
        run_ids=[run_id],
        out=tmp_path / "one",
        tracking_uri=eval_store,
        rates=[0.0, 0.5],
        mechanisms=["mcar", "mnar_content"],
        bootstrap=20,
        patterns=False,
    )
    assert grid.attrs["mlflow_run_id"] == run_id
    assert set(grid["mechanism"]) == {"natural", "mcar", "mnar_content"}
    client = MlflowClient(eval_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "evaluation/summary.md" in artifact_paths(client, run_id)
    assert "eval/mcar/auroc" in run.data.metrics
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert meta["eval_config"]["rates"] == [0.0, 0.5] and meta["distinct_masks"] >= 2


def test_runs_on_different_caches_are_refused(trained_runs, other_cache):
    ckpt = f"{trained_runs['_checkpoints']}/eval-{HEADS[1]}/best.pt"
    a = load_run(checkpoint=f"{trained_runs['_checkpoints']}/eval-{HEADS[0]}/best.pt")
    b = load_run(checkpoint=ckpt, cache_dir=other_cache)
    with pytest.raises(IncomparableRunsError, match="different caches"):
        evaluate_runs([a, b], EvalConfig(rates=[0.0], bootstrap=0, patterns=False))


def test_grid_is_deterministic_and_seed_dependent(loaded):
    cfg = EvalConfig(mechanisms=["mcar"], rates=[0.5], bootstrap=30, patterns=False)
    a = run_grid(loaded[:1], cfg)
    b = run_grid(loaded[:1], cfg)
    c = run_grid(loaded[:1], cfg, seed=1)
    pd.testing.assert_frame_equal(a.grid, b.grid, check_exact=True)
    pd.testing.assert_frame_equal(a.masks, b.masks, check_exact=True)
    assert not a.masks.equals(c.masks)
