"""Integrated Gradients per modality: completeness, absent modalities, agreement with the model."""

from __future__ import annotations

import pytest
import torch

from clinical_moe import list_models
from clinical_moe.attribution import PresenceGame, Target, modality_integrated_gradients
from clinical_moe.model import MultimodalModel
from clinical_moe.testing import random_batch

from .conftest import tiny_model

TARGET = Target(base_log_odds=-1.0)


def _routes(model: MultimodalModel, batch) -> bool:
    with torch.no_grad():
        return any(k.endswith("router_probs") for k in model(batch).gates)


@pytest.mark.parametrize("name", list_models())
def test_completeness_and_absent_modalities(name):
    model = tiny_model(name)
    batch = random_batch(model, batch_size=6, seed=11)
    game = PresenceGame(model, batch, TARGET)
    attr, delta, base = modality_integrated_gradients(game, n_steps=64)
    full = game.full_values()
    # delta is what captum says is missing from completeness: check it against the model
    torch.testing.assert_close(delta, attr.sum(1) - (full - base), atol=1e-4, rtol=1e-4)
    assert torch.all(attr[~batch.present] == 0)
    if not _routes(model, batch):
        # smooth heads: sum over modalities = F(x) - F(zero tokens), up to quadrature error
        scale = (full - base).abs().max().item() + 1e-3
        assert delta.abs().max().item() < 0.05 * scale + 1e-4, (name, delta)
    # the baseline really is the head on zero tokens with the masks kept
    zero = {m: type(t)(torch.zeros_like(t.tokens), t.mask) for m, t in game.tokens.items()}
    with torch.no_grad():
        expect = model.head(zero, batch.present).logits[:, 0]
    torch.testing.assert_close(base, expect, atol=1e-5, rtol=1e-5)


def test_late_fusion_attributes_only_present_modalities_and_is_complete():
    """Late fusion averages per-modality classifiers: each stay's IG lives on its own modalities."""
    model = tiny_model("late")
    present = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    batch = random_batch(model, batch_size=2, present=present, seed=12)
    game = PresenceGame(model, batch, TARGET)
    attr, delta, _ = modality_integrated_gradients(game, n_steps=64)
    assert attr[0, 1:].abs().sum() == 0 and attr[1, [0, 3]].abs().sum() == 0
    assert delta.abs().max() < 1e-3
