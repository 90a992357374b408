"""``clinical-moe train --config CONFIG [key=value ...] [--resume] [--quiet]``: train one head.

Also ``python -m pipelines.train --config ...`` and, for data-parallel training,
``torchrun --nproc_per_node N -m pipelines.train --config ...``.

Steps: validate the config (a bad key fails here, before anything is read or written); build the
cache at ``data.cache_dir`` if it is absent; open (or, with ``--resume``, re-open) an MLflow run;
train; log the resolved config, the data summary, the best checkpoint and the model.

Checkpoints go to ``<train.checkpoint_dir>/<run name>/`` where the run name is
``tracking.run_name`` or ``<head>-<hash of the config>``; running the same config again writes to
``<run name>-2``, ``-3``, ... (never into an earlier run's folder); ``--resume`` continues the
latest of them from its ``last.pt``, into the same MLflow run. The folder name is also the MLflow
run name, so ``clinical-moe evaluate --run NAME`` finds it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import yaml

from clinical_moe.config import Config, flatten, load_config, to_dict
from clinical_moe.training import distributed as D

log = logging.getLogger("clinical_moe.train")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a fusion head (tracked in MLflow)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML, e.g. configs/fusemoe.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue the latest run of this config from its last checkpoint, in the same "
        "MLflow run (default: a new run in a new checkpoint folder)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------------------


def config_hash(cfg: Config) -> str:
    """Hash of what decides the result (not where it is tracked or on which device)."""
    d = to_dict(cfg)
    d.pop("tracking")
    d.pop("pretrain", None)  # `clinical-moe pretrain` settings; its files enter via model.encoders
    for key in ("checkpoint_dir", "device", "num_workers", "num_threads"):
        d["train"].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_name_of(cfg: Config) -> str:
    """The base name of this config's runs: ``tracking.run_name`` or ``<head>-<config hash>``."""
    return cfg.tracking.run_name or f"{cfg.model.name}-{config_hash(cfg)}"


def run_dirs(cfg: Config) -> list[Path]:
    """The checkpoint folders of earlier runs of this config, oldest first.

    The first run of a config lives in ``<train.checkpoint_dir>/<run name>``, the next ones in
    ``<run name>-2``, ``<run name>-3``, ...; a folder counts once it holds ``run.json``.
    """
    from clinical_moe.training.checkpoint import RUN_FILE

    root, base, out = Path(cfg.train.checkpoint_dir), run_name_of(cfg), []
    for k in range(1, 10_000):
        path = root / (base if k == 1 else f"{base}-{k}")
        if not (path / RUN_FILE).is_file():
            break
        out.append(path)
    return out


def next_run_dir(cfg: Config, resume: bool) -> Path:
    """``--resume``: the latest run's folder; otherwise a fresh folder no earlier run wrote into."""
    done = run_dirs(cfg)
    if resume and done:
        return done[-1]
    base = run_name_of(cfg)
    k = len(done) + 1
    return Path(cfg.train.checkpoint_dir) / (base if k == 1 else f"{base}-{k}")


def model_name(cfg: Config, run_name: str) -> str:
    """The logged model's name: the head, and the run name when it does not already say it."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_name)
    return safe if safe.startswith(cfg.model.name) else f"{cfg.model.name}-{safe}"


def ensure_cache(cfg: Config, info: D.DistInfo, quiet: bool) -> Path:
    """The cache directory; built (rank 0) when absent, rebuilt when its fingerprint is stale."""
    cache = Path(cfg.data.cache_dir)
    if info.is_main:
        try:
            # import_module consults sys.modules (an attribute import could bypass a failed one)
            cache_module = importlib.import_module("clinical_moe.data.cache")
        except ImportError as err:
            raise RuntimeError(
                f"no preprocessed cache at {cache} and the cache builder is unavailable ({err}); "
                "run `clinical-moe preprocess --config ...` first"
            ) from err
        cache_module.ensure_cache(cfg, quiet=quiet)  # issue 13: one line says why it rebuilds
    D.barrier(info)
    return cache


def data_params(cache: Path) -> dict[str, object]:
    """Manifest hash and counts (stays per split, stays with each modality) for MLflow params."""
    import pandas as pd

    raw = (cache / "manifest.parquet").read_bytes()
    manifest = pd.read_parquet(cache / "manifest.parquet")
    out: dict[str, object] = {"data.manifest_sha256": hashlib.sha256(raw).hexdigest()}
    for split, n in manifest["split"].value_counts().sort_index().items():
        out[f"data.stays.{split}"] = int(n)
    for col in sorted(c for c in manifest.columns if c.startswith("has_")):
        out[f"data.present.{col[4:]}"] = int(manifest[col].sum())
    return out


def data_fingerprint(cache: Path) -> str:
    """The fingerprint the cache was written with ("none" for a cache that carries none)."""
    summary = json.loads((cache / "summary.json").read_text())
    return str(summary.get("fingerprint") or "none")


def git_commit() -> str:
    """``git rev-parse HEAD`` of the source tree, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_logger(cfg: Config, info: D.DistInfo, run_name: str, run_id: str | None):
    """MLflow on rank 0 (new run, or ``run_id`` re-opened); a NullLogger with the same id elsewhere."""
    from clinical_moe.tracking import MlflowLogger, NullLogger

    logger = None
    if info.is_main:
        logger = MlflowLogger(
            cfg.tracking.uri,
            cfg.tracking.experiment,
            run_name,
            run_id,
            log_model=cfg.tracking.log_model,
        )
        run_id = logger.run_id
    run_id = D.broadcast_object(run_id, info)
    return logger or NullLogger(run_id)


