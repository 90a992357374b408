"""``clinical-moe configs list`` / ``clinical-moe configs cp NAME DEST``: the shipped configs.

As torchtune's ``tune ls`` / ``tune cp``: the configs ship inside the package, so they exist
wherever ``clinical-moe`` is installed. ``cp`` copies one to edit; ``--config NAME`` also takes a
packaged name directly (``--config tiny/fusemoe``). An ``include:`` in a copy still finds the
packaged file it names (see ``clinical_moe.config.find_config``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "configs",
        help="list the configs shipped with the package, or copy one to edit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="name every packaged config (with its first comment line)")
    cp = sub.add_parser("cp", help="copy a packaged config to a file or folder")
    cp.add_argument("name", help="packaged name, e.g. tiny/fusemoe or demo/late.yaml")
    cp.add_argument("dest", help="file or existing folder to copy it to")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=run)
    return p


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def run(args: argparse.Namespace) -> int:
    from clinical_moe.config import PACKAGED, find_config, packaged_configs

    if args.action == "list":
        names = packaged_configs()
        width = max(len(n) for n in names)
        for name in names:
            print(f"{name:<{width}}  {_summary(PACKAGED / name)}")
        return 0
    src = find_config(args.name)
    if PACKAGED.resolve() not in src.resolve().parents:
        raise FileNotFoundError(
            f"no packaged config {args.name!r}; `clinical-moe configs list` names them"
        )
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src.resolve().relative_to(PACKAGED.resolve()).as_posix()} -> {dest}")
    return 0
