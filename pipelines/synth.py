"""``clinical-moe synth``: write the synthetic MIMIC-style corpus.

Usage::

    clinical-moe synth --out data/synth --n-patients 2000 --seed 0
    python -m pipelines.synth --out /tmp/synth --n-patients 200 --image-size 64 96 --quiet
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``synth`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic MIMIC-style corpus (MIMIC-IV, CXR, ECG, notes + truth)",
        description="Write a synthetic corpus in the real MIMIC layouts, with its generative "
        "truth (latent factors, true risk) in OUT/truth/.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-patients", type=int, default=200, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="master seed (same seed = same bytes)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default min(2, cpu count)); output is unchanged",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(512, 1024),
        help="radiograph side in pixels (default 512 1024)",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="patients per shard (default: from --n-patients; changes the "
        "output, unlike --workers)",
    )
    parser.add_argument(
        "--no-images",
        action="store_true",
        help="skip writing DICOM files (the CXR tables still list them)",
    )
    parser.add_argument("--no-signals", action="store_true", help="skip writing WFDB records")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a corpus already in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the corpus described by ``args`` and print a short summary (counts only)."""
    from clinical_moe.data.synthetic import generate_corpus

    summary = generate_corpus(
        args.out,
        n_patients=args.n_patients,
        seed=args.seed,
        workers=args.workers,
        image_size=tuple(args.image_size),
        quiet=args.quiet,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        write_images=not args.no_images,
        write_signals=not args.no_signals,
    )
    print("\n".join(summary.lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.synth``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.synth", description=__doc__)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