def log_model(trainer, logger, ckpt_path: Path, name: str) -> None:
    """Log the model as an MLflow pyfunc (``state_dict`` + config + data facts, no pickle).

    The input example is a real val batch; the signature leaves every padded axis free.
    """
    import json

    import torch

    from clinical_moe.data.dataset import Collator
    from clinical_moe.serving import data_facts
    from clinical_moe.training.export import FlatModel, flat_inputs

    ds = trainer.data.val
    batch = Collator(ds)([ds[i] for i in range(min(4, len(ds)))])
    example = flat_inputs(batch)
    model = trainer.model.cpu().eval()
    with torch.no_grad():
        flat = FlatModel(model, list(example), trainer.data.task)
        output = flat(*[torch.from_numpy(v) for v in example.values()]).numpy()
    folder = ckpt_path / "model"
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "weights": folder / "weights.pt",
        "config": ckpt_path / "config.yaml",
        "data": folder / "data.json",
    }
    torch.save(model.state_dict(), files["weights"])
    files["data"].write_text(json.dumps(data_facts(trainer.data), indent=1))
    logger.log_model({k: str(v) for k, v in files.items()}, example, output, name=name)


# ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, first
    if getattr(args, "threads", None):
        cfg.train.num_threads = args.threads  # --threads wins over the config
    info = D.init_distributed(cfg.train.device)
    try:
        train(cfg, info, resume=args.resume, quiet=args.quiet)
        return 0
    finally:
        D.cleanup()


def train(
    cfg: Config, info: D.DistInfo | None = None, resume: bool = False, quiet: bool = False
) -> Path:
    """Train ``cfg`` end to end (see the module docstring).

    Returns:
        The run's checkpoint folder (``run.json`` there holds its MLflow run id).
    """
    from clinical_moe.training.checkpoint import CheckpointDir, load_checkpoint
    from clinical_moe.training.engine import Trainer

    info = info or D.DistInfo()
    quiet = quiet or not sys.stderr.isatty() or not info.is_main
    cache = ensure_cache(cfg, info, quiet)
    folder = D.broadcast_object(next_run_dir(cfg, resume) if info.is_main else None, info)
    name = folder.name  # also the MLflow run name: `--run NAME` finds it
    ckpt = CheckpointDir(folder)

    state, run_id, finished = None, None, False
    if info.is_main:
        if resume and ckpt.read_run().get("finished"):
            finished = True
            log.info("--resume: run %s already finished; nothing to do", ckpt.read_run()["run_id"])
        elif resume:
            state = load_checkpoint(ckpt.last) if ckpt.last.exists() else None
            run_id = (state or {}).get("run_id") or ckpt.read_run().get("run_id")
            if run_id is None:
                log.warning("--resume: nothing to resume in %s; starting a new run", ckpt.path)
        else:
            ckpt.clear()
    if D.broadcast_object(finished, info):
        return ckpt.path
    state = D.broadcast_object(state, info)  # no shared filesystem needed between nodes
    logger = open_logger(cfg, info, name, D.broadcast_object(run_id, info))
    try:
        if info.is_main:
            ckpt.write_run(  # kept: a resumed run's final-phase flags (final_logged, ...)
                {
                    **(ckpt.read_run() if state is not None else {}),
                    "run_id": logger.run_id,
                    "run_name": name,
                    "config_hash": config_hash(cfg),
                }
            )
        trainer = Trainer(cfg, cache, ckpt, logger, info, resume=state, quiet=quiet)
        if info.is_main and state is None:
            config_file = ckpt.path / "config.yaml"
            config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            logger.log_params({**flatten(cfg), **data_params(cache), "world_size": info.world_size})
            logger.set_tags(
                {
                    "git_commit": git_commit(),
                    "head": cfg.model.name,
                    "task": trainer.data.task,
                    "data_task": cfg.data.task,
                    "data_fingerprint": data_fingerprint(cache),
                }
            )
            logger.log_artifact(config_file)
            logger.log_artifact(cache / "summary.json", "data")
        result = trainer.fit()
        if info.is_main:
            if ckpt.best.exists():
                logger.log_artifact(ckpt.best, "checkpoints")
            if not ckpt.read_run().get("model_logged"):  # once, even across a resume
                log_model(trainer, logger, ckpt.path, model_name(cfg, name))
                ckpt.write_run({**ckpt.read_run(), "model_logged": True})
            m = result.metrics
            f1_part = (
                f", test F1 {m['test_f1_at_val_threshold']:.3f} at the val threshold "
                f"{m['test_threshold']:.2f}"
                if "test_f1_at_val_threshold" in m
                else ""
            )
            print(
                f"run {result.run_id} ({name}): kept epoch {result.best_epoch + 1} "
                f"(train.select={cfg.train.select}), "
                f"val AUROC {m.get('best_val_auroc', float('nan')):.4f}, "
                f"test AUROC {m.get('test_auroc', float('nan')):.4f}{f1_part}, "
                f"{result.samples_per_s:.0f} samples/s; checkpoints in {ckpt.path}"
            )
    except BaseException:
        logger.close("FAILED")
        raise
    logger.close("FINISHED")
    if info.is_main:
        ckpt.write_run({**ckpt.read_run(), "finished": True})
    return ckpt.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from clinical_moe.allocator import retain_freed_memory_by_default
    from pipelines.common import apply_threads, quiet_downloads

    quiet_downloads()
    apply_threads(None)
    retain_freed_memory_by_default()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
