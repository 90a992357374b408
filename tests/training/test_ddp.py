"""Two-process DDP on CPU (gloo) through torchrun: it finishes, and only rank 0 logged."""

from __future__ import annotations

import subprocess

import pytest

from clinical_moe.config import load_config
from clinical_moe.training.checkpoint import load_checkpoint
from clinical_moe.training.distributed import DistInfo
from clinical_moe.training.engine import build_data, build_model, evaluate

from .conftest import CONFIGS, PYTHON, REPO, subprocess_env, tiny_overrides


@pytest.mark.slow
def test_torchrun_two_processes_gloo(toy_cache, tmp_path, new_store):
    # fusemoe: sparse experts leave parameters unused in some steps (find_unused_parameters).
    overrides = tiny_overrides(
        toy_cache,
        tmp_path,
        new_store(tmp_path),
        **{"tracking.run_name": "ddp", "train.max_steps_per_epoch": 3, "train.device": "cpu"},
    )
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipelines.train",
        "--config",
        str(CONFIGS / "tiny" / "fusemoe.yaml"),
        "--quiet",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("clinical_moe")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "only rank 0 may open an MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert "val_auroc" in run.data.metrics and "routing/layer0/load_entropy" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val_auroc")) == 2  # one per epoch
    last = load_checkpoint(tmp_path / "ckpt" / "ddp" / "last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2  # every rank's RNG state kept
    assert last["step"] == 6 and last["run_id"] == run.info.run_id

    # each rank scored half of val; the gathered metrics must equal one process scoring all of it
    cfg = load_config(CONFIGS / "tiny" / "fusemoe.yaml", overrides)
    data = build_data(cfg, toy_cache)
    model = build_model(cfg, data)
    model.load_state_dict(load_checkpoint(tmp_path / "ckpt" / "ddp" / "best.pt")["model"])
    single = evaluate(model, data.val, data, cfg, DistInfo())
    for key in ("val_auroc", "val_loss"):
        assert run.data.metrics[f"best_{key}"] == pytest.approx(single[key], abs=1e-5), key
