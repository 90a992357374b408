"""``clinical-moe``: one command with a subcommand per pipeline (synth, preprocess, train, ...).

Each pipeline module exposes ``add_parser(subparsers)``, which registers its subcommand and sets
``func`` to the function that runs it. Only the module of the subcommand being run is imported
(the others are listed by their one-line help), so ``clinical-moe --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clinical_moe.allocator import retain_freed_memory_by_default
from pipelines.common import add_common_options, apply_threads, plain_help, quiet_downloads

#: Subcommands in the order of the flow, with their one-line help.
PIPELINES = {
    "synth": "write a synthetic MIMIC-style corpus (MIMIC-IV, CXR, ECG, notes + truth)",
    "preprocess": "build the preprocessing cache from raw files",
    "pretrain": "pretrain encoders on their modality-native labels (tracked in MLflow)",
    "train": "train a fusion head (tracked in MLflow)",
    "evaluate": "evaluate runs under simulated missingness",
    "attribute": "per-modality attribution report of a trained run",
    "configs": "list the configs shipped with the package, or copy one to edit",
    "store": "list what the decode store holds, or prune what no build will read again",
}

#: Subcommands that train or run models: glibc keeps their freed memory for reuse
#: (:mod:`clinical_moe.allocator`; not synth / preprocess, whose pools count peak memory).
MODEL_COMMANDS = ("pretrain", "train", "evaluate", "attribute")

#: Top-level options that take a value (skipped when looking for the subcommand name).
_VALUED = ("--log-level", "--threads")


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("clinical-moe")
    except PackageNotFoundError:
        from clinical_moe import __version__

        return __version__


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (None for ``--help`` / ``--version`` / a typo)."""
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok in _VALUED:
            skip = True
        elif not tok.startswith("-"):
            return tok if tok in PIPELINES else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the named subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="clinical-moe",
        description="Clinical multimodal learning with missing modalities (MIMIC-style data).",
        epilog="`clinical-moe COMMAND --help` describes a command. Every command runs with one "
        "CPU thread per process unless --threads N (or $OMP_NUM_THREADS) says otherwise.",
    )
    parser.add_argument("--version", action="version", version=f"clinical-moe {version()}")
    add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = chosen_command(argv) if argv is not None else None
    for name, summary in PIPELINES.items():
        if argv is not None and name != wanted:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        try:
            module = importlib.import_module(f"pipelines.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pipelines.{name}":
                raise
            continue  # pipeline not part of this build
        p = module.add_parser(sub)
        p.description = plain_help(p.description)  # no raw reST on the terminal
        add_common_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    level = "DEBUG" if args.debug else str(args.log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_downloads()
    try:
        if args.command not in ("configs", "store"):
            apply_threads(args.threads)
        if args.command in MODEL_COMMANDS:
            retain_freed_memory_by_default()  # clinical_moe.allocator
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"clinical-moe {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug or logging.getLogger().isEnabledFor(logging.DEBUG):
            raise  # --debug (or --log-level DEBUG) shows the traceback
        print(f"clinical-moe {args.command}: error: {one_line(err)}", file=sys.stderr)
        hint = HINTS.get(type(err).__name__)
        if hint:
            print(f"  hint: {hint}", file=sys.stderr)
        return 2
    return int(result or 0)


#: Errors a user can fix (a key, a path, a damaged file, a missing package): reported in one line
#: naming the key or file, without a traceback (``--debug`` shows it). Loader, table, config and
#: checkpoint errors all derive from ValueError; an unknown run is a LookupError.
USER_ERRORS = (ValueError, OSError, ImportError, LookupError)

#: A second line for errors whose fix is always the same.
HINTS = {
    "ModuleNotFoundError": "install the missing package (see README, 'Install')",
}


def one_line(err: BaseException) -> str:
    """The error's message on one line (KeyError's quotes dropped), never empty."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
