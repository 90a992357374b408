"""Experiment tracking: a small logger protocol and its MLflow, stdout and null implementations.

The training engine talks to a :class:`RunLogger` only; MLflow is imported lazily inside
:class:`MlflowLogger`, so nothing else in the package depends on it.

Tracking URI, highest priority first: the config key ``tracking.uri``, then the
``MLFLOW_TRACKING_URI`` environment variable, then ``sqlite:///mlflow.db`` (an embedded store in the
working directory; browse it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit ``uri`` > ``$MLFLOW_TRACKING_URI`` > :data:`DEFAULT_URI`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@runtime_checkable
class RunLogger(Protocol):
    """What the training loop needs from a tracker."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_model(
        self, artifacts: dict[str, str], example: Any, output: Any, name: str = "model"
    ) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Drop NaN / inf values (e.g. AUROC of a one-class split) and non-numbers."""
    out = {}
    for k, v in metrics.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[k] = v
    return out


class NullLogger:
    """Logs nothing (non-zero DDP ranks)."""

    run_id: str | None = None

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def log_model(self, artifacts, example, output, name="model"):
        pass

    def close(self, status="FINISHED"):
        pass


class StdoutLogger:
    """Prints metrics as JSON lines and keeps everything in memory (tests, quick looks)."""

    def __init__(self, run_id: str | None = "stdout", echo: bool = True) -> None:
        self.run_id = run_id
        self.echo = echo
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        metrics = _finite(metrics)
        self.metrics.append((step, metrics))
        if self.echo:
            print(json.dumps({"step": step, **{k: round(v, 5) for k, v in metrics.items()}}))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_model(self, artifacts, example, output, name="model"):
        pass

    def close(self, status="FINISHED"):
        pass


def artifact_root_for(uri: str) -> str | None:
    """Artifacts beside a SQLite store (``<db dir>/mlartifacts``), else the server's default.

    MLflow otherwise puts a SQLite store's artifacts in ``./mlruns`` of whatever directory the
    process runs from, which scatters one store's files over several folders.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a SQLite store) when absent."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(uri))


class MlflowLogger:
    """Logs to MLflow; creates a run, or re-opens ``run_id`` to continue a resumed run.

    Args:
        uri: Tracking URI (see :func:`resolve_tracking_uri`).
        experiment: Experiment name (created when absent).
        run_name: Display name of a new run.
        run_id: Existing run to continue (``--resume``).
        log_model: Whether :meth:`log_model` logs the model (off to keep smoke runs fast).
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "clinical_moe",
        run_name: str | None = None,
        run_id: str | None = None,
        log_model: bool = True,
    ) -> None:
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("MLflow tracking needs mlflow: pip install 'mlflow>=3'") from err
        self._mlflow = mlflow
        self.uri = resolve_tracking_uri(uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._log_model = log_model
        if run_id is not None:
            run = self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            self._run_id = run.info.run_id
        else:
            exp_id = ensure_experiment(self.client, experiment, self.uri)
            self._run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        logger.info("MLflow run %s at %s", self._run_id, self.uri)

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self._run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self._run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in _finite(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self._run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self._run_id, k, str(v))

    def log_model(
        self, artifacts: dict[str, str], example: Any, output: Any, name: str = "model"
    ) -> None:
        """Log the trained model as an MLflow pyfunc (:mod:`clinical_moe.serving`), no pickle.

        Args:
            artifacts: ``{"weights": state_dict .pt, "config": config.yaml, "data": data.json}``.
            example: ``dict[str, np.ndarray]`` of per-modality inputs (the input example).
            output: The model's probabilities on ``example`` (the output part of the signature).
            name: The logged model's name (e.g. the head and run name).
        """
        if not self._log_model:
            return
        from clinical_moe.serving import ENTRY, pip_requirements, signature_for

        mlflow = self._mlflow
        with mlflow.start_run(run_id=self._run_id):
            # A model from code: MLflow runs ENTRY to get the model object and unpickles nothing.
            mlflow.pyfunc.log_model(
                name=name,
                python_model=str(ENTRY),
                artifacts=dict(artifacts),
                signature=signature_for(example, output),
                input_example=example,
                pip_requirements=pip_requirements(),  # explicit: no slow inference subprocess
            )

    def close(self, status: str = "FINISHED") -> None:
        if self._mlflow.active_run() is not None:
            self._mlflow.end_run(status)
        self.client.set_terminated(self._run_id, status=status)
