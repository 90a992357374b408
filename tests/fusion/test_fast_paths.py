"""The speed-only paths of the fusion pieces (issue #16) give the results of the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from clinical_moe.fusion.backbone import (
    Dropout,
    GroupedFFN,
    GroupedLayerNorm,
    GroupedLinear,
    GroupedSelfAttention,
    byte_dropout,
)
from clinical_moe.fusion.i2moe import I2MoE


def test_layer_norm_of_an_expanded_input_is_normalised_once_per_token():
    torch.manual_seed(0)
    ln = GroupedLayerNorm(3, 8)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(1, 5, 4, 8, requires_grad=True)
    shared = ln(x.expand(3, -1, -1, -1))  # stride 0 along the groups
    copied = ln(x.expand(3, -1, -1, -1).contiguous())
    torch.testing.assert_close(shared, copied)
    expect = F.layer_norm(x, (8,)) * ln.weight.view(3, 1, 1, 8) + ln.bias.view(3, 1, 1, 8)
    torch.testing.assert_close(shared, expect)
    (g1,) = torch.autograd.grad(shared.pow(2).sum(), x)
    (g2,) = torch.autograd.grad(expect.pow(2).sum(), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_unscaled_dropout_folds_into_add_and_matmul(p):
    x, h = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    drop = Dropout(p).train()
    torch.manual_seed(1)
    ref = h + byte_dropout(x, p)
    torch.manual_seed(1)
    torch.testing.assert_close(drop.residual(h, x), ref)
    if p > 0:  # the same random draws: some elements dropped, the rest scaled
        assert bool((ref == h).any()) and not bool((ref == h).all())
    lin = GroupedLinear(1, 16, 8)
    torch.manual_seed(2)
    ref = lin(byte_dropout(x, p).unsqueeze(0))
    torch.manual_seed(2)
    masked, scale = drop.unscaled(x)
    torch.testing.assert_close(lin(masked.unsqueeze(0), alpha=scale), ref)
    same, one = drop.eval().unscaled(x)
    assert same is x and one == 1.0


def test_ffn_with_folded_dropout_scale_equals_dropout_then_linear():
    torch.manual_seed(0)
    ffn = GroupedFFN(2, 16, 12, dropout=0.3).train()
    x = torch.randn(2, 3, 5, 16)
    torch.manual_seed(3)
    got = ffn(x)
    torch.manual_seed(3)
    ref = ffn.fc2(byte_dropout(F.gelu(ffn.fc1(x)), 0.3))
    torch.testing.assert_close(got, ref)


def test_attention_split_projections_equal_explicit_heads():
    torch.manual_seed(0)
    att = GroupedSelfAttention(2, 16, 4).eval()
    x = torch.randn(2, 3, 5, 16)
    qkv = att.qkv(x)  # (G, N, T, 3D)
    q, k, v = (t.reshape(2, 3, 5, 4, 4).transpose(2, 3) for t in qkv.chunk(3, -1))
    p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)  # dh = 4
    o = (p @ v).transpose(2, 3).reshape(2, 3, 5, 16)
    torch.testing.assert_close(att(x), att.proj(o), atol=1e-5, rtol=1e-5)


def test_i2moe_readout_without_padding_is_the_masked_mean():
    torch.manual_seed(0)
    head = I2MoE(("a", "b"), 16, 1, {"a": 3, "b": 2}, dropout=0.0)
    h = torch.randn(head.num_experts, 4, 5, 16)
    full = torch.ones(4, 5, dtype=torch.bool)
    emb, logits = head._readout(h, full)
    one_padded = full.clone()
    one_padded[0, -1] = False
    emb_p, _ = head._readout(h, one_padded)  # the weighted path
    torch.testing.assert_close(emb[:, 1:], emb_p[:, 1:])
    assert not torch.allclose(emb[:, 0], emb_p[:, 0])
    torch.testing.assert_close(emb, head.norm(h.mean(2)))
    torch.testing.assert_close(logits, head.head(emb))


def test_flop_counter_counts_cpu_fused_attention():
    from benchmarks.bench_shapes import flop_counter

    B, H, T, dh = 2, 2, 8, 4
    q, k, v = (torch.randn(B, H, T, dh, requires_grad=True) for _ in range(3))
    with flop_counter() as fc:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    forward = 4 * B * H * T * T * dh  # two (T x dh) x (dh x T)-sized products per head
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu"] == forward
    assert fc.get_total_flops() > 2 * forward  # the backward is counted too


def test_byte_keep_mask_is_zero_one_at_the_rounded_rate():
    from clinical_moe.fusion.backbone import byte_keep_mask

    torch.manual_seed(0)
    keep, scale = byte_keep_mask((1000, 200), 0.1)
    assert keep.shape == (1000, 200) and keep.dtype == torch.float32
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs((1 - keep.mean().item()) - 26 / 256) < 0.003  # 0.1 rounds to 26/256
    assert scale == 256 / 230
    assert byte_keep_mask((3, 4), 0.001) == (None, 1.0)  # rounds to 0: nothing dropped
    assert not byte_keep_mask((3, 4), 1.0)[0].any()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masked_residual_backward_equals_addcmul(p):
    """Dropout.residual's one-pass backward gives addcmul's gradients (h broadcast too)."""
    h = torch.randn(1, 3, 5, 8, requires_grad=True)  # broadcast along the 4 groups
    x = torch.randn(4, 3, 5, 8, requires_grad=True)
    drop = Dropout(p).train()
    torch.manual_seed(1)
    got = drop.residual(h, x)
    torch.manual_seed(1)
    ref = h + byte_dropout(x, p)
    torch.testing.assert_close(got, ref)
    w = torch.randn_like(ref)
    g_got = torch.autograd.grad((got * w).sum(), (h, x))
    g_ref = torch.autograd.grad((ref * w).sum(), (h, x))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("groups", [None, [2, 0]])
def test_folded_layer_norm_equals_norm_then_linear(bias, expanded, groups):
    """``GroupedLinear(x, norm=ln)`` (affine folded into the weights) equals ``lin(ln(x))`` in
    value and in the gradients of the input and of all four parameters."""
    torch.manual_seed(0)
    ln, lin = GroupedLayerNorm(3, 8), GroupedLinear(3, 8, 6, bias=bias)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    sel = None if groups is None else torch.tensor(groups)
    G = 3 if sel is None else len(groups)
    x0 = torch.randn(1 if expanded else G, 4, 5, 8, requires_grad=True)
    x = x0.expand(G, -1, -1, -1)  # stride 0 along the groups when expanded
    got = lin(x, sel, norm=ln)
    ref = lin(ln(x, sel), sel)
    torch.testing.assert_close(got, ref)
    w = torch.randn_like(ref)
    wrt = [x0, ln.weight, ln.bias, lin.weight] + ([lin.bias] if bias else [])
    g_got = torch.autograd.grad((got * w).sum(), wrt)
    g_ref = torch.autograd.grad((ref * w).sum(), wrt)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_grouped_block_equals_its_plain_composition():
    """The block (norms folded into qkv / fc1) equals pre-LN attention + FFN written out."""
    from clinical_moe.fusion.backbone import GroupedBlock

    torch.manual_seed(0)
    blk = GroupedBlock(3, 16, 4, 12).eval()
    with torch.no_grad():
        for ln in (blk.norm1, blk.norm2):
            ln.weight.normal_()
            ln.bias.normal_()
    x = torch.randn(3, 2, 5, 16, requires_grad=True)
    km = torch.ones(1, 2, 5, dtype=torch.bool)
    km[0, 1, -2:] = False
    h = x + blk.attn(blk.norm1(x), km)
    ref = h + blk.ffn.fc2(F.gelu(blk.ffn.fc1(blk.norm2(h))))
    got = blk(x, km)
    torch.testing.assert_close(got, ref)
    params = [x, *blk.parameters()]
    for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(a, b)


def test_byte_scaled_mask_is_the_keep_mask_times_its_scale():
    from clinical_moe.fusion.backbone import byte_keep_mask, byte_scaled_mask

    torch.manual_seed(0)
    keep, scale = byte_keep_mask((50, 40), 0.3)
    torch.manual_seed(0)
    torch.testing.assert_close(byte_scaled_mask((50, 40), 0.3), keep * scale)
    assert byte_scaled_mask((3, 4), 0.001) is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_inplace_residual_and_ffn_dropout_match_the_plain_ones(p):
    """The in-place residual (into the branch output) and the in-place FFN dropout give the
    values and gradients of the out-of-place composition, with the same random draws."""
    from clinical_moe.fusion.backbone import GroupedBlock

    torch.manual_seed(0)
    blk = GroupedBlock(3, 16, 4, 12, dropout=p).train()
    x0 = torch.randn(1, 2, 5, 16, requires_grad=True)
    x = x0.expand(3, -1, -1, -1)  # shared input, as in I2MoE
    torch.manual_seed(7)
    got = blk(x)
    torch.manual_seed(7)
    a = blk.attn(blk.norm1(x))
    h = blk.drop.residual(x, a)
    f = blk.ffn.fc2(byte_dropout(F.gelu(blk.ffn.fc1(blk.norm2(h))), p))
    ref = blk.drop.residual(h, f)
    torch.testing.assert_close(got, ref)
    params = [x0, *blk.parameters()]
    for g1, g2 in zip(
        torch.autograd.grad(got.pow(2).sum(), params), torch.autograd.grad(ref.pow(2).sum(), params)
    ):
        torch.testing.assert_close(g1, g2)
    saved = torch.randn(4, 8, requires_grad=True) * 1.0
    y = saved.exp()  # exp saves its output: writing into it must be refused
    out = Dropout(0.5).train().residual(torch.zeros(4, 8), y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_gather_split_equals_index_select_then_split():
    from clinical_moe.fusion.backbone import gather_split

    torch.manual_seed(0)
    t = torch.randn(2, 7, 12, requires_grad=True)
    idx = torch.tensor([3, 0, 3, 6, 1])  # repeats: their gradients add up
    got = gather_split(t, idx)
    ref = t.index_select(1, idx).split(4, -1)
    ws = [torch.randn(2, 5, 4) for _ in range(3)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    (g1,) = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, ws)), t, retain_graph=True)
    (g2,) = torch.autograd.grad(sum((b * w).sum() for b, w in zip(ref, ws)), t)
    torch.testing.assert_close(g1, g2)
    (g3,) = torch.autograd.grad((got[1] * ws[1]).sum(), t)  # only k used: q, v columns zero
    assert not g3[..., :4].any() and not g3[..., 8:].any() and g3[..., 4:8].any()
