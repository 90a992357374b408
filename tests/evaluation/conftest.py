"""Fixtures of the evaluation tests: a toy cache, a temp MLflow store, two tiny trained runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinical_moe.testing import write_toy_cache

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
HEADS = ("late", "concat")  # the two fastest heads; the grid code is head-agnostic


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval_toy") / "cache"
    write_toy_cache(path, n_stays=200, seed=3)
    return path


@pytest.fixture(scope="session")
def eval_store(tmp_path_factory) -> str:
    """A fresh SQLite MLflow store (and artifact folder) for this package's runs."""
    from mlflow.tracking import MlflowClient

    directory = tmp_path_factory.mktemp("eval_mlflow")
    uri = f"sqlite:///{directory}/mlflow.db"
    # Artifacts in the temp dir too (a SQLite store defaults them to ./mlruns of the cwd).
    MlflowClient(uri).create_experiment("clinical_moe", artifact_location=str(directory / "art"))
    return uri


@pytest.fixture(scope="session")
def trained_runs(eval_cache, eval_store, tmp_path_factory) -> dict[str, str]:
    """Train one tiny run per head in :data:`HEADS` on the toy cache: ``{head: run_id}``."""
    from clinical_moe.training.checkpoint import CheckpointDir
    from pipelines import train as train_pipeline

    ckpt = tmp_path_factory.mktemp("eval_ckpt")
    out = {}
    for head in HEADS:
        name = f"eval-{head}"
        overrides = {
            "data.cache_dir": str(eval_cache),
            "train.checkpoint_dir": str(ckpt),
            "tracking.uri": eval_store,
            "tracking.log_model": "false",
            "tracking.run_name": name,
            "train.num_threads": "1",
            "train.epochs": "2",
            "train.max_steps_per_epoch": "4",
        }
        args = [
            "--config",
            str(CONFIGS / "tiny" / f"{head}.yaml"),
            "--quiet",
            *[f"{k}={v}" for k, v in overrides.items()],
        ]
        assert train_pipeline.main(args) == 0
        out[head] = CheckpointDir(ckpt / name).read_run()["run_id"]
    out["_checkpoints"] = str(ckpt)
    return out


@pytest.fixture
def other_cache(tmp_path) -> Path:
    """A toy cache with other stays / labels (runs on it cannot be compared with the others)."""
    path = tmp_path / "other_cache"
    write_toy_cache(path, n_stays=200, seed=4)
    return path
