"""``train.select``: which weights a run keeps (final epoch by default, or best val AUROC)."""

from __future__ import annotations

import pytest
import torch

from clinical_moe.config import ConfigError, load_config
from clinical_moe.training.checkpoint import load_checkpoint
from pipelines import train as train_pipeline

from .conftest import CONFIGS, tiny_overrides


def _train(toy_cache, tmp_path, name: str, **extra) -> tuple[dict, dict]:
    args = [
        "--config",
        str(CONFIGS / "tiny" / "concat.yaml"),
        "--quiet",
        *tiny_overrides(
            toy_cache,
            tmp_path,
            **{"tracking.run_name": name, "train.max_steps_per_epoch": 2, **extra},
        ),
    ]
    assert train_pipeline.main(args) == 0
    ckpt = tmp_path / "ckpt" / name
    return load_checkpoint(ckpt / "best.pt"), load_checkpoint(ckpt / "last.pt")


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_final_keeps_the_last_epoch_and_never_stops_early(toy_cache, tmp_path):
    # lr 0: val AUROC never improves after epoch 1, which stops a best_val_auroc run at once
    best, last = _train(
        toy_cache, tmp_path, "final", **{"train.epochs": 3, "train.patience": 1, "train.lr": 0}
    )
    assert last["epoch"] == 3  # all epochs ran
    assert last["early_stopping"]["best_epoch"] == 2  # 0-based: the last one is kept
    # with learning, best.pt holds exactly the final weights
    best, last = _train(toy_cache, tmp_path, "final-learning", **{"train.epochs": 3})
    assert _same(best["model"], last["model"])


def test_best_val_auroc_stops_early_and_keeps_the_best_epoch(toy_cache, tmp_path):
    best, last = _train(
        toy_cache,
        tmp_path,
        "best",
        **{"train.epochs": 3, "train.patience": 1, "train.lr": 0, "train.select": "best_val_auroc"},
    )
    assert last["epoch"] == 2 and last["early_stopping"]["stopped"]  # stopped after epoch 2
    assert last["early_stopping"]["best_epoch"] == 0


def test_an_unknown_selection_is_refused():
    with pytest.raises(ConfigError, match="train.select"):
        load_config(CONFIGS / "tiny" / "concat.yaml", ["train.select=best"])
