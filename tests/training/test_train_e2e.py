"""End-to-end training of every registered head on the toy cache, tracked in a temp MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import clinical_moe
from clinical_moe.config import load_config
from clinical_moe.training.checkpoint import load_checkpoint
from pipelines import train as train_pipeline

from .conftest import CONFIGS, tiny_overrides

MOE_HEADS = {"fusemoe", "flex_moe", "conf_smoe"}


@pytest.fixture
def mlflow_uri(shared_uri) -> str:
    return shared_uri


def finished_run(uri: str, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("clinical_moe")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, f"expected one run named {run_name}, got {len(runs)}"
    return client, runs[0]


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.mark.parametrize("head", clinical_moe.list_models())
def test_every_head_has_a_paper_and_a_tiny_config(head):
    for path in (CONFIGS / f"{head}.yaml", CONFIGS / "tiny" / f"{head}.yaml"):
        assert path.is_file(), f"missing config {path}"
        cfg = load_config(path)
        assert cfg.model.name == head
        assert cfg.data.cache_dir == "runs/demo/cache"  # from the included data config


@pytest.mark.parametrize("head", clinical_moe.list_models())
def test_tiny_training_run_is_tracked(head, toy_cache, tmp_path, mlflow_uri):
    name = f"e2e-{head}"
    args = [
        "--config",
        str(CONFIGS / "tiny" / f"{head}.yaml"),
        "--quiet",
        *tiny_overrides(
            toy_cache,
            tmp_path,
            mlflow_uri,
            **{"tracking.run_name": name, "train.max_steps_per_epoch": 3},
        ),
    ]
    assert train_pipeline.main(args) == 0

    client, run = finished_run(mlflow_uri, name)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in (
        "train_loss",
        "train_task_loss",
        "train_aux_loss",
        "val_auroc",
        "val_auprc",
        "val_f1",
        "val_loss",
        "best_val_loss",
        "test_loss",
        "lr",
        "train_samples_per_s",
    ):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2  # one per epoch
    if head in MOE_HEADS:  # the logged routing statistic is the last model's, on val
        from torch.utils.data import DataLoader

        from clinical_moe.data.dataset import Collator
        from clinical_moe.runs import load_run
        from clinical_moe.training.engine import predict
        from clinical_moe.training.routing_stats import RoutingStats

        last = tmp_path / "ckpt" / name / "last.pt"
        loaded = load_run(checkpoint=last, tracking_uri=mlflow_uri)
        stats = RoutingStats(loaded.model.modalities)
        loader = DataLoader(loaded.data.val, batch_size=64, collate_fn=Collator(loaded.data.val))
        predict(loaded.model, loader, "cpu", routing=stats)
        again = stats.compute()["routing/layer0/load_entropy"]
        assert metrics["routing/layer0/load_entropy"] == pytest.approx(again, abs=1e-6)
    if head == "i2moe":
        assert any(k.startswith("routing/interaction_weights/") for k in metrics)
    params = run.data.params
    assert params["model.name"] == head and len(params["data.manifest_sha256"]) == 64
    assert params["data.stays.train"] == "94" and "data.present.cxr" in params
    assert run.data.tags["head"] == head and run.data.tags["task"] == "binary"
    assert "git_commit" in run.data.tags
    assert {"config.yaml", "data/summary.json", "checkpoints/best.pt"} <= artifact_paths(
        client, run.info.run_id
    )

    ckpt = tmp_path / "ckpt" / name
    last = load_checkpoint(ckpt / "last.pt")  # weights_only=True
    assert last["run_id"] == run.info.run_id and last["epoch"] == 2 and last["step"] == 6
    assert last["position"] == 0 and set(last["early_stopping"]) >= {"best", "bad"}


def test_logged_model_has_a_signature_and_predicts(toy_cache, tmp_path, mlflow_uri):
    import mlflow

    name = "e2e-logged-model"
    args = [
        "--config",
        str(CONFIGS / "tiny" / "concat.yaml"),
        "--quiet",
        *tiny_overrides(
            toy_cache,
            tmp_path,
            mlflow_uri,
            **{
                "tracking.run_name": name,
                "tracking.log_model": "true",
                "train.epochs": 1,
                "train.max_steps_per_epoch": 2,
            },
        ),
    ]
    assert train_pipeline.main(args) == 0
    client, run = finished_run(mlflow_uri, name)
    models = client.search_logged_models([run.info.experiment_id])
    model = next(m for m in models if m.source_run_id == run.info.run_id)
    mlflow.set_tracking_uri(mlflow_uri)
    info = mlflow.models.get_model_info(model.model_uri)
    inputs = info.signature.inputs.input_names()
    assert inputs[0] == "present" and "ehr.values" in inputs and "notes.input_ids" in inputs
    assert model.name == "concat-e2e-logged-model"  # per head and run, not "model"
    loaded = mlflow.pyfunc.load_model(model.model_uri)  # a model from code: nothing unpickled
    from clinical_moe.data.dataset import CachedDataset, Collator
    from clinical_moe.runs import load_run
    from clinical_moe.serving import input_arrays
    from clinical_moe.training.export import flat_inputs

    ds = CachedDataset(toy_cache, "test")
    best = load_run(run_id=run.info.run_id, tracking_uri=mlflow_uri)
    for n in (5, 2):  # two batches, two padded lengths: the signature fixes none of them
        example = flat_inputs(Collator(ds)([ds[i] for i in range(n)]))
        probs = loaded.predict(example)
        batch = Collator(ds)([ds[i] for i in range(n)])
        with torch.no_grad():  # the served model equals the best checkpoint's own model
            native = torch.sigmoid(best.model(batch).logits[:, 0]).numpy()
        np.testing.assert_allclose(probs, native, rtol=1e-5, atol=1e-6)
    frame = pd.DataFrame([{k: v[i] for k, v in example.items()} for i in range(2)])
    np.testing.assert_allclose(loaded.predict(input_arrays(frame)), probs, rtol=1e-5)
    np.testing.assert_allclose(loaded.unwrap_python_model().predict(None, frame), probs, rtol=1e-5)
    local = Path(mlflow.artifacts.download_artifacts(model.model_uri))
    assert not list(local.rglob("*.pkl")) and (local / "artifacts" / "weights.pt").is_file()
    reqs = (local / "requirements.txt").read_text()
    assert "clinical-moe==" in reqs and "mlflow==" in reqs


@pytest.mark.parametrize("head", clinical_moe.list_models())
def test_paper_config_builds_and_runs_a_forward_pass(head, toy_cache):
    """Paper-size head options are valid values, not only valid names."""
    from clinical_moe.data.dataset import Collator
    from clinical_moe.training.engine import build_data, build_model

    cfg = load_config(CONFIGS / f"{head}.yaml", [f"data.cache_dir={toy_cache}"])
    data = build_data(cfg, toy_cache)
    model = build_model(cfg, data).eval()
    batch = Collator(data.val)([data.val[i] for i in range(2)])
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape == (2, 1) and bool(torch.isfinite(out.logits).all())


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_multilabel_and_multiclass_caches_train(task, tmp_path, shared_uri):
    """The task follows the cache's label columns; ConfSMoE receives it as its ``task`` option."""
    import json

    import pandas as pd

    from clinical_moe.testing import write_toy_cache

    cache = tmp_path / "cache"
    write_toy_cache(cache, n_stays=80)
    manifest = pd.read_parquet(cache / "manifest.parquet")
    rng = np.random.default_rng(0)
    summary = json.loads((cache / "summary.json").read_text())
    if task == "multilabel":
        manifest["label2"] = (rng.random(len(manifest)) < 0.5).astype(np.float32)
        summary["label_columns"] = ["label", "label2"]
    else:
        manifest["label"] = rng.integers(0, 3, len(manifest)).astype(np.float32)
    manifest.to_parquet(cache / "manifest.parquet")
    (cache / "summary.json").write_text(json.dumps(summary))

    name = f"task-{task}"
    args = [
        "--config",
        str(CONFIGS / "tiny" / "conf_smoe.yaml"),
        "--quiet",
        *tiny_overrides(
            cache,
            tmp_path,
            shared_uri,
            **{"tracking.run_name": name, "train.epochs": 1, "train.max_steps_per_epoch": 2},
        ),
    ]
    assert train_pipeline.main(args) == 0
    _, run = finished_run(shared_uri, name)
    assert run.data.tags["task"] == task
    assert np.isfinite(run.data.metrics["val_loss"]) and "val_f1" in run.data.metrics
    head = load_checkpoint(tmp_path / "ckpt" / name / "last.pt")["model"]["head.out.weight"]
    assert head.shape[0] == (2 if task == "multilabel" else 3)
