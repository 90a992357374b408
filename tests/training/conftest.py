"""Shared fixtures of the training tests: a toy cache, a temp MLflow store, one CPU thread."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from clinical_moe.testing import write_toy_cache

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "cache"
    write_toy_cache(path, n_stays=160)
    return path


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised, empty SQLite MLflow store: copying it skips seconds of schema migrations."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def new_store(mlflow_template):
    """``new_store(dir)`` -> the URI of a fresh MLflow store at ``dir/mlflow.db``."""

    def make(directory: Path) -> str:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_template, directory / "mlflow.db")
        return f"sqlite:///{directory}/mlflow.db"

    return make


@pytest.fixture(scope="session")
def shared_uri(mlflow_template, tmp_path_factory) -> str:
    """One store for in-process runs that use distinct run names."""
    directory = tmp_path_factory.mktemp("mlflow_shared")
    shutil.copyfile(mlflow_template, directory / "mlflow.db")
    return f"sqlite:///{directory}/mlflow.db"


def tiny_overrides(cache: Path, tmp: Path, uri: str | None = None, **extra) -> list[str]:
    """Overrides that point a tiny config at the toy cache and temp dirs, and keep it short."""
    out = {
        "data.cache_dir": str(cache),
        "train.checkpoint_dir": str(tmp / "ckpt"),
        "tracking.uri": uri or f"sqlite:///{tmp}/mlflow.db",
        "tracking.log_model": "false",
        "train.num_threads": "1",
        **extra,
    }
    return [f"{k}={v}" for k, v in out.items()]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINICAL_MOE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


PYTHON = sys.executable
