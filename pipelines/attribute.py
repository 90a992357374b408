"""``clinical-moe attribute --run-id ID | --checkpoint PATH [--split test] [--max-stays N]
[--out DIR] [--quiet]``: per-modality attribution report of a trained run.

Also ``python -m pipelines.attribute ...`` and, from Python (the demo, notebooks),
:func:`attribute`, which returns the tables as DataFrames.

Steps: re-open the run (:func:`clinical_moe.runs.load_run`: config, cache, best weights); attribute
the stays of one split (default test) with modality Shapley values, Integrated Gradients and
drop-one ablation, analyse routing (MoE heads) and I2MoE interaction weights, and check
faithfulness against the synthetic truth when the cache was built from a synthetic corpus
(:mod:`clinical_moe.attribution`: groups of >= 50 stays where the split allows, bootstrap CIs)
and probe each encoder's pooled output for its modality's latent factor (train stays -> the
attributed split); write CSV + Parquet tables, PNG figures and a self-contained
``report.html`` to ``--out`` (default ``runs/attribution/<run name>``); log them as artifacts of
the run under ``attribution/`` and the faithfulness figures as metrics ``attribution/...``.

Nothing here reads or writes note text: tables and reports hold numbers, modality names,
missingness patterns and stay ids only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.attribution.agreement import COALITION_GROUP

log = logging.getLogger("clinical_moe.attribute")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "attribute",
        help="per-modality attribution report of a trained run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--run",
        "--run-id",
        dest="run_id",
        metavar="RUN",
        help="a `clinical-moe train` run: `latest`, its run name or its MLflow run id",
    )
    which.add_argument("--checkpoint", help="best.pt / last.pt of a run (config.yaml beside it)")
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="stays to attribute (default test)",
    )
    p.add_argument(
        "--max-stays", type=int, default=None, help="attribute only the first N stays of the split"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/attribution/<run>)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="stays per batch")
    p.add_argument(
        "--ig-steps",
        type=int,
        default=32,
        help="Integrated Gradients steps (0 skips IG, most of the cost for big heads)",
    )
    p.add_argument(
        "--probe-train",
        type=int,
        default=3000,
        help="train stays per modality for the encoder probes (0 skips the probes)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    attribute(
        run_id=args.run_id,
        checkpoint=args.checkpoint,
        out=args.out,
        tracking_uri=args.tracking_uri,
        max_stays=args.max_stays,
        quiet=args.quiet,
        split=args.split,
        batch_size=args.batch_size,
        ig_steps=args.ig_steps,
        probe_train=args.probe_train,
    )
    return 0


# ------------------------------------------------------------------------------------------------


def faithfulness_metrics(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """MLflow metrics: faithfulness figures and the mean |Shapley| per modality.

    The per-coalition rows (``coalition_agreement``, up to 4 x (2^M - 1) figures) stay in the
    logged tables only.
    """
    out = {}
    for r in tables["faithfulness"].itertuples():
        if r.group == COALITION_GROUP:
            continue
        if r.metric != "status" and np.isfinite(r.value):
            out[f"attribution/{r.method}/{r.metric}"] = float(r.value)
            for end in ("ci_low", "ci_high"):
                if np.isfinite(getattr(r, end, np.nan)):
                    out[f"attribution/{r.method}/{r.metric}/{end}"] = float(getattr(r, end))
    for r in tables.get("encoder_probe", pd.DataFrame()).itertuples():
        if np.isfinite(r.auroc):
            out[f"attribution/probe/{r.modality}/{r.factor.replace('>', '_gt_')}"] = float(r.auroc)
    for r in tables["modality_summary"].itertuples():
        if np.isfinite(r.mean_abs):
            out[f"attribution/{r.method}/mean_abs/{r.modality}"] = float(r.mean_abs)
    return out


def log_to_mlflow(run_id: str, uri: str, out: Path, metrics: dict[str, float]) -> bool:
    """Add the outputs to the run's artifacts (``attribution/``) and metrics; keeps its status."""
    from mlflow.tracking import MlflowClient

    from clinical_moe.tracking import MlflowLogger

    try:
        status = MlflowClient(uri).get_run(run_id).info.status
    except Exception as err:  # the run lives in another store: keep the local results
        log.warning("MLflow run %s not found at %s (%s); results stay in %s", run_id, uri, err, out)
        return False
    logger = MlflowLogger(uri, run_id=run_id, log_model=False)
    try:
        for item in ("report.html", "tables", "figures"):
            if (out / item).exists():
                logger.log_artifact(out / item, "attribution")
        logger.log_metrics(metrics, step=0)
    finally:
        logger.close(status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED")
    return True


def attribute(
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    tracking_uri: str | None = None,
    max_stays: int | None = None,
    quiet: bool = False,
    split: str = "test",
    batch_size: int = 64,
    ig_steps: int = 32,
    log_mlflow: bool = True,
    probe_train: int = 3000,
) -> dict[str, pd.DataFrame]:
    """Attribution report of a trained run (see the module docstring).

    Args:
        run_id: MLflow run id (exclusive with ``checkpoint``).
        checkpoint: ``best.pt`` / ``last.pt`` written by ``clinical-moe train``.
        out: Output folder; default ``runs/attribution/<run name>``.
        tracking_uri: MLflow store; None = ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
            (with ``checkpoint``, the run's own ``tracking.uri`` comes first).
        max_stays: Attribute only the first N stays of the split.
        quiet: No progress bar (the final line saying where the results are is always printed).
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: Stays per batch.
        ig_steps: Integrated Gradients steps; 0 skips IG.
        log_mlflow: Log the outputs to the run (when it has an MLflow run id).
        probe_train: Train stays per modality for the encoder probes
            (:func:`clinical_moe.attribution.probe.probe_encoders`, scored on the attributed
            split); 0 skips them.

    Returns:
        The tables by name (``per_stay``, ``modality_summary``, ``pattern_summary``, routing,
        interaction, faithfulness and ``encoder_probe`` tables).
    """
    from clinical_moe.attribution import attribute_dataset, faithfulness, find_truth, make_target
    from clinical_moe.attribution.report import write_report
    from clinical_moe.runs import load_run
    from clinical_moe.tracking import resolve_tracking_uri

    start = time.perf_counter()
    quiet = quiet or not sys.stderr.isatty()
    loaded = load_run(run_id=run_id, checkpoint=checkpoint, tracking_uri=tracking_uri)
    uri = resolve_tracking_uri(
        tracking_uri if run_id is not None else tracking_uri or loaded.cfg.tracking.uri
    )
    data = loaded.data
    dataset = {"train": data.train, "val": data.val, "test": data.test}[split]
    if dataset is None:
        raise ValueError(f"the run's cache has no {split!r} split")
    n = len(dataset) if max_stays is None else min(max_stays, len(dataset))
    if n < 1:
        raise ValueError(f"nothing to attribute: max_stays={max_stays}, {len(dataset)} stays")
    target = make_target(data.task, data.train.labels, label_names=data.train.label_columns)
    mods = tuple(loaded.model.modalities)
    tables = attribute_dataset(
        loaded.model,
        dataset,
        target,
        indices=range(n),
        batch_size=batch_size,
        ig_steps=ig_steps,
        quiet=quiet,
    )
    truth, reason = find_truth(dataset.store.summary)
    train = loaded.cfg.train
    if truth is not None and train.single_modality_rate > 0:
        log.warning(
            "the ideal observer models train.modality_dropout=%s but not "
            "train.single_modality_rate=%s: faithfulness reads the head against a slightly "
            "different training mechanism",
            train.modality_dropout,
            train.single_modality_rate,
        )
    tables.update(
        faithfulness(
            tables["per_stay"],
            truth,
            mods,
            tables["interactions"],
            reason,
            dropout=train.modality_dropout,
        )
    )
    if probe_train > 0:
        from clinical_moe.attribution.probe import probe_encoders

        tables["encoder_probe"] = probe_encoders(
            loaded.model, data.train, dataset, max_train=probe_train, batch_size=batch_size
        )
    seconds = time.perf_counter() - start
    info = {
        "run": loaded.name,
        "run_id": loaded.run_id,
        "head": loaded.cfg.model.name,
        "checkpoint": str(loaded.checkpoint),
        "split": split,
        "stays": n,
        "target": f"{target.name} ({target.task}, log-odds)",
        "prevalence": round(target.base_risk, 4),
        "modalities": ", ".join(mods),
        "seconds": round(seconds, 1),
    }
    out = Path(out) if out is not None else Path("runs") / "attribution" / loaded.name
    paths = write_report(out, tables, info, mods)
    logged = False
    if log_mlflow and loaded.run_id:
        metrics = {
            **faithfulness_metrics(tables),
            "attribution/seconds": seconds,
            "attribution/stays": float(n),
        }
        logged = log_to_mlflow(loaded.run_id, uri, out, metrics)
    where = f"; logged to MLflow run {loaded.run_id} under attribution/" if logged else ""
    print(
        f"attribution of {loaded.name}: {n} {split} stays in {seconds:.1f} s; "
        f"tables in {paths['tables']}, report {paths['report']}{where}"
    )
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.attribute")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["attribute", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
