"""Modality Shapley values and ablation: efficiency, brute force, null players, a planted model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from clinical_moe import list_models
from clinical_moe.attribution import (
    PresenceGame,
    Target,
    attribute_batch,
    by_modality,
    modality_ablation,
    modality_shapley,
)
from clinical_moe.fusion.base import FusionHead, masked_mean, zero_loss
from clinical_moe.model import MultimodalModel, build_encoders
from clinical_moe.testing import random_batch
from clinical_moe.types import FusionOutput

from .conftest import GENERIC4, tiny_model

BASE = -1.3  # v(empty): log-odds of a 21% prevalence
TARGET = Target(base_log_odds=BASE)


def _batch(model, n=10, seed=1):
    return random_batch(model, batch_size=n, seed=seed)


@pytest.mark.parametrize("name", list_models())
def test_efficiency_for_every_head(name):
    model = tiny_model(name)
    batch = _batch(model)
    phi = modality_shapley(PresenceGame(model, batch, TARGET))
    with torch.no_grad():
        full = model(batch).logits[:, 0]
    torch.testing.assert_close(phi.sum(1), full - BASE, atol=1e-4, rtol=1e-4)
    assert torch.all(phi[~batch.present] == 0)


def brute_force_shapley(model, batch, target: Target) -> torch.Tensor:
    """Shapley values from the coalition formula over all M players, one full model call per
    coalition (encoders included): phi_m = sum_S |S|!(M-|S|-1)!/M! [v(S + m) - v(S)]."""
    B, M = batch.present.shape
    values = {}
    for bits in itertools.product([False, True], repeat=M):
        present = torch.tensor(bits).expand(B, M) & batch.present  # S ∩ natural
        v = torch.full((B,), target.base_log_odds)
        rows = present.any(1).nonzero().flatten()
        if rows.numel():
            sub = batch.select(rows)
            with torch.no_grad():
                v[rows] = model(sub.with_present(present[rows])).logits[:, target.index]
        values[bits] = v
    phi = torch.zeros(B, M)
    for bits, v in values.items():
        for m in range(M):
            if bits[m]:
                continue
            with_m = bits[:m] + (True,) + bits[m + 1 :]
            s = sum(bits)
            weight = math.factorial(s) * math.factorial(M - s - 1) / math.factorial(M)
            phi[:, m] += weight * (values[with_m] - v)
    return phi


@pytest.mark.parametrize("name", ["fusemoe", "i2moe"])
def test_exact_matches_brute_force_enumeration(name):
    model = tiny_model(name)
    batch = _batch(model, n=8, seed=3)
    phi = modality_shapley(PresenceGame(model, batch, TARGET))
    torch.testing.assert_close(phi, brute_force_shapley(model, batch, TARGET), atol=2e-5, rtol=1e-4)


def test_naturally_absent_modalities_get_zero_and_present_ones_do_not():
    model = tiny_model("transformer")
    present = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]]).bool()
    batch = random_batch(model, batch_size=4, present=present, seed=2)
    game = PresenceGame(model, batch, TARGET)
    phi = modality_shapley(game)
    assert torch.all(phi[~present] == 0)
    assert torch.all(phi[present] != 0)
    keyed = by_modality(phi, GENERIC4)
    assert list(keyed) == list(GENERIC4) and torch.equal(keyed["m2"], phi[:, 2])
    # a single-modality stay: all of f - v(empty) goes to its modality
    torch.testing.assert_close(phi[3, 2], game.full_values()[3] - BASE)
    abl = modality_ablation(game)
    assert torch.isnan(abl[~present]).all() and torch.isnan(abl[3]).all()
    assert torch.isfinite(abl[:3][present[:3]]).all()


class PlantedHead(FusionHead):
    """Output = w . mean(tokens of ``key``) when ``key`` is present, else exactly ``BASE``."""

    def __init__(self, modalities, d_model, num_classes, num_tokens=None, key="m2"):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        self.key = self.modalities.index(key)
        self.w = torch.nn.Linear(d_model, num_classes)

    def forward(self, tokens, present, labels=None):
        name = self.modalities[self.key]
        z = self.w(masked_mean(tokens[name].tokens, tokens[name].mask))  # (B, C)
        logits = torch.where(present[:, self.key : self.key + 1], z, torch.full_like(z, BASE))
        return FusionOutput(logits, zero_loss(logits))


def planted_model(key="m2"):
    torch.manual_seed(0)
    encoders = build_encoders(GENERIC4, d_model=16, num_tokens=3)
    return MultimodalModel(encoders, PlantedHead(GENERIC4, 16, 1, key=key)).eval()


def test_planted_single_modality_model_gets_all_attribution_there():
    model = planted_model("m2")
    present = torch.ones(6, 4, dtype=torch.bool)
    present[1, 0] = present[2, 3] = present[4, 1] = False
    batch = random_batch(model, batch_size=6, present=present, seed=5)
    cols, _ = attribute_batch(model, batch, TARGET, ig_steps=16)
    for method in ("shapley", "ig", "ablation"):
        others = torch.tensor([cols[f"{method}_{m}"] for m in ("m0", "m1", "m3")])
        mine = torch.tensor(cols[f"{method}_m2"])
        assert torch.isnan(others).sum() == (method == "ablation") * 3  # absent: NaN, not 0
        assert torch.allclose(others.nan_to_num(0.0), torch.zeros(()), atol=1e-6), method
        assert torch.all(mine.abs() > 1e-4), method
    total = torch.tensor(cols["log_odds"]) - BASE
    torch.testing.assert_close(torch.tensor(cols["shapley_m2"]), total, atol=1e-5, rtol=1e-5)


def test_sampling_beyond_six_modalities_is_efficient_seeded_and_close_to_exact():
    mods = tuple(f"m{i}" for i in range(7))
    model = tiny_model("concat", mods)
    batch = random_batch(model, batch_size=5, seed=4)
    game = PresenceGame(model, batch, TARGET)
    phi = modality_shapley(game, n_samples=20, seed=3)  # M = 7 > 6: sampled by default
    torch.testing.assert_close(phi.sum(1), game.full_values() - BASE, atol=1e-4, rtol=1e-4)
    assert torch.equal(phi, modality_shapley(game, n_samples=20, seed=3))
    assert torch.all(phi[~batch.present] == 0)
    small = tiny_model("concat")
    batch4 = random_batch(small, batch_size=6, seed=4)
    game4 = PresenceGame(small, batch4, TARGET)
    exact = modality_shapley(game4)
    sampled = modality_shapley(game4, exact=False, n_samples=300, seed=0)
    assert (exact - sampled).abs().max() < 0.1 * exact.abs().max() + 1e-3


def test_same_numbers_twice():
    model = tiny_model("flex_moe")
    batch = _batch(model, n=6, seed=7)
    first, _ = attribute_batch(model, batch, TARGET, ig_steps=8)
    second, _ = attribute_batch(model, batch, TARGET, ig_steps=8)
    assert first.keys() == second.keys()
    for key in first:
        if key == "pattern":
            assert first[key] == second[key]
            continue
        a, b = (
            torch.tensor(x[key], dtype=torch.float64).nan_to_num(-99.0) for x in (first, second)
        )
        assert torch.equal(a, b), key


def test_multiclass_target_is_class_log_odds_and_stays_efficient():
    model = tiny_model("late", num_classes=3)
    batch = random_batch(model, batch_size=6, seed=8)
    target = Target(task="multiclass", index=2, base_log_odds=-0.4)
    phi = modality_shapley(PresenceGame(model, batch, target))
    with torch.no_grad():
        p = torch.softmax(model(batch).logits, -1)[:, 2]
    torch.testing.assert_close(phi.sum(1), torch.log(p / (1 - p)) + 0.4, atol=1e-4, rtol=1e-4)


class SymmetricHead(FusionHead):
    """Output = BASE + g(m0) + g(m1) + g(m0) * g(m1), with g shared: m0 and m1 are symmetric."""

    def __init__(self, modalities, d_model, num_classes, num_tokens=None):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        self.g = torch.nn.Linear(d_model, num_classes)

    def forward(self, tokens, present, labels=None):
        parts = []
        for m in (0, 1):
            t = tokens[self.modalities[m]]
            parts.append(self.g(masked_mean(t.tokens, t.mask)) * present[:, m : m + 1])  # (B, C)
        logits = BASE + parts[0] + parts[1] + parts[0] * parts[1]
        return FusionOutput(logits, zero_loss(logits))


def test_symmetric_modalities_get_equal_shapley_values():
    torch.manual_seed(0)
    encoders = build_encoders(GENERIC4, d_model=16, num_tokens=3)
    encoders["m1"].load_state_dict(encoders["m0"].state_dict())  # same encoder for m0 and m1
    model = MultimodalModel(encoders, SymmetricHead(GENERIC4, 16, 1)).eval()
    batch = random_batch(model, batch_size=6, present=torch.ones(6, 4, dtype=torch.bool), seed=2)
    batch.inputs["m1"] = {k: v.clone() for k, v in batch.inputs["m0"].items()}  # same content
    cols, _ = attribute_batch(model, batch, TARGET, ig_steps=8)
    a, b = torch.tensor(cols["shapley_m0"]), torch.tensor(cols["shapley_m1"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.abs().min() > 1e-4  # not trivially zero
    for null in ("m2", "m3"):  # players the head ignores
        assert torch.allclose(torch.tensor(cols[f"shapley_{null}"]), torch.zeros(()), atol=1e-6)
