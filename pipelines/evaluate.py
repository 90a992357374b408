"""``clinical-moe evaluate``: score trained runs under simulated missingness, on identical masks.

Usage::

    clinical-moe evaluate --run-id ID [--run-id ID2 ...]
    clinical-moe evaluate --checkpoint runs/checkpoints/fusemoe-xxxx/best.pt [--checkpoint ...]
        [--mechanisms mcar mar mnar] [--rates 0 0.25 0.5 0.75] [--no-patterns]
        [--bootstrap 200] [--seed 0] [--out DIR] [--quiet]

Each run's model and cache are re-opened (``clinical_moe.runs.load_run``); the runs must share the
same test split. Defaults come from the first run's ``eval`` config section; flags override them.
The grid (mechanisms x rates, every fixed modality pattern, natural missingness per observed
combination, oracle on synthetic data) is written to ``--out`` as CSV / Parquet tables, PNG plots,
``summary.md`` and a self-contained ``report.html``, and logged as MLflow artifacts
(``evaluation/``): into the evaluated run when there is one run, else into a new comparison run
tagged with the compared run ids. The python entry point is :func:`evaluate`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

log = logging.getLogger("clinical_moe.evaluate")

MECHANISM_CHOICES = (
    "mcar",
    "mar",
    "mnar",
    "mnar_content",
)  # == clinical_moe.missingness.MECHANISMS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate runs under simulated missingness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run",
        "--run-id",
        action="append",
        default=[],
        dest="run_ids",
        metavar="RUN",
        help="a trained run: `latest`, its run name (e.g. fusemoe-1a2b3c4d5e) or its MLflow run "
        "id; repeat to compare several",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        dest="checkpoints",
        metavar="PATH",
        help="best.pt / last.pt of a trained run (repeatable)",
    )
    p.add_argument(
        "--mechanisms",
        nargs="+",
        choices=MECHANISM_CHOICES,
        help="missingness mechanisms (default: the run's eval.mechanisms)",
    )
    p.add_argument("--rates", nargs="+", type=float, help="simulated drop rates in [0, 1]")
    p.add_argument("--no-patterns", action="store_true", help="skip the fixed modality patterns")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--seed", type=int, help="seed of the masks and resamples")
    p.add_argument("--out", help="output folder (default runs/eval/<run name or comparison>)")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--cache-dir", help="read the data from here (a moved cache)")
    p.add_argument("--no-mlflow", action="store_true", help="write files only, log nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------------------


def _default_out(runs) -> Path:
    if len(runs) == 1:
        return Path("runs") / "eval" / runs[0].name
    key = ",".join(r.run_id or str(r.checkpoint) for r in runs)
    return Path("runs") / "eval" / f"compare-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _metric_key(*parts: str) -> str:
    """An MLflow-safe metric name (letters, digits, ``_ - . / space``)."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


def _metrics_for(grid, run: str, prefix: tuple[str, ...]) -> list[tuple[str, float, int]]:
    """(key, value, step) triples: rate curves (step = rate in %), natural point, patterns."""
    out = []
    d = grid[grid["run"] == run]
    for _, r in d.iterrows():
        if not math.isfinite(r["value"]):
            continue
        if r["mechanism"] == "pattern":
            if r["metric"] == "auroc":
                out.append((_metric_key(*prefix, "pattern", r["pattern"], "auroc"), r["value"], 0))
        elif r["mechanism"] == "natural":
            out.append((_metric_key(*prefix, "natural", r["metric"]), r["value"], 0))
        elif r["metric"] in ("auroc", "auprc"):
            out.append(
                (
                    _metric_key(*prefix, r["mechanism"], r["metric"]),
                    r["value"],
                    int(round(100 * r["rate"])),
                )
            )
    return out


