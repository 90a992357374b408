"""Re-open a trained run for evaluation, attribution or a notebook: config, data and best weights.

A run is found either by its MLflow run id (the resolved ``config.yaml`` and
``checkpoints/best.pt`` artifacts are fetched from the tracking store) or by a checkpoint file on
disk (``best.pt`` or ``last.pt``; the ``config.yaml`` beside it is used). Weights are loaded with
``weights_only=True``. The cache named by the run's config is opened, not rebuilt: evaluating a
model on data other than the data it was trained on would be a silent error, so a missing cache
is reported with the path that was expected.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from clinical_moe.config import Config, load_config
from clinical_moe.model import MultimodalModel


@dataclass
class LoadedRun:
    """A trained model ready for inference.

    Attributes:
        cfg: the run's resolved config.
        model: the model in eval mode on the CPU, with the best checkpoint's weights.
        data: the cache's splits (``train``/``val``/``test`` :class:`CachedDataset`), task, classes.
        run_id: the MLflow run id (None when loaded from a bare checkpoint without ``run.json``).
        name: a short label for tables and plots (the MLflow run name or the checkpoint folder).
        checkpoint: the weights that were loaded (a file path or an MLflow artifact URI).
    """

    cfg: Config
    model: MultimodalModel
    data: object
    run_id: str | None
    name: str
    checkpoint: str


def _from_checkpoint_file(path: Path) -> tuple[Config, dict, str | None, str]:
    from clinical_moe.training.checkpoint import CheckpointDir, load_checkpoint

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config_file = path.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path}: no config.yaml beside the checkpoint (training writes it there); copy the "
            "run's config.yaml next to it, or evaluate the MLflow run with --run-id ID"
        )
    cfg = load_config(yaml.safe_load(config_file.read_text()))
    state = load_checkpoint(path)
    info = CheckpointDir(path.parent).read_run()
    run_id = state.get("run_id") or info.get("run_id")
    return cfg, state, run_id, info.get("run_name", path.parent.name)


def _from_mlflow(run_id: str, tracking_uri: str | None) -> tuple[Config, dict, str, str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from clinical_moe.tracking import resolve_tracking_uri
    from clinical_moe.training.checkpoint import load_checkpoint

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:  # mlflow raises its own exception types per store
        raise LookupError(f"MLflow run {run_id!r} not found at {uri}: {err}") from err
    tmp = Path(tempfile.mkdtemp(prefix=f"clinical_moe_run_{run_id[:8]}_"))
    try:
        config_file = Path(client.download_artifacts(run_id, "config.yaml", str(tmp)))
        best = Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp)))
        cfg = load_config(yaml.safe_load(config_file.read_text()))
        state = load_checkpoint(best)
    except (OSError, MlflowException) as err:
        raise LookupError(
            f"MLflow run {run_id!r} at {uri} has no config.yaml / checkpoints/best.pt artifacts "
            f"(was it trained with `clinical-moe train` and did it finish?): {err}"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg, state, run.info.run_name or run_id, f"{run.info.artifact_uri}/checkpoints/best.pt"


def resolve_run(ref: str, tracking_uri: str | None = None) -> str:
    """The MLflow run id a user means by ``ref``: ``latest``, a run name, or a run id.

    ``latest`` is the most recent finished training run (tagged ``head`` by ``clinical-moe
    train``) in any experiment; a name picks the most recent run of that name.

    Raises:
        LookupError: No such run, naming the store and what to pass instead.
    """
    import re

    import mlflow

    from clinical_moe.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return ref
    exps = [e.experiment_id for e in client.search_experiments()]
    if ref == "latest":
        query = "attributes.status = 'FINISHED'"
    else:
        query = f"attributes.run_name = '{ref}'"
    found = client.search_runs(exps, query, order_by=["attributes.start_time DESC"])
    if ref == "latest":  # training runs only (evaluation / comparison runs have no head tag)
        found = [r for r in found if "head" in r.data.tags]
    if not found:
        what = "no finished training run" if ref == "latest" else f"no run named {ref!r}"
        raise LookupError(
            f"{what} at {uri}; pass --run latest, a run name or a run id "
            "(`mlflow ui` lists them), or --checkpoint PATH"
        )
    return found[0].info.run_id


def check_ehr_scaling(state: dict, data, run: str) -> None:
    """Refuse a run whose weights expect other EHR input scaling than the cache gives.

    A checkpoint without ``ehr_scaling`` was written before age was standardised (scaling 1). Its cache was rebuilt since (the fingerprint changed), so the
    model would now read age in standard deviations where it learned centuries, silently.
    """
    if "ehr" not in data.modalities:
        return
    trained = int(state.get("ehr_scaling", 1))
    now = data.train.store.ehr_scaling
    if trained != now:
        from clinical_moe.data.cache import StaleCacheError

        raise StaleCacheError(
            f"run {run} was trained on EHR inputs with scaling version {trained} and its cache "
            f"{data.train.store.cache_dir} now gives version {now} (2: age standardised on the "
            "train split); retrain the run, or evaluate it on the cache it was trained on"
        )


def load_run(
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedRun:
    """Rebuild a trained model and its data from an MLflow run id or a checkpoint file.

    Args:
        run_id: MLflow run id, run name or ``latest`` (exclusive with ``checkpoint``).
        checkpoint: path to ``best.pt`` / ``last.pt`` written by ``clinical-moe train``.
        tracking_uri: MLflow store; None uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        cache_dir: read the data from here instead of the run's ``data.cache_dir`` (a moved cache).
    """
    from clinical_moe.data.cache import check_cache
    from clinical_moe.training.engine import build_data, build_model

    if (run_id is None) == (checkpoint is None):
        raise ValueError("give exactly one of run_id or checkpoint")
    if run_id is not None:
        run_id = resolve_run(run_id, tracking_uri)  # `latest`, a run name or an id
        cfg, state, name, path = _from_mlflow(run_id, tracking_uri)
    else:
        path = Path(checkpoint)
        cfg, state, run_id, name = _from_checkpoint_file(path)
    if cache_dir is not None:
        cfg.data.cache_dir = str(cache_dir)
    cache = Path(cfg.data.cache_dir)
    if not (cache / "manifest.parquet").is_file():
        raise FileNotFoundError(
            f"the run's cache {cache} is missing (no manifest.parquet); rebuild it with "
            "`clinical-moe preprocess --config <the run's config>` or pass cache_dir"
        )
    check_cache(cfg, cache)  # issue 13: refuse, in one line, a cache built with other settings
    data = build_data(cfg, cache)
    check_ehr_scaling(state, data, run_id or str(path))
    model = build_model(cfg, data)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedRun(
        cfg=cfg, model=model, data=data, run_id=run_id, name=str(name), checkpoint=str(path)
    )
