"""The logged model as MLflow serves it, and a resume in the final phase (issues 14 and 15)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipelines import train as train_pipeline

from .conftest import CONFIGS, REPO, tiny_overrides


def train_logged(toy_cache, tmp_path, uri, name, *flags, **extra):
    args = [
        "--config",
        str(CONFIGS / "tiny" / "concat.yaml"),
        "--quiet",
        *flags,
        *tiny_overrides(
            toy_cache,
            tmp_path,
            uri,
            **{
                "tracking.run_name": name,
                "tracking.log_model": "true",
                "train.epochs": 1,
                "train.max_steps_per_epoch": 2,
                **extra,
            },
        ),
    ]
    assert train_pipeline.main(args) == 0


def run_and_models(uri, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("clinical_moe")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    models = [
        m
        for m in client.search_logged_models([exp.experiment_id])
        if m.source_run_id in {r.info.run_id for r in runs}
    ]
    return client, runs, models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request(toy_cache, tmp_path, new_store):
    import mlflow

    uri = new_store(tmp_path)
    train_logged(toy_cache, tmp_path, uri, "served")
    _, _, (model,) = run_and_models(uri, "served")
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(tmp_path / "m"))

    from clinical_moe.data.dataset import CachedDataset, Collator
    from clinical_moe.training.export import flat_inputs

    ds = CachedDataset(toy_cache, "test")
    example = flat_inputs(Collator(ds)([ds[i] for i in range(3)]))
    expected = mlflow.pyfunc.load_model(local).predict(example)

    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        # the server starts `uvicorn` through the shell: the venv's bin first on PATH
        "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [str(mlflow_cli), "models", "serve", "-m", local, "--env-manager", "local"]
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        body = json.dumps({"inputs": {k: v.tolist() for k, v in example.items()}}).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, f"no answer from mlflow models serve: {proc.poll()}"
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, rtol=1e-4)
    finally:  # the whole process group: the CLI's uvicorn child included
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_resume_in_the_final_phase_logs_metrics_and_model_once(toy_cache, tmp_path, new_store):
    """A kill after the final metrics and the model were logged, before the run was marked
    finished: ``--resume`` must not log them a second time."""
    uri = new_store(tmp_path)
    train_logged(toy_cache, tmp_path, uri, "final")
    run_file = tmp_path / "ckpt" / "final" / "run.json"
    info = json.loads(run_file.read_text())
    assert info["finished"] and info["final_logged"] and info["model_logged"]
    del info["finished"]  # the state a kill before the very last write leaves
    run_file.write_text(json.dumps(info))
    train_logged(toy_cache, tmp_path, uri, "final", "--resume")
    client, (run,), models = run_and_models(uri, "final")
    assert run.info.status == "FINISHED" and len(models) == 1
    assert len(client.get_metric_history(run.info.run_id, "test_auroc")) == 1
    assert client.get_run(run.info.run_id).data.metrics["best_epoch"] == 1  # 1-based
