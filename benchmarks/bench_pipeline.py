"""Throughput and memory of ``synth`` and ``preprocess``, and per-file decode cost vs bare readers.

For each size in ``--sizes`` (patients) a synthetic corpus is written under ``--work`` (reused when
it already exists) and preprocessed into a fresh cache, each step in a child process whose whole
process tree (workers included) is sampled for its summed RSS. Reported per step: wall seconds,
stays/s, DICOMs/s, ECGs/s, peak RSS; for preprocess also the table-planning share. Scaling: the
rates across sizes, and 1 vs 2 workers at ``--scaling-sizes``.

Decode: on the same DICOM files, our ``read_cxr`` (and ``read_cxr`` + the cache's resize transform)
against bare ``pydicom.dcmread(f).pixel_array``; on the same WFDB records, ``read_ecg`` (at the
cache's rate) against bare ``wfdb.rdrecord``. Interleaved rounds; ``ratio`` = our files/s over the
bare reader's files/s.

Targets (issue #8): decode path >= 0.8x bare decode throughput; 50k-patient preprocessing with
peak RSS < 4 GB (extrapolated linearly from the measured sizes when 50k is not run).

Usage::

    python -m benchmarks.bench_pipeline --sizes 2000 20000 --image-size 64 96 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks import pipeline_steps as steps
from benchmarks.common import REPO, add_common_args, environment, finish, set_threads
from benchmarks.decode import bench_decode

RSS_TARGET_MB = round(4e9 / 1024**2, 1)  # 4 GB (decimal, the stricter reading) in MiB
RSS_TARGET_PATIENTS = 50_000
DECODE_TARGET = 0.8


def estimate_minutes(previous: list[dict], n: int) -> float | None:
    """Linear estimate of synth + preprocess minutes for ``n`` patients from the largest done."""
    done = [p for p in previous if p.get("synth") and p.get("preprocess")]
    if not done:
        return None
    last = max(done, key=lambda p: p["patients"])
    secs = last["preprocess"]["seconds"]
    if not last["synth"].get("reused"):
        secs += last["synth"]["seconds"]
    return round(secs * n / last["patients"] / 60, 1)


def run_size(n: int, args, work: Path) -> dict:
    """Synth (or reuse) then preprocess ``n`` patients with the largest worker count."""
    size = tuple(args.image_size)
    root = steps.corpus_dir(work, n, size, args.seed)
    workers = max(args.workers)
    out = {"patients": n, "corpus": str(root), "workers": workers}
    out["synth"] = steps.ensure_corpus(root, n, args.seed, workers, size, args.in_process)
    out["corpus_mb"] = steps.disk_mb(root)
    cache = work / f"cache-{root.name}-w{workers}"
    out["preprocess"] = steps.preprocess(root, cache, workers, args.config, args.in_process)
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def run_scaling(n: int, args, work: Path) -> dict:
    """Synth and preprocess ``n`` patients per worker count, ``--scaling-reps`` times each.

    Rounds alternate the order of the worker counts; each count keeps its fastest run (the one
    least disturbed by other jobs) and the list of all its times. Synth writes to scratch folders.
    """
    size = tuple(args.image_size)
    root = steps.corpus_dir(work, n, size, args.seed)
    steps.ensure_corpus(root, n, args.seed, max(args.workers), size, args.in_process)
    runs: dict = {"synth": {str(w): [] for w in args.workers}, "preprocess": {}}
    runs["preprocess"] = {str(w): [] for w in args.workers}
    for rep in range(args.scaling_reps):
        order = args.workers if rep % 2 == 0 else list(reversed(args.workers))
        for w in order:
            scratch = work / f"scratch-n{n}-w{w}"
            shutil.rmtree(scratch, ignore_errors=True)
            runs["synth"][str(w)].append(
                steps.synth(scratch, n, args.seed, w, size, args.in_process)
            )
            shutil.rmtree(scratch, ignore_errors=True)
            cache = work / f"scratch-cache-n{n}-w{w}"
            runs["preprocess"][str(w)].append(
                steps.preprocess(root, cache, w, args.config, args.in_process)
            )
            shutil.rmtree(cache, ignore_errors=True)
    out: dict = {"patients": n, "reps": args.scaling_reps}
    lo, hi = str(min(args.workers)), str(max(args.workers))
    for step, per_w in runs.items():
        best = {w: min(rs, key=lambda r: r["seconds"]) for w, rs in per_w.items()}
        out[step] = {
            w: {**best[w], "all_seconds": [r["seconds"] for r in rs]} for w, rs in per_w.items()
        }
        out[f"{step}_speedup_{lo}_to_{hi}_workers"] = round(
            best[lo]["seconds"] / best[hi]["seconds"], 3
        )
    return out


def rss_target(sizes: list[dict]) -> dict:
    """Peak preprocess RSS at 50k patients: measured, or extrapolated linearly, vs 4 GB."""
    pts = [
        (s["patients"], s["preprocess"]["peak_rss_tree_mb"]) for s in sizes if s.get("preprocess")
    ]
    measured = dict(pts).get(RSS_TARGET_PATIENTS)
    est = None
    if measured is None and len(pts) >= 2:
        (n0, r0), (n1, r1) = sorted(pts)[0], sorted(pts)[-1]
        est = round(r1 + (r1 - r0) / (n1 - n0) * (RSS_TARGET_PATIENTS - n1), 1) if n1 > n0 else None
    value = measured if measured is not None else est
    pss = [s["preprocess"].get("peak_pss_tree_mb") for s in sizes if s.get("preprocess")]
    at_target = [s for s in sizes if s.get("preprocess") and s["patients"] == RSS_TARGET_PATIENTS]
    return {
        "description": "preprocess 50k patients with peak RSS (summed over all processes) < 4 GB "
        "(4e9 bytes); PSS for information",
        "limit_mb": RSS_TARGET_MB,
        "measured_mb": measured,
        "measured_pss_mb": at_target[0]["preprocess"].get("peak_pss_tree_mb")
        if at_target
        else None,
        "pss_by_size_mb": pss,
        "extrapolated_mb": est,
        "met": None if value is None else value < RSS_TARGET_MB,
        "basis": "measured" if measured is not None else ("linear extrapolation" if est else None),
    }


def decode_targets(decode: dict) -> dict:
    """Whether our decode paths reach 0.8x the bare readers' throughput."""
    cxr, ecg = decode.get("cxr") or {}, decode.get("ecg") or {}
    j2k = decode.get("cxr_j2k_full_size") or {}
    r_cxr = cxr.get("ratio_read_cxr_transform")
    r_j2k = j2k.get("ratio_read_cxr_transform")
    r_ecg = ecg.get("ratio_read_ecg")
    return {
        "description": "our decode path >= 0.8x bare pydicom / wfdb files per second",
        "min_ratio": DECODE_TARGET,
        "dicom_ratio": r_cxr,
        "dicom_j2k_full_size_ratio": r_j2k,
        "wfdb_ratio": r_ecg,
        "dicom_met": None if r_cxr is None else r_cxr >= DECODE_TARGET,
        "dicom_j2k_full_size_met": None if r_j2k is None else r_j2k >= DECODE_TARGET,
        "wfdb_met": None if r_ecg is None else r_ecg >= DECODE_TARGET,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[2000, 20000, 50000],
        help="patients per corpus (default 2000 20000 50000)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(512, 1024),
        metavar=("MIN", "MAX"),
        help="radiograph side range of the synthetic DICOMs (default 512 1024)",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="worker counts for the scaling runs; sizes use the largest",
    )
    p.add_argument(
        "--scaling-sizes",
        type=int,
        nargs="*",
        default=None,
        help="sizes at which to compare worker counts (default: the smallest size)",
    )
    p.add_argument("--scaling-reps", type=int, default=2, help="runs per worker count")
    p.add_argument("--work", default="runs/bench", help="corpora and caches go here")
    p.add_argument(
        "--config",
        default=str(REPO / "configs" / "tiny" / "fusemoe.yaml"),
        help="run config whose data section drives preprocess",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-files", type=int, default=200, help="files per decode comparison")
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument(
        "--decode-j2k-files",
        type=int,
        default=6,
        help="JPEG 2000 radiographs for the decode comparison (0 skips them)",
    )
    p.add_argument(
        "--decode-j2k-shape",
        type=int,
        nargs=2,
        default=(3056, 2544),
        metavar=("ROWS", "COLS"),
        help="their size (default 3056 2544, MIMIC-CXR's most common)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="skip a size whose estimated synth + preprocess time exceeds this",
    )
    p.add_argument("--keep-cache", action="store_true", help="keep the caches built per size")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the steps in this process (fast smoke runs; RSS is this process's)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None, quiet: bool = False) -> dict:
    """Run the benchmark; print (unless ``quiet``) and return the JSON report."""
    args = parse_args(argv)
    set_threads(args.threads)
    env = environment()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes_out: list[dict] = []
    for n in sorted(args.sizes):
        est = estimate_minutes(sizes_out, n)
        if args.max_minutes is not None and est is not None and est > args.max_minutes:
            sizes_out.append(
                {"patients": n, "skipped": f"estimated {est} min > {args.max_minutes}"}
            )
            continue
        res = run_size(n, args, work)
        res["estimated_minutes_before"] = est
        sizes_out.append(res)
    scaling_at = args.scaling_sizes if args.scaling_sizes is not None else [min(args.sizes)]
    scaling = [run_scaling(n, args, work) for n in scaling_at] if len(args.workers) > 1 else []
    first = steps.corpus_dir(work, min(args.sizes), tuple(args.image_size), args.seed)
    decode = bench_decode(
        first,
        args.config,
        args.decode_files,
        args.decode_reps,
        args.decode_j2k_files,
        tuple(args.decode_j2k_shape),
    )
    report = {
        "benchmark": "pipeline",
        "environment": env,
        "settings": {
            "sizes": sorted(args.sizes),
            "image_size": list(args.image_size),
            "workers": args.workers,
            "config": args.config,
            "seed": args.seed,
            "in_process": args.in_process,
            "rss": "summed RSS of the step's process tree, polled every 0.1 s",
        },
        "sizes": sizes_out,
        "scaling_with_size": steps.size_scaling(sizes_out),
        "scaling_with_workers": scaling,
        "decode": decode,
        "targets": {"decode": decode_targets(decode), "rss_50k": rss_target(sizes_out)},
    }
    return finish(report, args.out, quiet)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(steps.child(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        main()
