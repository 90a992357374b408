"""What every subcommand shares: thread defaults, logging flags, help text, quiet downloads.

This module imports only the standard library so that ``clinical-moe --help`` stays fast; torch is
imported by :func:`apply_threads` only when a command actually runs.
"""

from __future__ import annotations

import argparse
import os
import re

#: Environment variables that size the OpenMP / BLAS thread pools of this process and its children.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def add_common_options(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--log-level``, ``--debug`` and ``--threads``, accepted before or after the subcommand.

    On a subcommand the defaults are suppressed so that a value given before the subcommand is
    not overwritten by the subcommand's default.
    """
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        default=default("INFO"),
        metavar="LEVEL",
        help="logging level: DEBUG, INFO (default), WARNING, ERROR",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the full traceback of an error (and DEBUG logging)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default(None),
        metavar="N",
        help="CPU threads per process for torch / OpenMP (default 1, or $OMP_NUM_THREADS; "
        "for train also train.num_threads)",
    )


def default_threads(requested: int | None = None) -> int:
    """Threads to use: ``requested`` if given, else ``$OMP_NUM_THREADS`` if set, else 1.

    One intra-op thread per process never oversubscribes a shared machine (torch's own default is
    one thread per core, which on a busy 2-core machine made training 7-13x slower).
    """
    if requested is not None and requested > 0:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def apply_threads(requested: int | None = None) -> int:
    """Size the thread pools of this process (and, via the environment, of its workers)."""
    n = default_threads(requested)
    for key in THREAD_ENV:
        if requested is not None or key not in os.environ:
            os.environ[key] = str(n)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def quiet_downloads() -> None:
    """Keep MLflow's artifact download bars out of the console (our own bars say what happens)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data):`~?([^`]+)`")


def plain_help(doc: str | None) -> str:
    """A module docstring as terminal help: reST roles and double backticks removed."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc or "")
    text = re.sub(r"::$", ":", text, flags=re.MULTILINE)  # reST's literal-block marker
    return text.replace("``", "`")
