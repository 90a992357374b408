"""Batch / ModalityTokens contracts, the model wrapper, and that the invariant checks can fail."""

from __future__ import annotations

import pytest
import torch

from clinical_moe import Batch, ModalityTokens, create_model
from clinical_moe.fusion.base import FusionHead, masked_mean, zero_loss
from clinical_moe.model import MultimodalModel, build_encoders
from clinical_moe.testing import cat_batches, noise_absent, noise_padding, random_batch
from clinical_moe.types import FusionOutput


def test_batch_validates_present_shape():
    with pytest.raises(ValueError, match="present must be"):
        Batch({}, torch.ones(3, 2, dtype=torch.bool), modalities=("a",))


def test_batch_select_and_with_present():
    b = random_batch(("a", "b"), 5, seed=0)
    sub = b.select(torch.tensor([4, 0]))
    assert sub.ids == [b.ids[4], b.ids[0]]
    assert torch.equal(sub.inputs["a"]["x"][0], b.inputs["a"]["x"][4])
    fewer = b.present.clone()
    fewer[:, 0] &= torch.tensor([True, False, True, False, True])
    assert torch.equal(b.with_present(fewer).present, fewer)
    more = b.present | True
    if not torch.equal(more, b.present):
        with pytest.raises(ValueError, match="never observed"):
            b.with_present(more)


def test_modality_tokens_checks_shapes():
    with pytest.raises(ValueError, match="mask must be"):
        ModalityTokens(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


def test_random_batch_zero_fills_absent_rows():
    present = torch.tensor([[True, False], [False, True]])
    b = random_batch(("a", "b"), 2, present=present, seed=1)
    assert b.inputs["a"]["x"][1].abs().sum() == 0 and b.inputs["b"]["x"][0].abs().sum() == 0
    assert b.inputs["a"]["x"][0].abs().sum() > 0


def test_masked_mean_ignores_masked_positions():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_unknown_head_and_kwarg_name_the_closest():
    with pytest.raises(KeyError, match="did you mean 'concat'"):
        create_model("concatt", modalities=("a",))
    with pytest.raises(TypeError, match="did you mean 'hidden'"):
        create_model("concat", modalities=("a",), hiden=3)


class _LeakyHead(FusionHead):
    """Deliberately broken: ignores ``present`` and mixes samples through a batch mean."""

    def __init__(self, modalities, d_model, num_classes, num_tokens=None, leak="absent"):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        self.leak = leak
        self.out = torch.nn.Linear(d_model, num_classes)

    def forward(self, tokens, present, labels=None):
        pooled = sum(t.tokens.mean(1) for t in tokens.values())  # padding and absent rows leak in
        if self.leak == "batch":
            pooled = pooled + pooled.mean(0, keepdim=True)
        logits = self.out(pooled)
        return FusionOutput(logits, zero_loss(logits))


def _leaky_model(leak):
    encs = build_encoders(("a", "b"), d_model=8, num_tokens=2)
    return MultimodalModel(encs, _LeakyHead(("a", "b"), 8, 1, leak=leak)).eval()


def test_invariant_checks_catch_a_batch_leak():
    model = _leaky_model("batch")
    a, b = random_batch(model, 3, seed=0), random_batch(model, 3, seed=1)
    with torch.no_grad():
        alone, mixed = model(a).logits, model(cat_batches(a, b)).logits[:3]
    assert not torch.allclose(alone, mixed, atol=1e-5)


def test_noise_helpers_change_what_they_should():
    model = _leaky_model("absent")
    b = random_batch(model, 6, seed=2)
    noisy = noise_absent(b)
    absent_rows = ~b.present[:, 0]
    assert absent_rows.any()
    assert not torch.equal(noisy.inputs["a"]["x"][absent_rows], b.inputs["a"]["x"][absent_rows])
    assert torch.equal(noisy.inputs["a"]["x"][~absent_rows], b.inputs["a"]["x"][~absent_rows])
    padded = noise_padding(b, model)
    pad = ~b.inputs["b"]["mask"]
    assert pad.any()
    assert not torch.equal(padded.inputs["b"]["x"][pad], b.inputs["b"]["x"][pad])


def test_encoder_runs_on_present_rows_only():
    calls = []
    model = create_model("late", modalities=("a", "b"), d_model=8, num_tokens=2)
    model.encoders["a"].register_forward_hook(
        lambda mod, inp, out: calls.append(inp[0]["x"].shape[0])
    )
    present = torch.tensor([[True, True], [False, True], [True, False]])
    model.eval()(random_batch(model, 3, present=present, seed=3))
    assert calls == [2]


def test_types_module_also_exposes_registry_and_config_loader():
    from clinical_moe import types

    assert types.list_models() == clinical_moe_list_models()
    assert types.create_model("late", modalities=("ehr",)).modalities == ("ehr",)
    with pytest.raises(types.ConfigError, match="epochs"):
        types.load_config({}, ["train.epoch=3"])
    with pytest.raises(AttributeError):
        types.not_a_name  # noqa: B018


def clinical_moe_list_models():
    from clinical_moe import list_models

    return list_models()


@pytest.mark.parametrize("name", ["fusemoe", "flex_moe", "concat"])
def test_head_present_hides_modalities_from_the_head_only(name):
    """Train-time dropout after encoding: the head sees hidden modalities as truly absent."""
    torch.manual_seed(0)
    mods = ("ehr", "cxr", "ecg")
    model = create_model(name, modalities=mods, d_model=16, num_tokens=2).eval()
    present = torch.ones(6, 3, dtype=torch.bool)
    batch = random_batch(model, 6, present=present, seed=4)
    shown = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0], [1, 1, 0]]).bool()
    with torch.no_grad():
        out, tokens = model(batch, return_tokens=True, head_present=shown)
        absent = model(batch.with_present(shown))
    torch.testing.assert_close(out.logits, absent.logits)
    assert tokens["cxr"].mask.all(), "encoders must still run on every present modality"
    with pytest.raises(ValueError, match="subset"):
        model(batch.with_present(shown), head_present=present)
