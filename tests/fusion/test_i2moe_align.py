"""I2MoE's alignment term (ours): KL(q || w) between a detached target from the experts'
perturbation responses and the reweighting weights."""

from __future__ import annotations

import math

import pytest
import torch

from clinical_moe.fusion.i2moe import I2MoE
from clinical_moe.fusion.i2moe_align import (
    alignment_loss,
    alignment_target,
    perturbation_responses,
)
from clinical_moe.types import ModalityTokens

MODS = ("a", "b", "c")
T, D = 3, 16
PRESENT = torch.tensor(
    [[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.bool
)


def _head(**kw) -> I2MoE:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    return I2MoE(MODS, D, 1, {m: T for m in MODS}, **kw).train()


def _tokens(requires_grad: bool = False) -> dict[str, ModalityTokens]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, m in enumerate(MODS):
        mask = PRESENT[:, i : i + 1].expand(-1, T).clone()
        toks = (torch.randn(6, T, D, generator=gen) * mask.unsqueeze(-1)).requires_grad_(
            requires_grad
        )
        out[m] = ModalityTokens(toks, mask)
    return out


def test_responses_on_constructed_cases():
    M, B, V = 2, 3, 4
    base = torch.randn(1, 1, B, V)
    vec = base.expand(M + 2, M + 1, B, V).clone()  # nothing reacts to any perturbation
    vec[0, 1] = -base[0, 0]  # U_0 flips when modality 0 goes: response 2
    vec[M, 2] = -base[0, 0]  # S flips when modality 1 goes: response mean(0, 2) = 1
    vec[M + 1, 1] = -base[0, 0]  # R flips once: mean(max(-1, 0), 1) = 0.5
    valid = torch.ones(M + 1, B, dtype=torch.bool)
    valid[2, 2] = False  # sample 2 has no "without modality 1" variant
    resp, defined = perturbation_responses(vec.requires_grad_(), valid)
    assert not resp.requires_grad
    torch.testing.assert_close(
        resp[:2], torch.tensor([[2.0, 0.0, 1.0, 0.5]] * 2), atol=1e-5, rtol=0
    )
    # sample 2: only modality 0 was removed
    torch.testing.assert_close(resp[2], torch.tensor([2.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert defined[2].tolist() == [True, False, True, True]

    q, rows = alignment_target(resp, defined, "raw")
    assert rows.all() and not q.requires_grad
    torch.testing.assert_close(q.sum(1), torch.ones(B))
    torch.testing.assert_close(q[0], torch.tensor([2.0, 0.0, 1.0, 0.5]) / 3.5, atol=1e-5, rtol=0)
    assert q[2, 1] == 0  # undefined experts get no target mass
    rel, _ = alignment_target(resp, defined, "relative")
    torch.testing.assert_close(rel.sum(1), torch.ones(B))
    # relative: each response over its expert's batch mean (S: 1 / (2/3) = 1.5 on samples 0, 1)
    assert rel[0, 2] > q[0, 2]
    none = torch.zeros(B, M + 2, dtype=torch.bool)
    q0, rows0 = alignment_target(resp, none)
    assert not rows0.any() and torch.all(q0 == 0)
    with pytest.raises(ValueError, match="align_target"):
        alignment_target(resp, defined, "sharp")


def test_kl_values_zero_weights_and_detached_target():
    q = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    rows = torch.tensor([True, True])
    assert float(alignment_loss(q, q, rows)) == pytest.approx(0.0, abs=1e-6)
    w = torch.tensor([[0.25, 0.0, 0.75], [1 / 3, 1 / 3, 1 / 3]], requires_grad=True)
    kl = alignment_loss(q, w, rows)
    ref = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    ref2 = sum(p * math.log(p * 3) for p in (0.2, 0.3, 0.5))
    assert float(kl.detach()) == pytest.approx((ref + ref2) / 2, abs=1e-5)
    kl.backward()  # w holds an exact 0 where q is 0: finite gradient
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    # rows without a target count for nothing
    assert float(alignment_loss(q, w.detach(), torch.tensor([False, True]))) == pytest.approx(
        ref2, abs=1e-5
    )
    # the target is detached: no gradient reaches it
    qg = q.clone().requires_grad_()
    alignment_loss(qg, w.detach().requires_grad_(), rows).backward()
    assert qg.grad is None


def test_lambda_zero_is_the_paper_head():
    ref = _head()(_tokens(), PRESENT)
    off = _head(lambda_align=0.0, align_target="relative")(_tokens(), PRESENT)
    assert torch.equal(off.aux_loss, ref.aux_loss) and set(off.extras) == set(ref.extras)
    assert "alignment_loss" not in off.extras


@pytest.mark.parametrize("target", ["raw", "relative"])
@pytest.mark.parametrize("perturb", ["drop", "noise"])
def test_term_is_logged_finite_and_added(target, perturb):
    base = _head(perturb=perturb)
    torch.manual_seed(1)  # same noise draws for the noise perturbation
    ref = base(_tokens(), PRESENT)
    head = _head(perturb=perturb, lambda_align=0.7, align_target=target)
    torch.manual_seed(1)
    out = head(_tokens(), PRESENT)
    al = out.extras["alignment_loss"]
    assert torch.isfinite(out.aux_loss) and torch.isfinite(al) and float(al) > 0
    assert 0 < float(out.extras["alignment_target/synergy"]) < 1
    torch.testing.assert_close(out.aux_loss.detach(), ref.aux_loss.detach() + 0.7 * al)
    torch.testing.assert_close(out.logits, ref.logits)  # the prediction is unchanged
    head.eval()
    assert "alignment_loss" not in head(_tokens(), PRESENT).extras  # training only


def test_term_trains_the_reweighter_only():
    """With lambda_int = 0 the auxiliary loss is the alignment term alone: it reaches the
    reweighting model (nonzero gradients), not the experts (q detached) nor the tokens."""
    head = _head(lambda_int=0.0, lambda_align=1.0)
    toks = _tokens(requires_grad=True)
    out = head(toks, PRESENT)
    out.aux_loss.backward()
    rw = [p.grad for p in head.reweighter.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in rw)
    assert sum(float(g.abs().sum()) for g in rw) > 0
    for name, p in head.named_parameters():
        if not name.startswith(("reweighter.", "missing")):
            assert p.grad is None or float(p.grad.abs().sum()) == 0, name
    for t in toks.values():
        assert t.tokens.grad is None or float(t.tokens.grad.abs().sum()) == 0
    # and it changes the reweighter's gradient of the full loss
    grads = []
    for lam in (0.0, 1.0):
        h = _head(lambda_align=lam)
        o = h(_tokens(), PRESENT)
        (o.logits.sum() + o.aux_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in h.reweighter.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_bad_alignment_arguments():
    with pytest.raises(ValueError, match="align_target"):
        _head(align_target="sharp")
    with pytest.raises(ValueError, match="lambda_align"):
        _head(lambda_align=-1.0)