def log_to_mlflow(runs, out: Path, grid, tracking_uri: str | None) -> str:
    """Log the files in ``out`` (artifacts ``evaluation/``), tags and headline metrics.

    One run with an MLflow id: into that run (re-opened). Otherwise: a new comparison run, in the
    first run's experiment, tagged with the compared run ids.

    Returns:
        The MLflow run id that holds the artifacts.
    """
    from mlflow.tracking import MlflowClient

    from clinical_moe.tracking import MlflowLogger, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or runs[0].cfg.tracking.uri)
    client = MlflowClient(uri)
    experiment = runs[0].cfg.tracking.experiment
    logger = None
    if len(runs) == 1 and runs[0].run_id:
        try:
            logger = MlflowLogger(uri, run_id=runs[0].run_id)
        except Exception as err:  # the run is not in this store
            log.warning(
                "cannot re-open MLflow run %s at %s (%s); logging to a new run",
                runs[0].run_id,
                uri,
                err,
            )
    if logger is None:
        for r in runs:
            try:
                exp_id = client.get_run(r.run_id).info.experiment_id if r.run_id else None
            except Exception:
                exp_id = None
            if exp_id is not None:
                experiment = client.get_experiment(exp_id).name
                break
        name = (
            f"evaluate-{runs[0].name}"
            if len(runs) == 1
            else f"compare-{'-'.join(r.cfg.model.name for r in runs)}"[:200]
        )
        logger = MlflowLogger(uri, experiment, run_name=name)
        logger.set_tags(
            {
                "evaluation": "missingness",
                "compared_run_ids": ",".join(r.run_id or "" for r in runs),
                "compared_run_names": ",".join(r.name for r in runs),
                "compared_checkpoints": ",".join(str(r.checkpoint) for r in runs),
            }
        )
    try:
        cfg_meta = grid.attrs.get("eval_config", {})
        logger.set_tags({f"evaluation.{k}": str(v) for k, v in cfg_meta.items()})
        logger.set_tags({"evaluation.out_dir": str(out.resolve())})
        steps: dict[int, dict[str, float]] = {}
        names = list(dict.fromkeys(grid["run"]))
        for run_name in names:
            prefix = ("eval",) if len(names) == 1 else ("eval", run_name)
            for key, value, step in _metrics_for(grid, run_name, prefix):
                steps.setdefault(step, {})[key] = float(value)
        for step, metrics in sorted(steps.items()):
            logger.log_metrics(metrics, step=step)
        for path in sorted(p for p in out.iterdir() if p.is_file()):
            logger.log_artifact(path, "evaluation")
    except BaseException:
        logger.close("FAILED")
        raise
    logger.close("FINISHED")
    if len(runs) > 1:
        log_to_each_run(runs, grid, uri, logger.run_id)
    return logger.run_id


def log_to_each_run(runs, grid, uri: str, comparison_id: str) -> None:
    """Each compared run also gets its own ``eval/...`` metrics (sortable in the MLflow UI)."""
    from clinical_moe.evaluation.grid import _unique_names
    from clinical_moe.tracking import MlflowLogger

    for r, name in zip(runs, _unique_names(runs)):  # the grid's name of each run
        if not r.run_id:
            continue
        try:
            logger = MlflowLogger(uri, run_id=r.run_id)
        except Exception as err:  # the run is not in this store
            log.warning("cannot re-open MLflow run %s at %s (%s)", r.run_id, uri, err)
            continue
        steps: dict[int, dict[str, float]] = {}
        for key, value, step in _metrics_for(grid, name, ("eval",)):
            steps.setdefault(step, {})[key] = float(value)
        for step, metrics in sorted(steps.items()):
            logger.log_metrics(metrics, step=step)
        logger.set_tags({"evaluation.comparison_run_id": comparison_id})
        logger.close("FINISHED")


