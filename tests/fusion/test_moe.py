"""The shared MoE layer: gates, dispatch, top-k weights, masking, aux losses, routing modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clinical_moe.fusion.moe import (
    GATES,
    Experts,
    MoELayer,
    Router,
    cv_squared,
    entropy_reg,
    router_losses,
    topk_agreement,
    topk_gates,
)

D = 16


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gate", GATES)
def test_router_scores_match_direct_formula(gate):
    torch.manual_seed(0)
    r = Router(D, 5, gate=gate).eval()
    x = _x(7, D)
    scores, clean = r(x)
    diff = x[:, None, :] - r.weight[None, :, :]  # (N, E, D)
    expected = {
        "softmax": x @ r.weight.t(),
        "laplace": -diff.norm(dim=-1),
        "gaussian": -(diff**2).sum(-1),
    }[gate]
    torch.testing.assert_close(clean, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, clean)


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    r = Router(D, 6, gate="laplace")
    x = _x(9, D)
    r.train()
    s1, c1 = r(x)
    s2, c2 = r(x)
    assert not torch.allclose(s1, s2)
    torch.testing.assert_close(c1, c2)
    r.eval()
    e1, e2 = r(x), r(x)
    torch.testing.assert_close(e1[0], e2[0], atol=0, rtol=0)
    torch.testing.assert_close(e1[0], c1)


@pytest.mark.parametrize("padded_below", [0, 10**6])  # per-expert matmuls | padded bmm
@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_dispatch_equals_naive(k, padded_below):
    torch.manual_seed(0)
    ex = Experts(5, D, 12).eval()
    ex.padded_below = padded_below
    x = _x(40, D)
    idx = torch.stack([torch.randperm(5)[:k] for _ in range(40)])  # (N, k)
    idx[:3] = torch.arange(k)  # uneven loads
    out = ex(x, idx)
    every = torch.stack([ex.expert(x, e) for e in range(5)], 1)  # (N, E, D): all experts
    naive = every.gather(1, idx[..., None].expand(-1, -1, D))  # (N, k, D)
    torch.testing.assert_close(out, naive, atol=1e-5, rtol=1e-5)
    w = torch.softmax(_x(40, k, seed=3), -1)
    mixed = (naive * w[..., None]).sum(1)  # (N, D)
    torch.testing.assert_close(ex.mix(x, idx, w), mixed, atol=1e-5, rtol=1e-5)
    # gradients agree with the naive computation too
    xg = x.clone().requires_grad_()
    ex.mix(xg, idx, w).pow(2).sum().backward()
    grads = [xg.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    ex.zero_grad()
    xg.grad = None
    every = torch.stack([ex.expert(xg, e) for e in range(5)], 1)  # (N, E, D)
    naive = every.gather(1, idx[..., None].expand(-1, -1, D))  # (N, k, D)
    (naive * w[..., None]).sum(1).pow(2).sum().backward()
    for g, p in zip(grads, [xg] + list(ex.parameters())):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_topk_weights_are_softmax_over_selected_scores():
    s = _x(6, 8)
    w, idx = topk_gates(s, 3)
    assert torch.equal(idx, s.topk(3, -1).indices)
    torch.testing.assert_close(w, torch.softmax(s.gather(1, idx), -1))


def test_forced_expert_takes_the_top1_slot():
    s = _x(6, 8)
    forced = torch.tensor([-1, 0, 1, 2, 3, 4])
    w, idx = topk_gates(s, 3, forced)
    plain_w, plain_idx = topk_gates(s, 3)
    assert torch.equal(idx[0], plain_idx[0]) and torch.equal(w[0], plain_w[0])  # not forced
    for n, f in enumerate(forced.tolist()[1:], start=1):
        assert idx[n, 0] == f  # first slot
        others = s[n].clone()
        others[f] = float("-inf")
        assert set(idx[n, 1:].tolist()) == set(others.topk(2).indices.tolist())
        assert w[n, 0] >= w[n, 1:].max() - 1e-6  # the largest gate weight
        best = torch.maximum(s[n, f], s[n].max())
        expect = torch.softmax(torch.stack([best, *s[n, idx[n, 1:]]]), 0)
        torch.testing.assert_close(w[n], expect)


def _layer(**kw):
    torch.manual_seed(0)
    kw = {"num_experts": 4, "top_k": 2, "hidden": 8, **kw}
    return MoELayer(D, **kw)


def test_eval_deterministic_and_training_noisy():
    layer = _layer(gate="laplace", num_experts=6, top_k=2)
    x, mask = _x(3, 5, D), torch.ones(3, 5, dtype=torch.bool)
    layer.eval()
    a, b = layer(x, mask), layer(x, mask)
    assert torch.equal(a.y, b.y) and torch.equal(a.topk_idx, b.topk_idx)
    layer.train()
    c, d = layer(x, mask), layer(x, mask)
    assert not torch.allclose(c.y, d.y)


def test_masked_tokens_invisible_and_not_routed():
    layer = _layer(load_balance=1.0, cv2=1.0, entropy=1.0, z_loss=1.0).eval()
    x = _x(2, 6, D)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, mask)
    assert torch.all(out.y[~mask] == 0) and torch.all(out.topk_idx[~mask] == -1)
    assert torch.all(out.probs[~mask] == 0) and torch.all(out.topk_idx[mask] >= 0)
    noisy = torch.where(mask[..., None], x, _x(2, 6, D, seed=5) * 10)
    out2 = layer(noisy, mask)
    torch.testing.assert_close(out2.y, out.y)
    torch.testing.assert_close(out2.aux_loss, out.aux_loss)
    # a token's output does not depend on the other tokens (per-token routing, no capacity)
    alone = layer(x[:1, :1], mask[:1, :1])
    torch.testing.assert_close(alone.y[0, 0], out.y[0, 0], atol=1e-6, rtol=1e-5)


def test_no_real_tokens():
    for routing in ("joint", "per_modality", "disjoint"):
        layer = _layer(
            routing=routing, modalities=("a", "b"), cv2=1.0, entropy=1.0, load_balance=1.0
        )
        x = _x(2, 3, D, seed=1).requires_grad_()
        out = layer(x, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long))
        assert torch.all(out.y == 0) and float(out.aux_loss) == 0.0
        assert out.topk_idx.shape == (2, 3, 2) and torch.all(out.topk_idx == -1)
        assert all(torch.isfinite(v).all() for v in out.extras.values())
        (x.sum() + out.y.sum() + out.aux_loss).backward()
        assert torch.isfinite(x.grad).all()


def test_aux_losses_hand_computed_values():
    N, E, k = 8, 4, 1
    # perfectly balanced routing with uniform router probabilities
    clean = torch.zeros(N, E)
    idx = torch.arange(N).remainder(E)[:, None]  # (N, 1): two tokens per expert
    w = torch.ones(N, k)
    parts = router_losses(clean, clean, None, w, idx)
    torch.testing.assert_close(parts["load_balance"], torch.tensor(1.0))
    torch.testing.assert_close(parts["cv2"], torch.tensor(0.0))
    torch.testing.assert_close(parts["z_loss"], torch.tensor(math.log(E) ** 2))
    torch.testing.assert_close(parts["entropy"], torch.tensor(0.0), atol=1e-6, rtol=0)
    # all tokens on expert 0 with a confident router: load balance = E * 1 * p0
    clean = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).repeat(N, 1)
    idx = torch.zeros(N, 1, dtype=torch.long)
    parts = router_losses(clean, clean, None, w, idx)
    p0 = torch.softmax(clean[0], -1)[0]
    torch.testing.assert_close(parts["load_balance"], E * p0)
    imp = torch.tensor([8.0, 0, 0, 0])
    expected_cv = imp.var(unbiased=False) / imp.mean() ** 2  # = 3 for one-hot over 4
    torch.testing.assert_close(parts["cv2"], 2 * expected_cv)
    torch.testing.assert_close(cv_squared(imp), torch.tensor(3.0))
    # entropy regulariser against a direct computation
    p = torch.softmax(_x(10, E), -1)
    H = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(entropy_reg(p), H(p).mean() - H(p.mean(0)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["load_balance", "cv2", "entropy", "z_loss"])
@pytest.mark.parametrize("routing", ["joint", "per_modality", "disjoint"])
def test_each_aux_loss_reaches_router(which, routing):
    layer = _layer(routing=routing, modalities=("a", "b"), gate="laplace", **{which: 1.0}).train()
    x = _x(2, 6, D)
    mids = torch.tensor([0, 0, 0, 1, 1, 1]).repeat(2, 1)
    out = layer(x, torch.ones(2, 6, dtype=torch.bool), mids)
    out.aux_loss.backward()
    for r in layer.routers:
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0, which
        assert torch.isfinite(r.weight.grad).all()
    assert float(out.extras[which]) == pytest.approx(float(out.aux_loss.detach()))


def test_task_loss_reaches_all_parameters():
    layer = _layer(routing="per_modality", modalities=("a", "b"), num_experts=3, top_k=2).train()
    x = _x(4, 10, D)
    mids = (torch.arange(10) >= 5).long().repeat(4, 1)
    layer(x, torch.ones(4, 10, dtype=torch.bool), mids).y.pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_routing_modes():
    x = _x(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mids = torch.tensor([0, 0, 0, 1, 1, 1]).repeat(2, 1)
    assert len(_layer(routing="joint").routers) == 1
    pm = _layer(routing="per_modality", modalities=("a", "b")).eval()
    assert len(pm.routers) == 2 and pm.experts.num_experts == 4
    # per-modality: modality 1's tokens are scored by router 1
    out = pm(x, mask, mids)
    torch.testing.assert_close(out.scores[:, 3:], pm.routers[1].clean_scores(x[:, 3:]))
    torch.testing.assert_close(out.scores[:, :3], pm.routers[0].clean_scores(x[:, :3]))
    dj = _layer(routing="disjoint", modalities=("a", "b")).eval()
    assert dj.experts.num_experts == 8
    out = dj(x, mask, mids)
    only_a = (mids == 0) & mask
    out_a = dj(x, only_a, mids)
    with torch.no_grad():  # pool 1 = experts 4..7; perturbing it must not touch modality 0
        for p in (dj.experts.w1, dj.experts.b2):
            p[4:] += 1.0
    out_b = dj(x, mask, mids)
    torch.testing.assert_close(out_b.y[:, :3], out.y[:, :3])
    assert not torch.allclose(out_b.y[:, 3:], out.y[:, 3:])
    torch.testing.assert_close(out_a.y[:, :3], out.y[:, :3], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="modality_ids"):
        dj(x, mask)


def test_forced_expert_always_selected():
    layer = _layer(num_experts=6, top_k=2).train()
    x = _x(3, 4, D)
    forced = torch.full((3, 4), 5)
    forced[0] = -1
    out = layer(x, torch.ones(3, 4, dtype=torch.bool), forced_expert=forced)
    assert (out.topk_idx[1:] == 5).any(-1).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate"):
        MoELayer(D, gate="cosine")
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(D, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="modality names"):
        MoELayer(D, routing="disjoint")


def test_dense_gelu_matches_reference():
    ex = Experts(2, D, 8)
    x = _x(5, D)
    ref = F.gelu(x @ ex.w1[1] + ex.b1[1]) @ ex.w2[1] + ex.b2[1]
    torch.testing.assert_close(ex.expert(x, 1), ref)


def test_modality_ids_out_of_range_rejected():
    layer = _layer(routing="per_modality", modalities=("a", "b"))
    with pytest.raises(ValueError, match="modality_ids"):
        layer(_x(1, 3, D), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 1, 2]]))


def test_router_noise_scales_with_the_score_spread_and_agreement_is_reported():
    """Noise relative to the score spread: the same top-k agreement whatever the score scale."""
    x = _x(4000, 16)
    agreements = []
    for scale in (0.02, 1.0, 50.0):
        r = Router(16, 8, "softmax", noisy=True).train()
        with torch.no_grad():
            r.weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * scale)
        torch.manual_seed(0)
        noisy, clean, std = r.route(x)
        agreements.append(topk_agreement(noisy, clean, 2).item())
    assert max(agreements) - min(agreements) < 0.05, agreements
    assert 0.3 < agreements[0] < 0.95, agreements  # exploration, but mostly the clean routing
    layer = _layer(noisy=True).train()
    x, keep = _x(10, 40, D), torch.ones(10, 40, dtype=torch.bool)
    assert 0.2 < layer(x, keep).extras["topk_agreement"].item() < 1.0  # 400 noisy tokens
    assert layer.eval()(x, keep).extras["topk_agreement"] == 1.0
    loud = Router(16, 8, "softmax", noisy=True, noise_scale=5.0).train()
    torch.manual_seed(0)
    n, c, _ = loud.route(x)
    assert topk_agreement(n, c, 2).item() < agreements[0]  # more noise, less agreement


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grouped_combine_equals_per_expert_reference_in_training(dropout):
    """The hand-written forward/backward of ``Experts.mix`` and ``Experts.forward`` (many tokens
    per expert) give the per-expert autograd computation's output and gradients, gate weights
    included, with the same dropout draws."""
    torch.manual_seed(0)
    E, k, N = 4, 2, 60
    ex = Experts(E, D, 12, dropout=dropout).train()
    ex.padded_below = 0
    x = _x(N, D).requires_grad_()
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])  # (N, k)
    idx[:, 0] = torch.where(idx[:, 0] == 3, 0, idx[:, 0])
    idx[:, 1] = torch.where(idx[:, 1] == 3, 0, idx[:, 1])  # expert 3 gets no token
    idx[idx[:, 0] == idx[:, 1], 1] = 1
    idx[idx[:, 0] == idx[:, 1], 1] = 2
    w = torch.softmax(_x(N, k, seed=3), -1).requires_grad_()
    gy = _x(N, D, seed=4)

    torch.manual_seed(7)
    y = ex.mix(x, idx, w)
    grads = torch.autograd.grad(y, [x, w, *ex.parameters()], gy)

    torch.manual_seed(7)  # same draws: one (n, H) mask per non-empty expert, in expert order
    order = torch.sort(idx.reshape(-1), stable=True).indices
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    xs = x.index_select(0, order // k)
    outs = [ex.expert(c, e) for e, c in enumerate(xs.split(counts)) if c.shape[0]]
    gate = w.reshape(-1)[order, None]
    ref = x.new_zeros(N, D).index_add(0, order // k, torch.cat(outs) * gate)
    ref_grads = torch.autograd.grad(ref, [x, w, *ex.parameters()], gy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)

    # without gates: each assignment's output in assignment order, (N, k, D)
    gk = _x(N, k, D, seed=5)
    torch.manual_seed(7)
    each = ex(x, idx)
    grads = torch.autograd.grad(each, [x, *ex.parameters()], gk)
    torch.manual_seed(7)
    xs = x.index_select(0, order // k)
    outs = [ex.expert(c, e) for e, c in enumerate(xs.split(counts)) if c.shape[0]]
    ref = torch.cat(outs).new_empty(N * k, D).index_copy(0, order, torch.cat(outs))
    ref_grads = torch.autograd.grad(ref.view(N, k, D), [x, *ex.parameters()], gk)
    torch.testing.assert_close(each, ref.view(N, k, D), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
