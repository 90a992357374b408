"""Run every benchmark and print one JSON summary (``make bench``).

``--quick`` is a smoke run of a few minutes: a reduced MoE grid, one 200-patient corpus with small
images, tiny configs with a few steps, one short DDP comparison, and every head (tiny configs) on
300 patients against the oracle. Without it the benchmarks run
at their default (realistic, slow: hours on two cores) scale; the pipeline skips a size whose
estimated time exceeds ``--max-minutes``. Full reports go to ``--out-dir`` when given.

Usage::

    python -m benchmarks.run_all --quick --out-dir runs/bench/quick-results
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from benchmarks import bench_moe, bench_pipeline, bench_quality, bench_train
from benchmarks.common import emit, environment, finish

BENCHES = {
    "moe": bench_moe,
    "pipeline": bench_pipeline,
    "train": bench_train,
    "quality": bench_quality,
}


def argv_for(name: str, quick: bool, work: Path, max_minutes: float) -> list[str]:
    """Command-line arguments of one benchmark in quick or full mode."""
    if name == "moe":
        return ["--quick", "--reps", "3", "--warmup", "1"] if quick else []
    if name == "quality":
        return quality_argv(quick, work)
    if name == "pipeline":
        if quick:
            return [
                "--sizes",
                "200",
                "--image-size",
                "64",
                "96",
                "--decode-files",
                "50",
                "--decode-reps",
                "2",
                "--decode-j2k-files",
                "2",
                "--scaling-reps",
                "1",
                "--work",
                str(work / "quick"),
            ]
        return ["--work", str(work), "--max-minutes", str(max_minutes)]
    if quick:
        return [
            "--tiers",
            "tiny",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--patients",
            "300",
            "--ddp",
            "fusemoe:tiny",
            "--ddp-steps",
            "5",
            "--no-threads-run",
            "--work",
            str(work / "quick-train"),
        ]
    return ["--work", str(work / "train")]


def quality_argv(quick: bool, work: Path) -> list[str]:
    """bench_quality: every head, tiny configs on 300 patients (quick) or the issue's setting."""
    if quick:
        return [
            "--n-patients",
            "300",
            "--seeds",
            "0",
            "--config-dir",
            "configs/tiny",
            "--bootstrap",
            "50",
            "--image-size",
            "32",
            "48",
            "--work",
            str(work / "quick-quality"),
        ]
    return ["--jobs", "2", "--work", str(work / "quality")]


def summarize(name: str, r: dict) -> dict:
    """The headline figures of one report."""
    out: dict = {
        "machine_loaded": r.get("machine_loaded"),
        "other_processes_cores": r.get("other_processes_cores"),
    }
    if name == "moe":
        out.update(
            max_ratio=r["max_ratio"],
            target=r["target"],
            ratios={
                f"E{x['experts']}k{x['top_k']}n{x['tokens']}": x["ratio"] for x in r["results"]
            },
        )
        if r.get("i2moe"):
            out["i2moe"] = {
                k: r["i2moe"][k] for k in ("ratio", "work_ratio", "ratio_per_backbone_pass")
            }
    elif name == "pipeline":
        keys = ("seconds", "stays_per_s", "dicoms_per_s", "ecgs_per_s", "peak_rss_tree_mb")
        out["sizes"] = [
            {"patients": s["patients"], "skipped": s["skipped"]}
            if s.get("skipped")
            else {
                "patients": s["patients"],
                **{f"{step}_{k}": s[step].get(k) for step in ("synth", "preprocess") for k in keys},
            }
            for s in r["sizes"]
        ]
        out["scaling_with_workers"] = [
            {k: v for k, v in s.items() if "speedup" in k or k == "patients"}
            for s in r["scaling_with_workers"]
        ]
        out["decode_ratios"] = {
            m: {k: v for k, v in (r["decode"][m] or {}).items() if k.startswith("ratio")}
            for m in ("cxr", "cxr_j2k_full_size", "ecg")
        }
        out["targets"] = r["targets"]
    elif name == "quality":
        out["oracle_auroc_mean"] = r["oracle_auroc_mean"]
        out["ceiling_auroc_natural_mean"] = r.get("ceiling_auroc_natural_mean")
        keep = ("auroc_over_ceiling", "auroc_of_oracle", "auroc_drop")  # / ceiling first
        out["heads"] = {
            h: {k: v for k, v in x.items() if k.startswith(keep)} for h, x in r["heads"].items()
        }
        out["targets_ceiling"] = r.get("targets_ceiling", {})
        out["targets"] = r["targets"]
    else:
        out["results"] = [
            {
                k: x.get(k)
                for k in (
                    "head",
                    "tier",
                    "train_samples_per_s",
                    "infer_samples_per_s",
                    "peak_rss_mb",
                    "error",
                )
                if x.get(k) is not None
            }
            for x in r["results"]
        ]
        out["ddp"] = [
            {
                k: d[k]
                for k in ("head", "tier", "ratio_2proc_vs_1proc", "ratio_1proc_2threads_vs_1thread")
            }
            for d in r["ddp_scaling"]
        ]
    return out


def summarize_saved(specs: list[str], out: str | None) -> dict:
    """The summary of reports written earlier (``NAME=FILE`` each), without running anything."""
    summary: dict = {"benchmark": "all", "from_saved_reports": {}, "results": {}, "failed": False}
    for spec in specs:
        name, _, path = spec.partition("=")
        if name not in BENCHES or not path:
            raise SystemExit(f"--from expects NAME=FILE with NAME in {list(BENCHES)}; got {spec!r}")
        report = json.loads(Path(path).read_text())
        summary["from_saved_reports"][name] = {
            "file": path,
            "git_commit": report.get("environment", {}).get("git_commit"),
            "timestamp_utc": report.get("environment", {}).get("timestamp_utc"),
        }
        summary["results"][name] = summarize(name, report)
    return emit(summary, out)


def main(argv: list[str] | None = None) -> dict:
    """Run the selected benchmarks; print and return the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (a few minutes)")
    p.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    p.add_argument("--work", default="runs/bench", help="corpora, caches, checkpoints")
    p.add_argument("--out", default=None, help="also write the summary here")
    p.add_argument("--out-dir", default=None, help="write each full report here as <name>.json")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=25.0,
        help="pipeline: skip sizes estimated to take longer (full mode)",
    )
    p.add_argument(
        "--from",
        dest="reports",
        nargs="+",
        metavar="NAME=FILE",
        default=None,
        help="summarise these saved reports (e.g. moe=benchmarks/results/moe.json) instead of "
        "running anything",
    )
    args = p.parse_args(argv)
    if args.reports:
        return summarize_saved(args.reports, args.out)
    summary: dict = {
        "benchmark": "all",
        "quick": args.quick,
        "environment": environment(),
        "results": {},
    }
    failed = False
    for name in args.only:
        sub = argv_for(name, args.quick, Path(args.work), args.max_minutes)
        if args.out_dir:
            sub += ["--out", str(Path(args.out_dir) / f"{name}.json")]
        try:
            report = BENCHES[name].main(sub, quiet=True)
            summary["results"][name] = summarize(name, report)
        except Exception as err:  # keep the other benchmarks running
            failed = True
            summary["results"][name] = {"error": repr(err), "trace": traceback.format_exc()[-2000:]}
    summary["failed"] = failed
    finish(summary, args.out)
    if failed:
        print(
            json.dumps({"failed": [k for k, v in summary["results"].items() if "error" in v]}),
            file=sys.stderr,
        )
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
