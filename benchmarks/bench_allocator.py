"""glibc keeping freed memory for reuse (the training commands' default) against glibc's default.

For each round and each setting (alternating, so both see the same machine load), one
``bench_shapes`` child runs the chosen shapes: train-step time, FLOP fraction and peak RSS per
shape. The report gives each shape's per-round figures, the medians, and the median of the
per-round time ratios ``default / retained`` (> 1: keeping freed memory is faster). See
:mod:`clinical_moe.allocator` for what the setting does.

Usage::

    python -m benchmarks.bench_allocator --rounds 3 --out benchmarks/results/allocator.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    add_common_args,
    check_ok,
    environment,
    finish,
    median,
    run_measured,
)

#: The issue-16 shapes at B 64, where the FLOP-fraction target applies.
SHAPES = ("flex_moe_b64", "conf_smoe_none_missing", "conf_smoe_half_missing", "i2moe_4x48")


def one_child(retain: bool, args: argparse.Namespace) -> dict[str, dict]:
    """One ``bench_shapes`` run of ``args.shapes`` under one setting: ``{shape: row}``."""
    flag = "--retain-freed-memory" if retain else "--no-retain-freed-memory"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shapes.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_shapes", "--shapes", *args.shapes, flag]
        cmd += ["--threads", str(args.threads), "--reps", str(args.reps), "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        res = run_measured(cmd, env={"OMP_NUM_THREADS": str(max(args.threads, 1))})
        check_ok(res, f"bench_shapes ({flag})")
        report = json.loads(out.read_text())
    return {row["name"]: row for row in report["shapes"]}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and prints / writes) the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per shape and child")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--quick", action="store_true", help="bench_shapes --quick (smoke run)")
    args = parser.parse_args(argv)
    report = {"benchmark": "allocator", "environment": environment(), "rounds": args.rounds}
    report["quick"] = args.quick
    runs: dict[bool, list[dict[str, dict]]] = {True: [], False: []}
    for r in range(args.rounds):
        for retain in (True, False) if r % 2 == 0 else (False, True):
            runs[retain].append(one_child(retain, args))
            print(f"[bench_allocator] round {r + 1}, retain={retain}: done", file=sys.stderr)
    keys = ("train_ms", "train_flop_fraction", "eval_ms", "peak_rss_mb")
    rows = []
    for name in args.shapes:
        row: dict = {"name": name}
        for retain, tag in ((True, "retained"), (False, "default")):
            for k in keys:
                vals = [run[name][k] for run in runs[retain]]
                row[f"{tag}_{k}"] = vals
                row[f"{tag}_{k}_median"] = median(vals)
            row[f"{tag}_applied"] = [bool(run[name]["retain_freed_memory"]) for run in runs[retain]]
        pairs = zip(row["default_train_ms"], row["retained_train_ms"], strict=True)
        row["default_over_retained_train"] = round(median([d / t for d, t in pairs]), 3)
        rows.append(row)
        print(
            f"[bench_allocator] {name}: default / retained train step "
            f"{row['default_over_retained_train']}x, FLOP fraction "
            f"{row['default_train_flop_fraction_median']} -> "
            f"{row['retained_train_flop_fraction_median']}",
            file=sys.stderr,
        )
    report["shapes"] = rows
    return finish(report, args.out)


if __name__ == "__main__":
    main()
