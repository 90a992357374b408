"""Unit tests of the training building blocks: metrics, losses, dropout, sampler, routing, checkpoints."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from clinical_moe.metrics import auprc, auroc, classification_metrics, f1, probabilities
from clinical_moe.training.checkpoint import (
    CheckpointDir,
    atomic_save,
    capture_rng,
    load_checkpoint,
    restore_rng,
)
from clinical_moe.training.engine import build_scheduler
from clinical_moe.training.losses import infer_task, num_classes_for, task_loss
from clinical_moe.training.routing_stats import routing_stats
from clinical_moe.training.sampling import TrainSampler, modality_dropout


def test_binary_metrics_known_values():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])
    assert auroc(y, p) == pytest.approx(0.75)
    assert auprc(y, p) == pytest.approx((1.0 + 2 / 3) / 2)
    assert f1(y, p) == pytest.approx(0.5)
    assert f1(y, p, threshold=0.3) == pytest.approx(0.8)
    m = classification_metrics(y, p, threshold=0.3)
    assert set(m) == {"auroc", "auprc", "f1", "f1_at_threshold"}


def test_one_class_split_gives_nan_not_an_error():
    y = np.ones(5)
    p = np.linspace(0, 1, 5)
    assert math.isnan(auroc(y, p)) and math.isnan(auprc(np.zeros(5), p))
    assert math.isnan(auroc(np.array([]), np.array([])))
    assert math.isnan(auroc(np.zeros(4, int), np.eye(3)[[0, 1, 2, 0]], "multiclass"))


def test_multilabel_and_multiclass_metrics():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])  # second label has one class only
    p = np.array([[0.2, 0.5], [0.8, 0.5], [0.3, 0.5], [0.7, 0.5]])
    assert auroc(y, p, "multilabel") == pytest.approx(1.0)  # macro over defined labels
    yc = np.array([0, 1, 2, 2])
    pc = probabilities(torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3], [0, 1, 2]]), "multiclass")
    assert auroc(yc, pc, "multiclass") == pytest.approx(1.0)
    assert f1(yc, pc, "multiclass") == pytest.approx(1.0)


def test_task_inference_and_losses():
    assert infer_task(["label"], np.array([0, 1, 1.0])) == "binary"
    assert infer_task(["label"], np.array([0, 2, 1.0])) == "multiclass"
    assert infer_task(["a", "b"]) == "multilabel"
    assert num_classes_for("multiclass", ["label"], np.array([0, 2, 1])) == 3
    logits = torch.tensor([[0.0], [2.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], torch.tensor([0.0, 1.0])
    )
    assert torch.allclose(task_loss(logits, torch.tensor([0.0, 1.0]), "binary"), expected)
    assert task_loss(torch.randn(3, 4), torch.tensor([0.0, 3.0, 1.0]), "multiclass").shape == ()
    assert task_loss(torch.randn(3, 2), torch.ones(3, 2), "multilabel").shape == ()
    with pytest.raises(ValueError, match="unknown task"):
        task_loss(logits, torch.zeros(2), "regression")


def test_modality_dropout_keeps_a_modality_and_only_drops():
    gen = torch.Generator().manual_seed(0)
    present = torch.rand(2000, 4, generator=gen) < 0.6
    present[~present.any(1), 0] = True
    out = modality_dropout(present, 0.9, torch.Generator().manual_seed(1))
    assert bool(out.any(1).all()), "a sample lost every modality"
    assert not bool((out & ~present).any()), "dropout revealed an absent modality"
    single = present.sum(1) == 1
    assert torch.equal(out[single], present[single])  # nothing to drop from a single modality
    rate = 1 - out.sum() / present.sum()
    assert 0.5 < float(rate) < 0.9
    assert modality_dropout(present, 0.0, gen) is present
    again = modality_dropout(present, 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_single_modality_rows_show_one_present_modality_each_uniformly():
    gen = torch.Generator().manual_seed(0)
    present = torch.ones(4000, 4, dtype=torch.bool)
    present[:2000, 3] = False  # half the rows lack the last modality
    out = modality_dropout(present, 0.3, torch.Generator().manual_seed(2), single=0.25)
    assert not bool((out & ~present).any()) and bool(out.any(1).all())
    ones = out.sum(1) == 1
    # independent drops at 0.3 give one modality to 0.3^3 * 0.7 * 4 (four) / 0.3^2 * 0.7 * 3
    # (three) of the rows, about 8% / 19%; the single rows add 25%
    four, three = 4 * 0.7 * 0.3**3 + 0.3**4, 3 * 0.7 * 0.3**2 + 0.3**3  # (all dropped: one kept)
    expected = 0.25 + 0.75 * (0.5 * four + 0.5 * three)
    assert abs(float(ones.float().mean()) - expected) < 0.03
    chosen = out[ones & ~present[:, 3]].float().mean(0)  # among 3 present: uniform, never the 4th
    assert float(chosen[3]) == 0.0 and float((chosen[:3] - 1 / 3).abs().max()) < 0.05
    base = modality_dropout(present, 0.3, torch.Generator().manual_seed(2))
    assert float((base.sum(1) == 1).float().mean()) < expected - 0.15  # the option changes it
    assert torch.equal(modality_dropout(present, 0.0, gen, single=0.0), present)


@pytest.mark.parametrize("kind", ["random", "by_modality_count"])
def test_sampler_resume_skips_exactly_the_seen_batches(kind):
    present = np.random.default_rng(0).random((50, 3)) < 0.6
    s = TrainSampler(present, kind, seed=3, warmup_epochs=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=16)
    assert list(s) == full[16:] and len(s) == len(full) - 16
    s.set_epoch(3)
    assert list(s) != full  # a new order every epoch
    ranks = [TrainSampler(present, kind, seed=3, num_replicas=3, rank=r) for r in range(3)]
    parts = [list(r) for r in ranks]
    assert len({len(p) for p in parts}) == 1  # equal steps on every rank
    assert len(set(sum(parts, []))) == sum(len(p) for p in parts)  # disjoint


def test_routing_stats_counts_fractions_and_entropy():
    B, T, E = 2, 4, 2
    probs = torch.full((B, T, E), 0.5)
    topk = torch.tensor([[[0], [1], [0], [-1]], [[1], [0], [1], [-1]]])  # token 3 is padding
    gates = {
        "layer0/router_probs": probs,
        "layer0/topk": topk,
        "token_modality": torch.tensor([0, 0, 1, 1]),
    }
    out = routing_stats([gates], ["ehr", "cxr"])
    assert out["routing/layer0/load_entropy"] == pytest.approx(1.0)  # 3 vs 3: balanced
    assert out["routing/layer0/router_entropy"] == pytest.approx(1.0)
    assert out["routing/layer0/ehr/expert0"] == pytest.approx(0.5)
    assert out["routing/layer0/cxr/expert0"] == pytest.approx(0.5)  # only the real cxr tokens
    # ConfSMoE-style keys (topk_idx, no token_modality), I2MoE weights, dense heads: no crash
    out = routing_stats(
        [{"layer1/router_probs": probs, "layer1/topk_idx": torch.zeros(B, T, 1)}], ["a"]
    )
    assert out["routing/layer1/load_entropy"] == pytest.approx(0.0)
    w = {"interaction_weights": torch.tensor([[0.5, 0.25, 0.25, 0.0]])}
    assert routing_stats([w], ["ehr", "cxr"])["routing/interaction_weights/U_ehr"] == 0.5
    assert routing_stats([{}, {"combination_id": torch.zeros(2)}], ["ehr"]) == {}


def test_checkpoint_atomic_weights_only_and_rng_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = {"model": torch.nn.Linear(2, 2).state_dict(), "rng": [capture_rng(gen)], "epoch": 1}
    path = atomic_save(state, tmp_path / "x" / "last.pt")
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    loaded = load_checkpoint(path)  # weights_only=True
    restore_rng(loaded["rng"][0], gen)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
    d = CheckpointDir(tmp_path / "x")
    d.write_run({"run_id": "abc"})
    assert d.read_run()["run_id"] == "abc"
    d.clear()
    assert not d.last.exists() and d.read_run() == {}


def test_scheduler_warmup_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", warmup=2, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.1
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
