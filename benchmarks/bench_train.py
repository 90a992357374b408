"""Training and inference samples/s of every head, at the tiny and the paper-default configs.

A small synthetic corpus and its cache are built once under ``--work`` (reused afterwards). For each
head of :func:`clinical_moe.list_models` and each tier (``configs/tiny/<head>.yaml``,
``configs/<head>.yaml``) a child process (or this one, ``--in-process``) times ``--steps``
optimiser steps and as many inference batches after ``--warmup`` untimed ones, and records its
peak RSS. Then ``pipelines.train`` runs for ``--ddp-steps`` steps per epoch (2 epochs) as one
process and under ``torchrun --nproc_per_node 2`` (gloo), same config, and the samples/s ratio is
reported (ideal 2.0 on two free cores).

Usage::

    python -m benchmarks.bench_train --steps 20 --tiers tiny paper --out benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import train_steps
from benchmarks.common import (
    add_common_args,
    check_ok,
    environment,
    finish,
    last_json_line,
    run_measured,
    set_threads,
)
from benchmarks.pipeline_steps import corpus_dir, ensure_corpus
from benchmarks.pipeline_steps import preprocess as build_cache_step

TIERS = ("tiny", "paper")


def ensure_cache(args) -> tuple[Path, Path, dict]:
    """The corpus and cache of the benchmark (built on first use); returns their paths + info."""
    work = Path(args.work)
    size = tuple(args.image_size)
    root = corpus_dir(work, args.patients, size)
    cache = work / f"cache-{root.name}"
    synth = ensure_corpus(root, args.patients, 0, 2, size, args.in_process)
    info = {
        "corpus": str(root),
        "cache": str(cache),
        "patients": args.patients,
        "synth_reused": synth["reused"],
    }
    if not (cache / "manifest.parquet").is_file():
        config = str(train_steps.tier_config("fusemoe", "tiny"))
        pre = build_cache_step(root, cache, 2, config, args.in_process)
        info["preprocess_seconds"] = pre["seconds"]
    manifest = json.loads((cache / "summary.json").read_text())
    info["stays"] = manifest["split_counts"]
    return root, cache, info


def measure(head: str, tier: str, root: Path, cache: Path, args) -> dict:
    """One (head, tier) point, in a child process unless ``--in-process``."""
    params = {
        "head": head,
        "tier": tier,
        "root": str(root),
        "cache": str(cache),
        "work": args.work,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads or 1,
        "device": args.device,
    }
    if args.in_process:
        return train_steps.measure_head(
            **{**params, "root": root, "cache": cache, "work": Path(args.work)}
        )
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--child", json.dumps(params)]
    res = run_measured(cmd, env={"OMP_NUM_THREADS": str(params["threads"])}, timeout=3600)
    try:
        check_ok(res, f"{head} ({tier})")
    except RuntimeError as err:
        return {"head": head, "tier": tier, "error": str(err)[-1500:]}
    out = last_json_line(res["stdout"])
    out["process_peak_rss_tree_mb"] = res["peak_rss_tree_mb"]
    return out


def _child(params: dict) -> dict:
    p = dict(params)
    for key in ("root", "cache", "work"):
        p[key] = Path(p[key])
    return train_steps.measure_head(**p)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from clinical_moe import list_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--heads", nargs="+", default=list_models(), help="default: every head")
    p.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per head and tier")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--patients", type=int, default=1000, help="patients of the synthetic corpus")
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 96), metavar=("MIN", "MAX"))
    p.add_argument("--work", default="runs/bench/train")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--ddp",
        nargs="*",
        default=["fusemoe:tiny", "fusemoe:paper"],
        metavar="HEAD:TIER",
        help="configs of the 1 vs 2 process runs ('' = none)",
    )
    p.add_argument("--ddp-steps", type=int, default=20, help="steps per epoch of the DDP runs")
    p.add_argument(
        "--no-threads-run",
        action="store_true",
        help="skip the extra 1-process, 2-thread run of the DDP comparison",
    )
    p.add_argument("--in-process", action="store_true", help="no child processes (smoke runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, quiet: bool = False) -> dict:
    """Run the benchmark; print (unless ``quiet``) and return the JSON report."""
    args = parse_args(argv)
    set_threads(args.threads)
    env = environment(args.device)
    root, cache, data = ensure_cache(args)
    results = [measure(h, t, root, cache, args) for t in args.tiers for h in args.heads]
    ddp = []
    for spec in filter(None, args.ddp):
        head, tier = spec.split(":")
        ddp.append(
            train_steps.ddp_scaling(
                head, tier, root, cache, Path(args.work), args.ddp_steps, not args.no_threads_run
            )
        )
    report = {
        "benchmark": "train",
        "environment": env,
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads or 1,
            "device": args.device,
            "in_process": args.in_process,
            "timing": "model steps on pre-collated batches; loading timed separately",
        },
        "data": data,
        "results": results,
        "ddp_scaling": ddp,
    }
    return finish(report, args.out, quiet)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        main()
