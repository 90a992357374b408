"""``clinical-moe preprocess --config CONFIG [key=value ...]``: raw files -> the model-ready cache.

Reads the corpus at ``data.root`` (MIMIC layout, real or synthetic), decodes each image and ECG once
into the decode store (``data.decode_store``, shared by every task, seed and window), writes the
task's arrays and manifest to ``data.cache_dir``, and prints the summary: stays per split,
modalities present, and every file skipped with its reason. Re-running resumes: files already in
the store are never decoded again. ``--engine ray`` decodes on a Ray cluster; ``--shard I/N`` jobs
and one ``--finalize`` split the decoding over a job array.

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
    p.add_argument(
        "--shard",
        type=shard_part,
        metavar="I/N",
        help="decode only job I of N (0-based; files k with k %% N == I of the sorted file list) "
        "into the decode store, e.g. in a job array; then run --finalize once",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="assemble the cache once every --shard job is done (names the files still missing)",
    )
    p.add_argument(
        "--engine",
        choices=("pool", "ray"),
        help="where files are decoded: pool (local processes, default) or ray (a Ray cluster: "
        "data.ray_address; pip install 'clinical-moe[ray]'); same as data.engine",
    )
    p.set_defaults(func=run)
    return p


def shard_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def run(args: argparse.Namespace) -> int:
    from clinical_moe.data.cache import build_cache

    overrides = list(args.overrides)
    if getattr(args, "engine", None):
        overrides.append(f"data.engine={args.engine}")
    cfg = load_config(args.config, overrides)  # every config check, before any work
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root {root} is not a folder; generate a corpus with `clinical-moe synth` or "
            "set data.root=<folder holding mimic-iv/>"
        )
    quiet = args.quiet or not sys.stderr.isatty()
    t0 = time.perf_counter()
    part, finalize = getattr(args, "shard", None), getattr(args, "finalize", False)
    cache = build_cache(cfg, resume=args.resume, quiet=quiet, part=part, finalize=finalize)
    from clinical_moe.data.cache import last_decode
    from clinical_moe.data.decode_store import store_root

    decoded = (
        f"decoded {last_decode.get('decoded', 0)} of {last_decode.get('planned', 0)} files "
        f"into {store_root(cfg.data)}"
    )
    if part is not None:  # issue 13: one job of several; --finalize assembles
        elapsed = time.perf_counter() - t0
        print(f"decode job {part[0]}/{part[1]} done in {elapsed:.1f} s: {decoded}")
        return 0
    summary = json.loads((cache / "summary.json").read_text())
    elapsed = time.perf_counter() - t0
    print(f"cache: {cache}  ({summary['num_stays']} stays in {elapsed:.1f} s)")
    if last_decode:
        print(f"  {decoded} (the rest were there already)")
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
