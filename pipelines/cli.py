"""``clinical-moe``: one command with a subcommand per pipeline (synth, preprocess, train, ...).

Each pipeline module exposes ``add_parser(subparsers)``, which registers its subcommand and sets
``func`` to the function that runs it; this file only composes them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Pipeline modules, in the order of the flow.
PIPELINES = ("synth", "preprocess", "train", "evaluate", "attribute")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinical-moe",
        description="Clinical multimodal learning with missing modalities (MIMIC-style data).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in PIPELINES:
        try:
            module = importlib.import_module(f"pipelines.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pipelines.{name}":
                raise
            continue  # pipeline not part of this build
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
