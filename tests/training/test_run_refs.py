"""Runs by name, ``latest`` or id; every train command in a checkpoint folder of its own (issue 14)."""

from __future__ import annotations

import pytest

from clinical_moe.runs import resolve_run
from pipelines import train as train_pipeline
from pipelines.cli import main

from .conftest import CONFIGS, tiny_overrides


def train_once(toy_cache, tmp_path, uri, *flags):
    args = [
        "--config",
        str(CONFIGS / "tiny" / "late.yaml"),
        "--quiet",
        *flags,
        *tiny_overrides(
            toy_cache,
            tmp_path,
            uri,
            **{"tracking.run_name": "refs", "train.epochs": 1, "train.max_steps_per_epoch": 1},
        ),
    ]
    assert train_pipeline.main(args) == 0


@pytest.mark.slow
def test_rerun_gets_its_own_folder_and_runs_resolve(toy_cache, tmp_path, new_store, capsys):
    import mlflow

    uri = new_store(tmp_path)
    train_once(toy_cache, tmp_path, uri)
    train_once(toy_cache, tmp_path, uri)
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["refs", "refs-2"]
    first = (ckpt / "refs" / "run.json").read_text()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("clinical_moe")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"refs", "refs-2"}
    assert resolve_run("latest", uri) == runs["refs-2"]
    assert resolve_run("refs", uri) == runs["refs"]
    assert resolve_run(runs["refs"], uri) == runs["refs"]
    with pytest.raises(LookupError, match="no run named 'nope'"):
        resolve_run("nope", uri)
    # --resume continues the latest folder; the first run's folder is never written again
    train_once(toy_cache, tmp_path, uri, "--resume")
    assert (ckpt / "refs" / "run.json").read_text() == first
    assert sorted(p.name for p in ckpt.iterdir()) == ["refs", "refs-2"]
    capsys.readouterr()
    assert main(["evaluate", "--run", "nope", "--tracking-uri", uri, "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run named 'nope'" in err[0]
