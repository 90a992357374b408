"""``clinical-moe preprocess --config CONFIG [key=value ...]``: raw files -> the model-ready cache.

Reads the corpus at ``data.root`` (MIMIC layout, real or synthetic), writes arrays and a manifest to
``data.cache_dir``, and prints the summary: stays per split, modalities present, and every file
skipped with its reason. Re-running resumes an interrupted pass.

A damaged required table (patients, admissions, icustays) stops the pass with one line naming the
file; a damaged, empty or header-only optional table is treated as absent (printed as a missing
source); damaged rows are dropped or repaired and counted by reason (``summary.json``:
``missing_sources``, ``damaged_rows``, ``empty_modalities``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clinical_moe.config import load_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preprocess", help="build the preprocessing cache from raw files", description=__doc__
    )
    p.add_argument("--config", help="run config YAML (data section used)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.root=/data")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the shards a previous (interrupted) run finished; --no-resume redoes every one",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from clinical_moe.data.cache import build_cache

    cfg = load_config(args.config, args.overrides)  # every config check, before any work
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root {root} is not a folder; generate a corpus with `clinical-moe synth` or "
            "set data.root=<folder holding mimic-iv/>"
        )
    quiet = args.quiet or not sys.stderr.isatty()
    t0 = time.perf_counter()
    cache = build_cache(cfg, resume=args.resume, quiet=quiet)
    summary = json.loads((cache / "summary.json").read_text())
    elapsed = time.perf_counter() - t0
    print(f"cache: {cache}  ({summary['num_stays']} stays in {elapsed:.1f} s)")
    print(f"  splits: {summary['split_counts']}")
    print(f"  present: {summary['present_counts']}")
    skipped = summary["skipped_files"]
    print(f"  skipped files: {skipped['total']} {skipped['by_modality_reason']}")
    for table, why in summary.get("missing_sources", {}).items():
        print(f"  missing source: {table} [{why['reason']}] {why['file'] or ''}".rstrip())
    for table, reasons in summary.get("damaged_rows", {}).items():
        print(f"  damaged rows: {table} {reasons}")
    for modality, why in summary.get("empty_modalities", {}).items():
        print(f"  empty modality: {modality}: {why}")
    print(f"  summary: {cache / 'summary.json'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.preprocess")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["preprocess", *(argv if argv is not None else sys.argv[1:])])
    from pipelines.common import apply_threads

    apply_threads(None)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
