"""``make demo``: the main job end to end on the embedded defaults, then where the results are.

synthetic corpus -> preprocessing cache -> train heads (MLflow) -> evaluation under simulated
missingness (all heads on the same masks) -> attribution report of the first head.

Everything goes under ``--out`` (corpus, cache, checkpoints, reports); runs are tracked in the
MLflow store named by ``$MLFLOW_TRACKING_URI`` (``make`` sets ``sqlite:///<repo>/mlflow.db``).
Re-running reuses the corpus and the cache and trains new runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from clinical_moe.config import load_config

log = logging.getLogger("clinical_moe.demo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="folder for every file the demo writes")
    p.add_argument("--n-patients", type=int, default=2000, help="synthetic patients")
    p.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    p.add_argument(
        "--heads",
        nargs="+",
        default=["fusemoe", "late"],
        help="heads to train and compare (registry names); the first is attributed",
    )
    p.add_argument(
        "--config-dir",
        default="configs/demo",
        help="folder of <head>.yaml configs (configs/tiny: seconds; configs: paper defaults)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(128, 256),
        metavar=("MIN", "MAX"),
        help="radiograph side in the corpus (the cache resizes to data.image_size)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default 1, or $OMP_NUM_THREADS)",
    )
    p.add_argument(
        "overrides", nargs="*", help="config overrides for every head, e.g. train.epochs=2"
    )
    return p.parse_args(argv)


def head_config(args: argparse.Namespace, head: str, out: Path):
    path = Path(args.config_dir) / f"{head}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for head {head!r}: {path}")
    overrides = [
        f"data.root={out / 'corpus'}",
        f"data.cache_dir={out / 'cache'}",
        f"train.checkpoint_dir={out / 'checkpoints'}",
        f"seed={args.seed}",
        *([f"train.num_threads={args.threads}"] if args.threads else []),
        *args.overrides,
    ]
    return load_config(path, overrides)


def step(title: str) -> float:
    print(f"\n== {title} ==", flush=True)
    return time.perf_counter()


def print_eval_headline(grid) -> None:
    """Test AUROC / ceiling and AUROC per run at natural missingness and MCAR 0.5, then the
    ceiling (what an observer of the shown modalities can reach) and the oracle (true risk)."""
    auroc = grid[grid["metric"] == "auroc"]
    natural = auroc[auroc["mechanism"] == "natural"].set_index("run")
    mcar = auroc[(auroc["mechanism"] == "mcar") & (auroc["rate"].round(2) == 0.5)].set_index("run")

    def ratio(row) -> str:
        r = row.get("auroc_over_ceiling", float("nan"))
        return f"{r:.3f} of ceiling, " if r == r else ""

    for run, row in natural.iterrows():
        line = (
            f"{run:<28} natural {ratio(row)}AUROC {row['value']:.3f} "
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        )
        if run in mcar.index:
            m = mcar.loc[run]
            line += f"; MCAR 0.5 {ratio(m)}AUROC {m['value']:.3f}"
        print(line)
    ceilings = grid.attrs.get("ceiling_auroc") or {}
    if ceilings.get("natural") == ceilings.get("natural") and "natural" in ceilings:
        mc = ceilings.get("mcar@0.50", float("nan"))
        print(
            f"{'ceiling (observer)':<28} AUROC natural {ceilings['natural']:.3f}, MCAR 0.5 {mc:.3f}"
        )
    oracle = grid.attrs.get("oracle_auroc")
    if oracle is not None and oracle == oracle:
        print(f"{'oracle (true risk)':<28} AUROC {oracle:.3f}")


def print_attribution_headline(tables: dict) -> None:
    """Mean |Shapley| per modality and the faithfulness figures against the synthetic truth."""
    summary = tables.get("modality_summary")
    if summary is not None and len(summary):
        shap = summary[summary["method"] == "shapley"]
        print(
            "mean |Shapley| (log-odds) where present: "
            + ", ".join(f"{r.modality} {r.mean_abs:.3f}" for r in shap.itertuples())
        )
    faith = tables.get("faithfulness")
    if faith is not None and len(faith):
        # the headline figures only; every group, the secondary figures and each modality's
        # agreement with the ideal observer are in the report and its tables
        shap = faith[faith["method"] == "shapley"].set_index("metric")
        parts = []
        if "single_factor_carrier_top1_abs" in shap.index:
            r = shap.loc["single_factor_carrier_top1_abs"]
            parts.append(
                f"carrier first on single-factor stays {r.value:.2f} "
                f"[{r.ci_low:.2f}, {r.ci_high:.2f}] (n={r.n_stays})"
            )
        if "spearman_pooled_observer" in shap.index:
            r = shap.loc["spearman_pooled_observer"]
            parts.append(f"rank correlation with the ideal observer {r.value:.2f}")
        if parts:
            print("faithfulness (Shapley): " + "; ".join(parts) + " (the rest: attribution report)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from pipelines.common import apply_threads, quiet_downloads

    quiet_downloads()
    apply_threads(args.threads)  # one thread per process unless asked: no oversubscription
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    quiet = args.quiet or not sys.stderr.isatty()
    timings: dict[str, float] = {}
    configs = {h: head_config(args, h, out) for h in args.heads}  # config errors before any work

    t = step(f"1/5 synthetic corpus: {args.n_patients} patients -> {out / 'corpus'}")
    corpus = out / "corpus"
    if (corpus / "truth" / "stays.csv.gz").is_file():
        print(f"reusing the corpus at {corpus} (delete it to regenerate)")
    else:
        from clinical_moe.data.synthetic import generate_corpus

        s = generate_corpus(
            corpus,
            n_patients=args.n_patients,
            seed=args.seed,
            image_size=tuple(args.image_size),
            quiet=quiet,
            overwrite=True,
        )
        print("\n".join(s.lines()))
    timings["synth_s"] = time.perf_counter() - t

    t = step("2/5 preprocess: cohort, EHR series, DICOM / WFDB decoding, note tokens")
    from clinical_moe.data.cache import build_cache

    cache = build_cache(configs[args.heads[0]], resume=True, quiet=quiet)
    timings["preprocess_s"] = time.perf_counter() - t
    print(f"cache: {cache}")

    from clinical_moe.allocator import retain_freed_memory_by_default
    from clinical_moe.training.checkpoint import CheckpointDir
    from pipelines.train import train

    retain_freed_memory_by_default()  # from here on, as `clinical-moe train` does
    run_ids: dict[str, str] = {}
    for i, head in enumerate(args.heads, 1):
        t = step(f"3/5 train {head} ({i}/{len(args.heads)})")
        cfg = configs[head]
        ckpt = CheckpointDir(train(cfg, quiet=quiet))
        run_ids[head] = ckpt.read_run()["run_id"]
        timings[f"train_{head}_s"] = time.perf_counter() - t

    results: dict[str, Path] = {}
    t = step("4/5 evaluate under simulated missingness (same masks for every head)")
    from pipelines.evaluate import evaluate

    eval_out = out / "evaluation"
    grid = evaluate(run_ids=list(run_ids.values()), out=eval_out, quiet=quiet)
    print_eval_headline(grid)
    results["evaluation report"] = eval_out / "report.html"
    timings["evaluate_s"] = time.perf_counter() - t

    t = step(f"5/5 attribution report for {args.heads[0]}")
    from pipelines.attribute import attribute

    attr_out = out / "attribution"
    tables = attribute(run_id=run_ids[args.heads[0]], out=attr_out, quiet=quiet)
    print_attribution_headline(tables)
    results["attribution report"] = attr_out / "report.html"
    timings["attribute_s"] = time.perf_counter() - t

    from clinical_moe.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(configs[args.heads[0]].tracking.uri)
    print("\n== results ==")
    print(f"corpus:             {corpus}  (ground truth in {corpus / 'truth'})")
    print(f"cache:              {cache}  (preprocessing summary: {cache / 'summary.json'})")
    for head, rid in run_ids.items():
        print(f"MLflow run:         {head:<10} {rid}")
    for name, path in results.items():
        print(f"{name + ':':<20}{path}")
    print("timings:            " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"browse runs:        mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
