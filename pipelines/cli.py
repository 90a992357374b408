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
PIPELINES = ("synth", "preprocess", "pretrain", "train", "evaluate", "attribute")


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
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"clinical-moe {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise  # --log-level DEBUG shows the traceback
        print(f"clinical-moe {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


#: Errors a user can fix (a key, a path, a damaged file, a missing package): reported in one line
#: naming the key or file, without a traceback (``--log-level DEBUG`` shows it). Loader, table,
#: config and checkpoint errors all derive from ValueError.
USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (KeyError's quotes dropped), never empty."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
