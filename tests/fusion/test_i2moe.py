"""I2MoE-specific behaviour: reweighting, batched interaction pass, interaction losses."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from clinical_moe.fusion.backbone import GroupedLayerNorm, GroupedLinear
from clinical_moe.fusion.i2moe import I2MoE, interaction_losses
from clinical_moe.testing import noise_padded_tokens
from clinical_moe.types import ModalityTokens

MODS = ("a", "b", "c")
T, D = 3, 16


def _head(**kw) -> I2MoE:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    return I2MoE(MODS, D, 1, {m: T for m in MODS}, **kw)


def _tokens(
    present: torch.Tensor, seed: int = 0, pad_last: bool = True
) -> dict[str, ModalityTokens]:
    gen = torch.Generator().manual_seed(seed)
    B = present.shape[0]
    out = {}
    for i, m in enumerate(MODS):
        mask = present[:, i : i + 1].expand(B, T).clone()  # (B, T)
        if pad_last:
            mask[0, -1] = False  # one padded token in a present row
        toks = torch.randn(B, T, D, generator=gen) * mask.unsqueeze(-1)
        out[m] = ModalityTokens(toks, mask)
    return out


PRESENT = torch.tensor(
    [[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.bool
)


def test_weights_zero_for_absent_uniqueness_and_sum_to_one():
    head = _head().eval()
    out = head(_tokens(PRESENT), PRESENT)
    w = out.gates["interaction_weights"]
    assert w.shape == (6, len(MODS) + 2)
    assert head.expert_names == ("U_a", "U_b", "U_c", "synergy", "redundancy")
    assert torch.all(w[:, : len(MODS)][~PRESENT] == 0)
    assert torch.all(w[:, : len(MODS)][PRESENT] > 0)
    assert torch.all(w[:, -2:] > 0)
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    assert out.aux_loss == 0 and out.extras == {}  # no perturbation at eval


@pytest.mark.parametrize(
    "kw", [{}, {"shared_trunk": True, "num_layers": 2}, {"uniqueness_inputs": "all"}]
)
def test_batched_pass_equals_loop_of_expert_calls(kw):
    head = _head(**kw).train()  # dropout 0: training differs from eval only by the variants
    x, mask, seg, eff = head._inputs(_tokens(PRESENT), PRESENT)
    xv, mv, pos = head.build_variants(x, mask, seg, eff)
    emb, logits = head.expert_outputs(xv, mv, seg)  # (G, N, D), (G, N, C)
    G = head.num_experts
    assert emb.shape[:2] == (G, xv.shape[0])
    for m in range(len(MODS)):
        for b in range(PRESENT.shape[0]):
            row = int(pos[m, b])
            if row < 0:
                continue
            # the variant is exactly "sample b with modality m masked out"
            assert torch.equal(mv[row], mask[b] & (seg != m))
            for j in range(G):
                e1, l1 = head.expert_outputs(
                    xv[row : row + 1], mv[row : row + 1], seg, torch.tensor([j])
                )
                torch.testing.assert_close(emb[j, row], e1[0, 0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(logits[j, row], l1[0, 0], atol=1e-5, rtol=1e-5)
    # drop perturbation == the path of a truly missing modality
    b, m = 0, 1
    absent = PRESENT.clone()
    absent[b, m] = False
    head.eval()
    x2, mask2, _, _ = head._inputs(_tokens(absent), absent)
    _, l_missing = head.expert_outputs(x2[b : b + 1], mask2[b : b + 1], seg)
    torch.testing.assert_close(logits[:, int(pos[m, b])], l_missing[:, 0], atol=1e-5, rtol=1e-5)


def test_forward_runs_batched_expert_passes(monkeypatch):
    """noise: one pass on everything; eval: one pass on the input; drop: see below."""
    for perturb in ("drop", "noise"):
        head = _head(perturb=perturb).train()
        calls = []
        orig = head.expert_outputs

        def counting(xv, mv, seg, experts=None, calls=calls, orig=orig):
            calls.append(tuple(xv.shape[:2]))
            return orig(xv, mv, seg, experts)

        monkeypatch.setattr(head, "expert_outputs", counting)
        head(_tokens(PRESENT), PRESENT)
        B = PRESENT.shape[0]
        if perturb == "drop":  # its own pass (below), not expert_outputs
            assert calls == []
        else:
            assert calls == [(B + int(PRESENT.sum()), 3 * T)]
        calls.clear()
        head.eval()
        head(_tokens(PRESENT), PRESENT)
        assert calls == [(B, 3 * T)]


@pytest.mark.parametrize(
    "kw", [{}, {"shared_trunk": True, "num_layers": 2}, {"uniqueness_inputs": "all"}]
)
def test_compact_variants_equal_masked_variants(kw):
    """Cutting a dropped modality's positions out gives the masked variant's expert outputs."""
    mods = ("a", "b", "c")
    sizes = {"a": 3, "b": 2, "c": 4}  # unequal token counts: variants get padded
    torch.manual_seed(0)
    head = I2MoE(mods, D, 1, sizes, dropout=0.0, **kw).train()
    gen = torch.Generator().manual_seed(1)
    toks = {}
    for i, m in enumerate(mods):
        mask = PRESENT[:, i : i + 1].expand(-1, sizes[m]).clone()
        mask[0, -1] = False
        toks[m] = ModalityTokens(torch.randn(6, sizes[m], D, generator=gen) * mask[..., None], mask)
    x, mask, seg, eff = head._inputs(toks, PRESENT)
    xm, mm, pos_m = head.build_variants(x, mask, seg, eff)
    xc, mc, sc, pos_c = head.compact_variants(x, mask, seg, eff)
    assert torch.equal(pos_m, pos_c)
    assert xc.shape[1] == max(sum(sizes.values()) - n for n in sizes.values())
    emb_m, lg_m = head.expert_outputs(xm, mm, seg)
    e0, l0 = head.expert_outputs(x, mask, seg)
    e1, l1 = head.expert_outputs(xc, mc, sc)
    emb_c, lg_c = torch.cat([e0, e1], 1), torch.cat([l0, l1], 1)
    torch.testing.assert_close(emb_c, emb_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lg_c, lg_m, atol=1e-5, rtol=1e-5)


def test_perturb_only_present_modalities():
    head = _head()
    x, mask, seg, eff = head._inputs(_tokens(PRESENT), PRESENT)
    _, _, pos = head.build_variants(x, mask, seg, eff)
    multi = PRESENT.sum(1) >= 2
    assert torch.equal(pos >= 0, PRESENT.T & multi)  # drop: single-modality rows untouched
    noisy = _head(perturb="noise").train()
    xv, mv, pos = noisy.build_variants(x, mask, seg, eff)
    assert torch.equal(pos >= 0, PRESENT.T)
    for m in range(len(MODS)):
        for b in PRESENT[:, m].nonzero().flatten().tolist():
            row = int(pos[m, b])
            assert torch.equal(mv[row], mask[b])
            changed = (xv[row] != x[b]).any(-1)  # (T,)
            assert torch.equal(changed, mask[b] & (seg == m))  # only m's real tokens get noise


def test_interaction_losses_on_constructed_cases():
    M, B, V = 2, 3, 4
    G = M + 2
    valid = torch.ones(M + 1, B, dtype=torch.bool)
    same = torch.randn(1, 1, B, V).expand(G, M + 1, B, V)
    losses, defined = interaction_losses(same, valid, margin=1.0)
    assert defined.all()
    # identical outputs: uniqueness = margin, synergy cos = 1, redundancy = 0
    torch.testing.assert_close(losses, torch.tensor([1.0, 1.0, 1.0, 0.0]))

    vec = torch.zeros(G, M + 1, B, V)
    vec[M, 0, :, 0] = 1.0  # synergy: S(x) orthogonal to S(x^-m)
    vec[M, 1:, :, 1] = 1.0
    vec[M + 1, 0, :, 0] = 1.0  # redundancy: R(x^-m) = -R(x)
    vec[M + 1, 1:, :, 0] = -1.0
    vec[:M, :, :, 2] = 1.0  # U_m: positive identical to the anchor, negative 5 away
    for m in range(M):
        vec[m, 1 + m, :, 2] = 6.0
    losses, _ = interaction_losses(vec, valid, margin=1.0)
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.0, 0.0, 2.0]), atol=1e-4, rtol=0)

    # the opposite uniqueness case: negative identical to the anchor, positive 5 away
    vec2 = vec.clone()
    for m in range(M):
        vec2[m, 1:, :, 2] = 6.0
        vec2[m, 1 + m, :, 2] = 1.0
    got = interaction_losses(vec2, valid)[0][:M]
    torch.testing.assert_close(got, torch.tensor([6.0, 6.0]), atol=1e-3, rtol=0)

    # invalid variants are masked out: garbage there changes nothing; none valid -> undefined
    part = valid.clone()
    part[1, 0] = False
    garbage = vec.clone()
    garbage[:, 1, 0] = 1e3
    torch.testing.assert_close(
        interaction_losses(garbage, part)[0], interaction_losses(vec, part)[0]
    )
    none = torch.zeros_like(valid)
    none[0] = True
    _, defined = interaction_losses(vec, none)
    assert not defined.any()


def test_aux_loss_is_weighted_mean_of_parts():
    head = _head(lambda_int=0.3).train()
    out = head(_tokens(PRESENT), PRESENT)
    parts = [v for k, v in out.extras.items() if k != "interaction_loss"]
    assert set(out.extras) >= {
        "uniqueness/a",
        "uniqueness/b",
        "uniqueness/c",
        "synergy",
        "redundancy",
    }
    torch.testing.assert_close(out.extras["interaction_loss"], torch.stack(parts).mean())
    torch.testing.assert_close(out.aux_loss.detach(), 0.3 * out.extras["interaction_loss"])
    assert out.aux_loss.requires_grad


def test_shared_trunk_builds_fewer_params():
    n = lambda h: sum(p.numel() for p in h.parameters())  # noqa: E731
    assert n(_head(num_layers=2, shared_trunk=True)) < n(_head(num_layers=2))
    with pytest.raises(ValueError, match="num_layers >= 2"):
        _head(shared_trunk=True)
    with pytest.raises(ValueError, match="perturb"):
        _head(perturb="blur")


def test_absent_and_padded_content_invisible():
    head = _head().eval()
    toks = _tokens(PRESENT)
    ref = head(toks, PRESENT).logits
    noisy = noise_padded_tokens(toks)
    torch.testing.assert_close(head(noisy, PRESENT).logits, ref, atol=1e-5, rtol=0)


def test_grouped_layers_use_each_groups_own_weights():
    torch.manual_seed(0)
    lin, ln = GroupedLinear(3, 4, 5), GroupedLayerNorm(3, 4)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 2, 6, 4)
    y, z = lin(x), ln(x)
    for g in range(3):
        torch.testing.assert_close(y[g], x[g] @ lin.weight[g] + lin.bias[g])
        torch.testing.assert_close(z[g], F.layer_norm(x[g], (4,), ln.weight[g], ln.bias[g]))
    sel = torch.tensor([2, 0])
    torch.testing.assert_close(
        lin(x[:2], sel),
        torch.stack([x[0] @ lin.weight[2] + lin.bias[2], x[1] @ lin.weight[0] + lin.bias[0]]),
    )


def test_byte_dropout_rate_scale_and_gradient():
    from clinical_moe.fusion.backbone import Dropout, byte_dropout

    torch.manual_seed(0)
    x = torch.randn(200, 500, requires_grad=True)
    y = byte_dropout(x, 0.1)
    kept = y != 0
    rate = 1 - kept.float().mean()
    assert abs(rate - 26 / 256) < 0.005  # p rounded to a multiple of 1/256
    scale = 256 / 230
    torch.testing.assert_close(y[kept], x[kept] * scale)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)
    assert byte_dropout(x, 0.0) is x and torch.all(byte_dropout(x, 1.0) == 0)
    drop = Dropout(0.3)
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shared_trunk": True, "num_layers": 2},
        {"num_layers": 2},
        {"uniqueness_inputs": "all", "num_layers": 2},
        {"uniqueness_inputs": "all", "shared_trunk": True, "num_layers": 2},
    ],
)
def test_drop_pass_equals_masked_variants_and_projects_once(kw, monkeypatch):
    """The training pass (compact variants, first-block projections gathered from the input's)
    gives the expert outputs of the masked variants, computing the projections once."""
    head = _head(**kw).train()
    x, mask, seg, eff = head._inputs(_tokens(PRESENT), PRESENT)
    xm, mm, pos_m = head.build_variants(x, mask, seg, eff)
    emb_m, lg_m = head.expert_outputs(xm, mm, seg)
    first = (head.trunk or head.blocks)[0]
    calls = []
    orig = first.project
    monkeypatch.setattr(first, "project", lambda h, g=None: calls.append(h.shape) or orig(h, g))
    emb, lg, pos = head._drop_pass(x, mask, seg, eff)
    assert torch.equal(pos, pos_m)
    assert len(calls) == 1 and calls[0][1:3] == (PRESENT.shape[0], 3 * T)
    torch.testing.assert_close(emb, emb_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lg, lg_m, atol=1e-5, rtol=1e-5)


def test_own_uniqueness_experts_see_only_their_modality():
    """``uniqueness_inputs="own"``: U_m's output depends on modality m's tokens alone (and is
    a constant when m is absent); the synergy and redundancy experts still read every
    modality; "all" (the paper) lets every expert read everything."""
    present = torch.ones(4, len(MODS), dtype=torch.bool)
    toks = _tokens(present, pad_last=False)
    for own in (True, False):
        head = _head(uniqueness_inputs="own" if own else "all", num_layers=2).eval()
        x, mask, seg, _ = head._inputs(toks, present)
        emb, _ = head.expert_outputs(x, mask, seg)  # (G, B, D)
        for m in range(len(MODS)):
            other = x.clone()
            other[:, seg != m] = torch.randn_like(other[:, seg != m])  # every other modality
            e2, _ = head.expert_outputs(other, mask, seg)
            same = torch.allclose(e2[m], emb[m], atol=1e-5)
            assert same == own, (m, own)
            assert not torch.allclose(e2[-2:], emb[-2:], atol=1e-3)  # S and R read them
    head = _head(uniqueness_inputs="own").eval()
    absent = present.clone()
    absent[:, 0] = False
    x, mask, seg, _ = head._inputs(_tokens(absent, seed=3), absent)
    emb, _ = head.expert_outputs(x, mask, seg)
    torch.testing.assert_close(emb[0], head.norm.bias[0].expand_as(emb[0]))
    with pytest.raises(ValueError, match="uniqueness_inputs"):
        _head(uniqueness_inputs="mine")


def test_expert_task_loss_per_expert_and_in_aux():
    """Each expert's own BCE on the unperturbed input, U_m only where m is present; it enters
    ``aux_loss`` as ``lambda_expert`` times its mean, in training with labels only."""
    head = _head(lambda_int=0.3, lambda_expert=0.7).train()
    toks, labels = _tokens(PRESENT), torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float)
    torch.manual_seed(5)
    out = head(toks, PRESENT, labels=labels)
    x, mask, seg, eff = head._inputs(toks, PRESENT)
    _, logits = head.expert_outputs(x, mask, seg)  # (G, B, 1): no dropout, same experts
    want = []
    for j in range(head.num_experts):
        rows = PRESENT[:, j] if j < len(MODS) else torch.ones(len(labels), dtype=torch.bool)
        want.append(F.binary_cross_entropy_with_logits(logits[j, rows, 0], labels[rows]))
    got = head.expert_task_loss(logits.transpose(0, 1), labels, eff)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.extras["expert_task_loss"], got.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.aux_loss.detach(),
        0.3 * out.extras["interaction_loss"] + 0.7 * out.extras["expert_task_loss"],
    )
    assert "expert_task_loss" not in head(toks, PRESENT).extras  # no labels: not computed
    # multiclass: cross-entropy per expert
    mc = I2MoE(MODS, D, 3, {m: T for m in MODS}, dropout=0.0)
    lg = torch.randn(6, mc.num_experts, 3)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    per = mc.expert_task_loss(lg, y, PRESENT)
    torch.testing.assert_close(per[-1], F.cross_entropy(lg[:, -1], y))
    torch.testing.assert_close(per[0], F.cross_entropy(lg[PRESENT[:, 0], 0], y[PRESENT[:, 0]]))
    with pytest.raises(ValueError, match="lambda_expert"):
        _head(lambda_expert=-1.0)


def test_weights_keep_what_u_m_reads(caplog):
    """The weights record what U_m reads: weights from before the record existed (every expert
    read every modality) load as "all" into a default head and give the old outputs; a head
    whose config names the choice keeps it."""
    old = _head(uniqueness_inputs="all").eval()
    state = {k: v for k, v in old.state_dict().items() if k != "own_inputs"}  # an old file
    head = _head().eval()
    assert head.uniqueness_inputs == "own"
    with caplog.at_level("WARNING"):
        head.load_state_dict(state)  # strict
    assert head.uniqueness_inputs == "all" and "uniqueness_inputs" in caplog.text
    toks = _tokens(PRESENT)
    torch.testing.assert_close(head(toks, PRESENT).logits, old(toks, PRESENT).logits)
    given = _head(uniqueness_inputs="own")  # a config naming the choice: trained that way
    caplog.clear()
    given.load_state_dict(state)
    assert given.uniqueness_inputs == "own" and not caplog.text
    own = _head(uniqueness_inputs="own")
    again = _head(uniqueness_inputs="all")
    again.load_state_dict(own.state_dict())  # the weights win over the constructor
    assert again.uniqueness_inputs == "own"
