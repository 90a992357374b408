"""``clinical-moe pretrain --config CONFIG [key=value ...] [--modality cxr ecg] [--out DIR]``.

Trains each selected encoder alone on its modality's own per-event labels (CheXpert findings per
chest X-ray, machine statements and intervals per ECG), one MLflow run per modality, and writes
``<DIR>/<modality>.pt`` (default ``pretrain.out_dir``). Any head's config then loads it::

    model:
      encoders:
        cxr: {pretrained: runs/pretrained/cxr.pt, freeze: backbone}

``freeze: backbone`` freezes the feature extractor and trains the token projection (any
``d_model`` / ``num_tokens``); ``freeze: true`` freezes the whole encoder (the file must then match
the head's ``d_model`` / ``num_tokens``). Reusing one pretrained encoder across all heads is the
documented route for comparing heads. Also ``python -m pipelines.pretrain --config ...``.

The encoder options come from ``model.encoders.<modality>`` (and ``model.d_model`` /
``model.num_tokens``) of the same config, so pretrain with the config family of the heads that will
load the weights; the cache is built from ``data.root`` when absent.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from clinical_moe.config import load_config
from clinical_moe.training import distributed as D

log = logging.getLogger("clinical_moe.pretrain")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain encoders on their modality-native labels (tracked in MLflow)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML, e.g. configs/demo/late.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. pretrain.epochs=5")
    p.add_argument(
        "--modality",
        nargs="+",
        default=None,
        help="encoders to pretrain (default: pretrain.modalities, i.e. cxr ecg)",
    )
    p.add_argument("--out", default=None, help="output directory (default: pretrain.out_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from clinical_moe.training.pretrain import pretrain_encoders
    from pipelines.train import ensure_cache

    cfg = load_config(args.config, args.overrides)  # config errors surface here, first
    if getattr(args, "threads", None):
        cfg.train.num_threads = args.threads  # --threads wins over the config
    quiet = args.quiet or not sys.stderr.isatty()
    ensure_cache(cfg, D.DistInfo(), quiet)
    results = pretrain_encoders(cfg, args.modality, args.out, quiet=quiet)
    for m, r in results.items():
        auc = r["metrics"].get("best_val_mean_auroc", math.nan)
        print(
            f"{m}: {r['path']} (MLflow run {r['run_id']}, best epoch {r['best_epoch'] + 1}, "
            f"val mean AUROC {auc:.4f}); load it with "
            f"model.encoders.{m}.pretrained={r['path']} model.encoders.{m}.freeze=backbone"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipelines.common import apply_threads

    apply_threads(None)
    parser = argparse.ArgumentParser(prog="python -m pipelines.pretrain")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["pretrain", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
