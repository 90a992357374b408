"""Flex-MoE-specific behaviour: combination ids, the missing-modality bank, router losses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from clinical_moe import create_model
from clinical_moe.fusion.flex_moe import FlexMoE, combination_id, combination_of
from clinical_moe.fusion.moe import MoEOutput
from clinical_moe.testing import noise_padded_tokens, random_batch
from clinical_moe.types import ModalityTokens

MODS = ("a", "b", "c")
D, P = 16, 3
PRESENT = torch.tensor(
    [[1, 1, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]],
    dtype=torch.bool,
)


def _head(**kw) -> FlexMoE:
    torch.manual_seed(0)
    return FlexMoE(MODS, D, 2, {m: P for m in MODS}, num_heads=2, **kw)


def _tokens(present, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    B = present.shape[0]
    out = {}
    for i, m in enumerate(MODS):
        mask = present[:, i : i + 1].expand(B, P).clone()
        if pad:
            mask[:, P - 1] = False  # last token of every present modality is padding
        out[m] = ModalityTokens(torch.randn(B, P, D, generator=g) * mask[..., None], mask)
    return out


def test_combination_ids_documented_order():
    two = {(1, 1): 0, (1, 0): 1, (0, 1): 2}
    three = {
        (1, 1, 1): 0,
        (1, 1, 0): 1,
        (1, 0, 1): 2,
        (0, 1, 1): 3,
        (1, 0, 0): 4,
        (0, 1, 0): 5,
        (0, 0, 1): 6,
    }
    for table in (two, three):
        pats = torch.tensor(list(table), dtype=torch.bool)
        assert combination_id(pats).tolist() == list(table.values())
        M = pats.shape[1]
        for pat, c in table.items():
            assert combination_of(c, M) == tuple(bool(v) for v in pat)
    for M in range(1, 6):
        pats = torch.tensor(
            [p for p in itertools.product([0, 1], repeat=M) if any(p)], dtype=torch.bool
        )
        ids = combination_id(pats)
        assert sorted(ids.tolist()) == list(range(2**M - 1))  # unique and in range
        assert int(combination_id(torch.ones(1, M, dtype=torch.bool))) == 0
    with pytest.raises(ValueError, match="no modality"):
        combination_id(torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize("bank", ["full", "factorized"])
def test_missing_modalities_filled_from_bank(bank):
    head = _head(bank=bank).eval()
    toks = _tokens(PRESENT)
    x, mask, c = head.assemble(toks, PRESENT)
    assert c.tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    for b in range(len(PRESENT)):
        for i, m in enumerate(MODS):
            if PRESENT[b, i]:
                torch.testing.assert_close(x[b, i], toks[m].tokens[b])
            elif bank == "full":
                torch.testing.assert_close(x[b, i], head.bank[c[b], i])
            else:
                torch.testing.assert_close(x[b, i], head.bank_c[c[b], 0] + head.bank_m[0, i])
    assert mask.all()
    # changing bank[c, m] changes exactly the samples of combination c missing m
    if bank == "full":
        before = head(toks, PRESENT).logits
        with torch.no_grad():
            head.bank[1, 2] += torch.randn(P, D)  # combination "ab", modality c
        after = head(toks, PRESENT).logits
        changed = (before - after).abs().amax(1) > 1e-6
        assert changed.tolist() == [c_ == 1 for c_ in c.tolist()]


def test_bank_defaults_and_expert_count():
    assert _head().bank.shape == (7, 3, P, D) and _head().num_experts == 7
    big = FlexMoE(
        tuple("abcdefg"),
        D,
        1,
        {m: 2 for m in "abcdefg"},
        num_heads=2,
        num_experts=4,
        allow_shared_experts=True,
    )
    assert big.bank_kind == "factorized" and big.bank_c.shape == (127, 1, 2, D)
    assert big.designated_expert(torch.tensor([0, 5, 126])).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="num_experts >= 2"):
        _head(num_experts=4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hard_specialisation_forces_designated_expert(mode):
    head = _head(specialization="hard", top_k=2)
    head.train(mode == "train")
    out = head(_tokens(PRESENT, pad=True), PRESENT)
    topk = out.gates["layer0/topk"]  # (B, M*P, k)
    c = out.gates["combination_id"]
    _, mask, _ = head.assemble(_tokens(PRESENT, pad=True), PRESENT)
    real = mask.reshape(len(PRESENT), -1)
    for b in range(len(PRESENT)):
        if c[b] > 0:
            assert (topk[b][real[b]] == c[b] % head.num_experts).any(-1).all()
    # soft specialisation does not force it: with an untrained router some token misses it
    soft = _head(specialization="soft", top_k=2).eval()
    topk = soft(_tokens(PRESENT), PRESENT).gates["layer0/topk"]
    hit = torch.stack([(topk[b] == c[b]).any(-1).all() for b in range(len(PRESENT)) if c[b] > 0])
    assert not hit.all()


def test_specialisation_loss_is_cross_entropy_to_designated_expert():
    head = _head()
    B, T, E, k = 3, 4, head.num_experts, 2
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, T, E, generator=g)
    w, idx = torch.softmax(scores, -1).topk(k, -1)
    out = MoEOutput(
        torch.zeros(B, T, D), torch.zeros(()), torch.softmax(scores, -1), idx, {}, scores, w
    )
    c = torch.tensor([0, 2, 5])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3] = False
    parts = head.router_losses(out, mask, c)
    s_scores = torch.cat([scores[1], scores[2, :3]])  # the S-router tokens (missing modalities)
    target = torch.tensor([2] * 4 + [5] * 3)
    torch.testing.assert_close(parts["specialization"], F.cross_entropy(s_scores, target))
    # G-router balance: CV^2 of importance + load over the full-modality sample's tokens
    imp = torch.zeros(E).index_add(0, idx[0].reshape(-1), w[0].reshape(-1))
    load = torch.zeros(E).index_add(0, idx[0].reshape(-1), torch.ones(T * k))
    cv2 = lambda v: v.var(unbiased=False) / v.mean() ** 2  # noqa: E731
    torch.testing.assert_close(parts["balance_g"], cv2(imp) + cv2(load), atol=1e-5, rtol=1e-5)
    # S balance excludes the designated expert of each combination
    imp1 = torch.zeros(E).index_add(0, idx[1].reshape(-1), w[1].reshape(-1))
    load1 = torch.zeros(E).index_add(0, idx[1].reshape(-1), torch.ones(T * k))
    others = torch.arange(E) != 2
    s1 = cv2(imp1[others]) + cv2(load1[others])
    imp2 = torch.zeros(E).index_add(0, idx[2, :3].reshape(-1), w[2, :3].reshape(-1))
    load2 = torch.zeros(E).index_add(0, idx[2, :3].reshape(-1), torch.ones(3 * k))
    others = torch.arange(E) != 5
    s2 = cv2(imp2[others]) + cv2(load2[others])
    torch.testing.assert_close(parts["balance_s"], (s1 + s2) / 2, atol=1e-5, rtol=1e-5)


def test_gate_loss_reaches_router_and_padding_invisible():
    head = _head(gate_loss=0.01).train()
    out = head(_tokens(PRESENT, pad=True), PRESENT)
    total = sum(v for k, v in out.extras.items() if not k.endswith("topk_agreement"))
    torch.testing.assert_close(out.aux_loss.detach(), 0.01 * total)
    out.aux_loss.backward()
    r = head.ffn[0].routers[0]
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    head.eval()
    toks = _tokens(PRESENT, pad=True)
    ref = head(toks, PRESENT).logits
    noisy = noise_padded_tokens(toks)
    torch.testing.assert_close(head(noisy, PRESENT).logits, ref)


def test_layers_alternate_sparse_and_dense_and_build_by_name():
    head = _head(num_layers=3)
    kinds = [type(f).__name__ for f in head.ffn]
    assert kinds == ["MoELayer", "Sequential", "MoELayer"]
    out = head.eval()(_tokens(PRESENT), PRESENT)
    assert set(out.gates) >= {"layer0/router_probs", "layer2/router_probs", "combination_id"}
    assert out.gates["layer0/router_probs"].shape == (len(PRESENT), 3 * P, 7)
    model = create_model("flex_moe", modalities=("a", "b"), d_model=16, num_tokens=2, num_heads=2)
    batch = random_batch(model, 4, seed=0)
    assert model(batch).logits.shape == (4, 1)


def test_padding_equals_truncation():
    """Padded tokens of the last modality are excluded from attention and readout."""
    head = _head().eval()
    toks = _tokens(PRESENT)
    t = toks["c"]
    short = dict(toks, c=ModalityTokens(t.tokens[:, :2], t.mask[:, :2]))
    mask = t.mask.clone()
    mask[:, 2] = False
    padded = dict(toks, c=ModalityTokens(t.tokens * mask[..., None], mask))
    has_c = PRESENT[:, 2]  # (a missing "c" is filled with as many bank tokens as it has slots)
    torch.testing.assert_close(
        head(padded, PRESENT).logits[has_c], head(short, PRESENT).logits[has_c]
    )
    # the padded slot (zero + its positional embedding) is not a key either
    ref = head(padded, PRESENT).logits
    with torch.no_grad():
        head.pos[-1] += torch.randn(D) * 3
    torch.testing.assert_close(head(padded, PRESENT).logits[has_c], ref[has_c])
    assert not torch.allclose(head(padded, PRESENT).logits[~has_c], ref[~has_c])


def test_self_attention_matches_multihead_attention():
    """Same initialisation, parameter names and eval result as ``nn.MultiheadAttention``."""
    from clinical_moe.fusion.flex_moe import SelfAttention

    torch.manual_seed(3)
    ref = torch.nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).eval()
    torch.manual_seed(3)
    ours = SelfAttention(16, 4, dropout=0.1).eval()
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(ours_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], ours_sd[name]), name
    x = torch.randn(5, 7, 16)
    keep = torch.rand(5, 7) > 0.4
    keep[:, 0] = True
    for mask in (keep, torch.ones_like(keep)):
        want = ref(x, x, x, key_padding_mask=~mask, need_weights=False)[0]
        torch.testing.assert_close(ours(x, mask), want, atol=1e-5, rtol=1e-5)
    ours.train()
    a, b = ours(x, keep), ours(x, keep)
    assert not torch.allclose(a, b)  # attention-probability dropout is active in training


def test_self_attention_dropout_in_training_is_inverted_bernoulli_on_probabilities():
    from clinical_moe.fusion.flex_moe import SelfAttention

    torch.manual_seed(0)
    att = SelfAttention(16, 4, dropout=0.25).train()
    x = torch.randn(3, 5, 16)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0, 3:] = False
    torch.manual_seed(9)
    out = att(x, keep)
    q, k, v = (
        t.reshape(3, 5, 4, 4).transpose(1, 2)
        for t in F.linear(x, att.in_proj_weight, att.in_proj_bias).split(16, -1)
    )
    s = (q @ k.transpose(-2, -1)) / 2.0 + torch.where(keep, 0.0, float("-inf"))[:, None, None]
    torch.manual_seed(9)
    kept = (torch.rand(3, 4, 5, 5) >= 0.25).float() / 0.75
    o = (torch.softmax(s, -1) * kept) @ v  # (B, H, T, dh)
    ref = att.out_proj(o.transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (kept == 0).any()
