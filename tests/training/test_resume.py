"""kill -9 mid-run, then ``--resume``: same MLflow run, same final weights and metrics."""

from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from clinical_moe.training.checkpoint import load_checkpoint
from clinical_moe.training.engine import KILL_ENV
from pipelines import train as train_pipeline

from .conftest import CONFIGS, PYTHON, REPO, subprocess_env, tiny_overrides

# fusemoe: dropout + noisy gates + modality dropout draw from every RNG stream that is checkpointed.
# 3 epochs x 4 steps; last.pt every 3 steps and at epoch ends.
EXTRA = {
    "train.epochs": 3,
    "train.max_steps_per_epoch": 4,
    "train.checkpoint_every": 3,
    "train.modality_dropout": 0.3,
    "train.ema_decay": 0.5,  # the weight average is checkpointed too
    "train.patience": 5,
    "tracking.run_name": "resume",
}


def cli(tmp, cache, *flags, env=None):
    args = [
        "--config",
        str(CONFIGS / "tiny" / "fusemoe.yaml"),
        "--quiet",
        *flags,
        *tiny_overrides(cache, tmp, f"sqlite:///{tmp}/mlflow.db", **EXTRA),
    ]
    return subprocess.run(
        [PYTHON, "-m", "pipelines.train", *args],
        cwd=REPO,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def runs_of(tmp):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("clinical_moe")
    return client, client.search_runs([exp.experiment_id])  # the store holds this test's runs only


@pytest.fixture(scope="module")
def reference(toy_cache, tmp_path_factory, shared_uri):
    """The uninterrupted run (in-process: saves an interpreter start); shared by both kill points."""
    from mlflow.tracking import MlflowClient

    ref_dir = tmp_path_factory.mktemp("ref")
    extra = {**EXTRA, "tracking.run_name": "resume-reference"}
    args = [
        "--config",
        str(CONFIGS / "tiny" / "fusemoe.yaml"),
        "--quiet",
        *tiny_overrides(toy_cache, ref_dir, shared_uri, **extra),
    ]
    assert train_pipeline.main(args) == 0
    client = MlflowClient(shared_uri)
    exp = client.get_experiment_by_name("clinical_moe")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'resume-reference'")
    return load_checkpoint(ref_dir / "ckpt" / "resume-reference" / "last.pt"), run.data.metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at", [7, 2]
)  # 7: mid-epoch 2, after step 6's checkpoint; 2: before any
def test_kill_and_resume_equals_uninterrupted(kill_at, reference, toy_cache, tmp_path, new_store):
    cut_dir = tmp_path / "cut"
    new_store(cut_dir)
    killed = cli(cut_dir, toy_cache, env=subprocess_env(**{KILL_ENV: str(kill_at)}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    client, runs = runs_of(cut_dir)
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    run_id = runs[0].info.run_id
    ckpt = cut_dir / "ckpt" / "resume"
    if kill_at == 7:
        mid = load_checkpoint(ckpt / "last.pt")
        assert (mid["step"], mid["epoch"], mid["position"]) == (6, 1, 2)  # mid-epoch checkpoint
    else:
        assert not (ckpt / "last.pt").exists()

    resumed = cli(cut_dir, toy_cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, runs = runs_of(cut_dir)
    assert [r.info.run_id for r in runs] == [run_id], "resume must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"

    a, ref = reference
    b = load_checkpoint(ckpt / "last.pt")
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    for key, value in a["ema"].items():
        torch.testing.assert_close(b["ema"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    cut = runs[0].data.metrics
    for key in (
        "best_val_auroc",
        "best_val_loss",
        "test_auroc",
        "test_loss",
        "train_loss",
        "val_loss",
        "routing/layer0/load_entropy",
    ):
        assert cut[key] == pytest.approx(ref[key], abs=1e-5), key
    history = [m.value for m in client.get_metric_history(run_id, "val_loss")]
    assert len(history) >= 3  # every epoch logged (an epoch may be re-logged after a kill)

    # resuming a finished run is a no-op: no new run, nothing re-logged
    again = [
        "--config",
        str(CONFIGS / "tiny" / "fusemoe.yaml"),
        "--quiet",
        "--resume",
        *tiny_overrides(toy_cache, cut_dir, f"sqlite:///{cut_dir}/mlflow.db", **EXTRA),
    ]
    assert train_pipeline.main(again) == 0
    _, runs = runs_of(cut_dir)
    assert len(runs) == 1
    assert len(client.get_metric_history(run_id, "val_loss")) == len(history)
