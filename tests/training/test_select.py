"""Which weights a run keeps: ``train.select`` (final epoch by default, or best val AUROC) and
``train.ema_decay`` (a running average of the weights instead of the live ones)."""

from __future__ import annotations

import pytest
import torch

from clinical_moe.config import ConfigError, load_config
from clinical_moe.data.dataset import Collator
from clinical_moe.training.checkpoint import CheckpointDir, load_checkpoint
from clinical_moe.training.engine import Trainer
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


def test_ema_averages_the_live_weights_after_every_step(toy_cache, tmp_path):
    cfg = load_config(
        CONFIGS / "tiny" / "concat.yaml",
        tiny_overrides(toy_cache, tmp_path, **{"train.ema_decay": 0.75, "train.batch_size": 16}),
    )
    trainer = Trainer(cfg, toy_cache, CheckpointDir(tmp_path / "ckpt" / "ema"), quiet=True)
    collate = Collator(trainer.data.train)
    batches = [collate([trainer.data.train[i] for i in range(j, j + 16)]) for j in (0, 16, 32)]
    live = []
    for batch in batches:
        trainer.train_step(batch)
        live.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    expected = live[0]  # the first update copies, then w <- 0.75 w + 0.25 w_live
    for step in live[1:]:
        expected = {k: 0.75 * expected[k] + 0.25 * step[k] for k in expected}
    kept = dict(trainer.kept_model.named_parameters())
    moved = 0
    for k, value in expected.items():
        torch.testing.assert_close(kept[k], value, rtol=1e-6, atol=1e-6, msg=k)
        moved += not torch.equal(kept[k], live[-1][k])
    assert moved > 0  # the average is not the live model
    # buffers are the live model's, not averaged
    for (name, b), (_, b_live) in zip(
        trainer.kept_model.named_buffers(), trainer.model.named_buffers(), strict=True
    ):
        assert torch.equal(b, b_live), name


def test_ema_weights_are_what_best_pt_keeps(toy_cache, tmp_path):
    best, last = _train(toy_cache, tmp_path, "ema", **{"train.epochs": 2, "train.ema_decay": 0.9})
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert set(ema) == set(best["model"])
    assert _same(best["model"], ema)  # the final epoch's average ...
    assert not _same(best["model"], last["model"])  # ... not the live weights
    assert int(last["ema"]["n_averaged"]) == last["step"]
    plain_best, plain_last = _train(toy_cache, tmp_path, "no-ema", **{"train.epochs": 2})
    assert "ema" not in plain_last and _same(plain_best["model"], plain_last["model"])


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_an_ema_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(CONFIGS / "tiny" / "concat.yaml", [f"train.ema_decay={decay}"])
