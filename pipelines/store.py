"""``clinical-moe store info | prune``: what the decode store holds, and reclaiming its space.

The decode store (``data.decode_store``, default ``decoded/`` beside the cache folder) keeps each
decoded image, ECG, tokenized note and EHR table pass for every task, seed and window. It only
grows. ``info`` lists its folders (settings, entries, skipped files, size) and the caches beside
it. ``prune`` removes the temporary files that killed writers left (older than
``--temp-age-hours``, so a running build is never disturbed), and, as asked:

- ``--unreferenced``: every image / ECG entry (and folder) that no cache refers to: the caches
  beside the store and those named with ``--cache``;
- ``--other-settings``: every folder the ``--config`` build does not read (other image sizes, ECG
  lengths, tokenizers, EHR windows or table versions).

Caches that used what was removed are rebuilt by ``train`` and refused by ``evaluate``.
``--dry-run`` says what would go.

Examples::

    clinical-moe store info --config configs/demo/fusemoe.yaml
    clinical-moe store prune --config configs/demo/fusemoe.yaml --other-settings --dry-run
    clinical-moe store prune --store /data/decoded --unreferenced --cache /scratch/cache-los7
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "store",
        help="list what the decode store holds, or prune what no build will read again",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="each folder: settings, entries, skips, size; the caches")
    prune = sub.add_parser(
        "prune", help="remove leftover temporary files, unreferenced entries, other settings"
    )
    for q in (info, prune):
        q.add_argument("--config", help="run config whose data.decode_store (and settings) to use")
        q.add_argument("--store", help="the decode store folder (instead of --config)")
        q.add_argument("overrides", nargs="*", help="config overrides, e.g. data.image_size=64")
    prune.add_argument(
        "--other-settings",
        action="store_true",
        help="also remove every folder the --config build does not read",
    )
    prune.add_argument(
        "--unreferenced",
        action="store_true",
        help="also remove image / ECG entries no cache beside the store (or --cache) refers to",
    )
    prune.add_argument(
        "--cache",
        action="append",
        default=[],
        metavar="DIR",
        help="a cache elsewhere whose entries --unreferenced keeps (repeatable)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count and list, remove nothing")
    prune.add_argument(
        "--temp-age-hours",
        type=float,
        default=1.0,
        help="temporary files younger than this belong to a running build and stay (default 1)",
    )
    p.set_defaults(func=run)
    return p


def _config(args: argparse.Namespace):
    from clinical_moe.config import load_config

    if args.config is None:
        if args.store is None:
            raise ValueError("give --config CONFIG or --store FOLDER")
        return None
    return load_config(args.config, list(args.overrides))


def run(args: argparse.Namespace) -> int:
    from clinical_moe.data.decode_store import store_root
    from clinical_moe.data.store_admin import (
        current_folders,
        find_caches,
        folder_report,
        prune_store,
        store_folders,
    )

    cfg = _config(args)
    root = Path(args.store) if args.store else store_root(cfg.data)
    if args.action == "info":
        used = current_folders(cfg) if cfg is not None else set()
        rows = [folder_report(f) for f in store_folders(root)]
        print(f"decode store {root}: {len(rows)} folders, {sum(r['mb'] for r in rows):.1f} MB")
        for r in rows:
            mark = "*" if r["folder"] in used else " "
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "modality")
            counts = "" if r["kind"] == "ehr" else f"{r['entries']} entries, {r['skips']} skipped, "
            print(f" {mark} {r['folder']:<20} {counts}{r['mb']:.1f} MB  ({settings})")
        if used:
            print("   (* = read by this config)")
        caches = find_caches(root)
        print(f"caches beside it that refer to it: {len(caches)}")
        for cache in caches:
            print(f"  {cache}")
        return 0
    if args.other_settings and cfg is None:
        raise ValueError(
            "prune --other-settings needs --config CONFIG (the build whose folders stay)"
        )
    keep = current_folders(cfg) if args.other_settings else None
    caches = find_caches(root, args.cache) if args.unreferenced else None
    if caches is not None:
        print(f"keeping what {len(caches)} caches refer to: " + ", ".join(map(str, caches)))
    out = prune_store(root, keep, caches, args.dry_run, temp_age_s=args.temp_age_hours * 3600)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {out['temporary']} temporary files, {out['unreferenced']} unreferenced entries "
        f"and {out['folders']} folders from {root}: {out['freed_mb']:.1f} MB"
    )
    for name in out["removed_folders"]:
        print(f"  folder {name}")
    return 0