def evaluate(
    run_ids: Sequence[str] = (),
    checkpoints: Sequence[str | Path] = (),
    out: str | Path | None = None,
    eval_cfg=None,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = True,
    log_mlflow: bool = True,
    **overrides,
):
    """Evaluate runs under simulated missingness; the python twin of ``clinical-moe evaluate``.

    Args:
        run_ids: MLflow run ids.
        checkpoints: Checkpoint files (``best.pt``) of runs.
        out: Output folder (default ``runs/eval/<run name>`` or ``runs/eval/compare-<hash>``).
        eval_cfg: An :class:`~clinical_moe.config.EvalConfig`; None uses the first run's.
        tracking_uri: MLflow store for finding and logging runs (default ``$MLFLOW_TRACKING_URI``).
        cache_dir: Read every run's data from here instead of its ``data.cache_dir``.
        quiet: No progress bar.
        log_mlflow: Log the outputs as MLflow artifacts.
        **overrides: EvalConfig fields to override (``mechanisms``, ``rates``, ``patterns``,
            ``bootstrap``, ``seed``, ...).

    Returns:
        The tidy grid table; ``attrs["out_dir"]`` is where the files are and
        ``attrs["mlflow_run_id"]`` the run that holds them as artifacts.
    """
    from clinical_moe.evaluation import evaluate_runs
    from clinical_moe.runs import load_run

    if isinstance(run_ids, str):
        run_ids = [run_ids]
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    if not run_ids and not checkpoints:
        raise ValueError("give at least one run id or checkpoint")
    if quiet:  # MLflow's own artifact download bars
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    runs = [load_run(run_id=r, tracking_uri=tracking_uri, cache_dir=cache_dir) for r in run_ids]
    runs += [load_run(checkpoint=c, cache_dir=cache_dir) for c in checkpoints]
    cfg = eval_cfg if eval_cfg is not None else runs[0].cfg.eval
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = replace(cfg, **overrides)  # re-validated by EvalConfig.__post_init__
    out = Path(out) if out is not None else _default_out(runs)
    grid = evaluate_runs(runs, cfg, out, quiet=quiet)
    grid.attrs["eval_config"] = asdict(cfg)
    grid.attrs["out_dir"] = str(out)
    if log_mlflow:
        grid.attrs["mlflow_run_id"] = log_to_mlflow(runs, out, grid, tracking_uri)
    return grid


def run(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` subcommand and print where the results are."""
    quiet = args.quiet or not sys.stderr.isatty()
    grid = evaluate(
        args.run_ids,
        args.checkpoints,
        out=args.out,
        tracking_uri=args.tracking_uri,
        cache_dir=args.cache_dir,
        quiet=quiet,
        log_mlflow=not args.no_mlflow,
        mechanisms=args.mechanisms,
        rates=args.rates,
        bootstrap=args.bootstrap,
        seed=args.seed,
        patterns=False if args.no_patterns else None,
    )
    out = Path(grid.attrs["out_dir"])
    natural = grid[(grid["point"] == "natural") & (grid["metric"] == "auroc")]
    for _, r in natural.iterrows():
        ratio = r.get("auroc_over_ceiling", math.nan)
        head = f"AUROC / ceiling {ratio:.3f}, " if ratio == ratio else ""
        print(
            f"{r['run']}: {head}AUROC {r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] "
            f"under natural missingness (n={r['n']})"
        )
    ceiling = grid.attrs.get("ceiling_auroc", {}).get("natural", math.nan)
    if math.isfinite(ceiling):
        print(f"ceiling (observer of the shown modalities) AUROC on the same stays: {ceiling:.4f}")
    oracle = grid.attrs.get("oracle_auroc", math.nan)
    if math.isfinite(oracle):
        print(f"oracle (true risk) AUROC on the same stays: {oracle:.4f}")
    print(
        f"evaluation results in {out.resolve()}: report.html, summary.md, grid.csv/.parquet, "
        "natural.csv/.parquet, plots"
    )
    if "mlflow_run_id" in grid.attrs:
        print(f"logged as MLflow artifacts evaluation/ of run {grid.attrs['mlflow_run_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["evaluate", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
