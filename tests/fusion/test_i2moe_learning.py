"""I2MoE's weights follow the interaction: with our defaults (uniqueness experts that read only
their own modality, a task loss on every expert) the cross-modal experts (synergy and
redundancy) gain weight on the samples whose label needs both modalities; with the paper's
objective (every expert reads everything, only the mixture is trained) they do not."""

from __future__ import annotations

import torch

from clinical_moe import create_model
from clinical_moe.testing import random_batch
from tests.fusion.test_learning import _fit

MODS = ("a", "b", "c")  # c carries no signal and is present for half the samples


def _task(model, n: int, seed: int):
    """Label logit ``-2 + 1.5 A + 1.5 B + 3 A B`` with A, B the signs of a's and b's content:
    an additive part each unimodal expert can explain and an A-and-B interaction none can."""
    present = torch.ones(n, len(MODS), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed + 2)
    present[:, 2] = torch.rand(n, generator=gen) < 0.5
    batch = random_batch(model, n, present=present, seed=seed)
    bits = []
    for name, feature in (("a", 0), ("b", 1)):
        x, mask = batch.inputs[name]["x"], batch.inputs[name]["mask"]
        mean = (x[..., feature] * mask).sum(1) / mask.sum(1).clamp_min(1)  # (n,)
        bits.append((mean > 0).float())
    logit = -2.0 + 1.5 * bits[0] + 1.5 * bits[1] + 3.0 * bits[0] * bits[1]
    batch.labels = (torch.rand(n, generator=gen) < torch.sigmoid(logit)).float()
    return batch, (bits[0] * bits[1]).bool()


def _cross_modal_weight_gain(**head_kwargs) -> float:
    """Mean synergy + redundancy weight on interaction samples minus the others' (test split)."""
    torch.manual_seed(0)
    model = create_model("i2moe", modalities=MODS, d_model=16, num_tokens=2, **head_kwargs)
    (train, _), (test, both) = _task(model, 2048, seed=0), _task(model, 1024, seed=7)
    _fit(model, train, steps=400)
    with torch.no_grad():
        w = model(test).gates["interaction_weights"]  # (n, M + 2): U_a, U_b, U_c, S, R
    cross = w[:, len(MODS) :].sum(1)  # (n,)
    return float(cross[both].mean() - cross[~both].mean())


def test_cross_modal_experts_take_the_interaction_samples():
    ours = _cross_modal_weight_gain()
    paper = _cross_modal_weight_gain(uniqueness_inputs="all", lambda_expert=0.0)
    assert ours > 0.1, f"cross-modal weight gain on interaction samples {ours:.3f}"
    assert ours > paper + 0.1, f"ours {ours:.3f} vs the paper's objective {paper:.3f}"
