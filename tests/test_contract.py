"""Registry-wide contract tests: every registered head keeps the invariants of ARCHITECTURE.md.

Parametrised over ``list_models()``, so a head is covered the day it is registered. Models use the
generic sequence encoder (cheap) for M = 1..5 modalities, plus the real default encoders
(ehr / cxr / ecg / notes) once per head.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from clinical_moe import create_model, list_models
from clinical_moe.testing import cat_batches, noise_absent, noise_padding, random_batch

HEADS = list_models()
GENERIC = {M: tuple(f"m{i}" for i in range(M)) for M in range(1, 6)}
ATOL = 1e-5


@functools.cache
def _model(name: str, mods: tuple[str, ...], num_classes: int = 1):
    torch.manual_seed(0)
    return create_model(name, modalities=mods, num_classes=num_classes, d_model=16, num_tokens=3)


def _eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch).logits


def _patterns(M: int) -> list[torch.Tensor]:
    """All present, each modality dropped, each modality alone (deduplicated)."""
    pats = [torch.ones(M, dtype=torch.bool)]
    for m in range(M):
        drop = torch.ones(M, dtype=torch.bool)
        drop[m] = False
        only = torch.zeros(M, dtype=torch.bool)
        only[m] = True
        pats += [drop, only]
    uniq = {tuple(p.tolist()): p for p in pats if p.any()}
    return list(uniq.values())


def test_registry_names_every_head():
    for required in ("fusemoe", "flex_moe", "conf_smoe", "i2moe", "late", "concat", "transformer"):
        assert required in HEADS, f"{required} is not registered"


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("M", sorted(GENERIC))
def test_shapes_and_patterns(name, M):
    model = _model(name, GENERIC[M])
    for pat in _patterns(M):
        present = pat.expand(5, M).clone()
        batch = random_batch(model, 5, present=present, seed=M)
        logits = _eval_logits(model, batch)
        assert logits.shape == (5, 1)
        assert torch.isfinite(logits).all(), (
            f"{name} pattern {pat.tolist()} gives non-finite logits"
        )


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("M", [1, 3, 5])
def test_eval_is_deterministic(name, M):
    model = _model(name, GENERIC[M])
    batch = random_batch(model, 6, seed=1)
    torch.manual_seed(123)
    a = _eval_logits(model, batch)
    torch.manual_seed(456)
    b = _eval_logits(model, batch)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("M", [2, 4])
def test_samples_are_independent(name, M):
    model = _model(name, GENERIC[M])
    a, b = random_batch(model, 4, seed=2), random_batch(model, 5, seed=3)
    alone = _eval_logits(model, a)
    mixed = _eval_logits(model, cat_batches(a, b))[:4]
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)
    perm = torch.tensor([3, 1, 0, 2])
    permuted = _eval_logits(model, a.select(perm))
    torch.testing.assert_close(permuted, alone[perm], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("M", [1, 3, 5])
def test_masked_content_is_invisible(name, M):
    model = _model(name, GENERIC[M])
    batch = random_batch(model, 6, seed=4)
    ref = _eval_logits(model, batch)
    torch.testing.assert_close(_eval_logits(model, noise_absent(batch)), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _eval_logits(model, noise_padding(batch, model)), ref, atol=ATOL, rtol=0
    )


def _one_step_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = F.binary_cross_entropy_with_logits(out.logits.squeeze(-1), batch.labels) + out.aux_loss
    loss.backward()
    return out


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("M", [1, 2, 4])
def test_every_parameter_learns(name, M):
    torch.manual_seed(0)
    model = create_model(name, modalities=GENERIC[M], d_model=16, num_tokens=3)
    batch = random_batch(model, 8, present=torch.ones(8, M, dtype=torch.bool), seed=5)
    out = _one_step_grads(model, batch)
    assert out.aux_loss.dim() == 0
    if out.aux_loss.detach().abs() > 0:
        assert out.aux_loss.requires_grad, f"{name}: non-zero aux_loss is detached from the graph"
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"{name}: parameters without gradient: {dead[:8]}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"{name}: non-finite gradients: {bad[:8]}"


@pytest.mark.parametrize("name", HEADS)
def test_sample_without_modalities_is_rejected(name):
    model = _model(name, GENERIC[3])
    present = torch.ones(4, 3, dtype=torch.bool)
    present[2] = False
    batch = random_batch(model, 4, present=present, seed=6)
    with pytest.raises(ValueError, match=str(batch.ids[2])):
        _eval_logits(model, batch)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("task,C", [("multiclass", 3), ("multilabel", 4)])
def test_multiclass_and_multilabel(name, task, C):
    model = _model(name, GENERIC[2], num_classes=C)
    batch = random_batch(model, 5, seed=7, task=task)
    assert _eval_logits(model, batch).shape == (5, C)
    model.train()
    out = model(batch)
    if task == "multiclass":
        loss = F.cross_entropy(out.logits, batch.labels)
    else:
        loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels)
    (loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", HEADS)
def test_default_model_on_clinical_modalities(name):
    """``create_model(name)`` builds a small default model on ehr/cxr/ecg/notes that runs."""
    torch.manual_seed(0)
    model = create_model(name)
    batch = random_batch(model, 4, seed=8)
    ref = _eval_logits(model, batch)
    assert ref.shape == (4, 1) and torch.isfinite(ref).all()
    torch.testing.assert_close(_eval_logits(model, noise_absent(batch)), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _eval_logits(model, noise_padding(batch, model)), ref, atol=ATOL, rtol=0
    )
    full = random_batch(
        model, 4, present=torch.ones(4, len(model.modalities), dtype=torch.bool), seed=9
    )
    _one_step_grads(model, full)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"{name}: parameters without gradient: {dead[:8]}"
