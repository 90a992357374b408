"""ConfSMoE-specific behaviour: confidence targets, router training, imputation stages."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from clinical_moe.fusion.conf_smoe import (
    ConfidenceMoE,
    ConfSMoE,
    PostImputation,
    class_weights,
    true_class_prob,
)
from clinical_moe.types import ModalityTokens

MODS = ("a", "b", "c")
T, D = 3, 16
PRESENT = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
B = PRESENT.shape[0]


def _head(num_classes: int = 1, **kw) -> ConfSMoE:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    return ConfSMoE(MODS, D, num_classes, {m: T for m in MODS}, **kw)


def _tokens(present=PRESENT, seed: int = 0, absent_value: float | None = None):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, m in enumerate(MODS):
        mask = present[:, i : i + 1].expand(-1, T).clone()  # (B, T)
        mask[0, -1] = False  # a padded token in a present row
        toks = torch.randn(present.shape[0], T, D, generator=gen)
        if absent_value is not None:
            toks = torch.where(mask.unsqueeze(-1), toks, torch.full_like(toks, absent_value))
        out[m] = ModalityTokens(toks, mask)
    return out


def _labels(seed: int = 0):
    return torch.randint(0, 2, (B,), generator=torch.Generator().manual_seed(seed)).float()


def test_true_class_prob_values():
    logits = torch.randn(6, 2, 1)
    y = torch.tensor([1.0, 0, 1, 0, 1, 1])
    tcp, _ = true_class_prob(logits, y, "binary")
    p = torch.sigmoid(logits[..., 0])
    torch.testing.assert_close(tcp, torch.where(y[:, None] > 0.5, p, 1 - p))
    logits = torch.randn(6, 2, 4)
    yc = torch.tensor([0, 3, 1, 2, 2, 0])
    tcp, loss = true_class_prob(logits, yc, "multiclass")
    want = torch.softmax(logits, -1)[torch.arange(6), :, yc]  # (6, 2)
    torch.testing.assert_close(tcp, want)
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.reshape(12, 4), yc.repeat_interleave(2))
    )
    ym = torch.randint(0, 2, (6, 4)).float()
    tcp, _ = true_class_prob(logits, ym, "multilabel")
    p = torch.sigmoid(logits)
    torch.testing.assert_close(tcp, torch.where(ym[:, None] > 0.5, p, 1 - p).mean(-1))


def test_confidence_target_is_detached_and_exact():
    head = _head().train()
    moe = head.moe[0]
    u = torch.randn(B, 4, D)
    _, info = moe(u)
    y_tok = _labels().repeat_interleave(4)  # (B*4,): each token carries its sample's label
    losses = head._layer_losses(moe, info, y_tok, "binary", torch.ones(B * 4), None)
    # the conf loss does not reach W_p (the target is detached); the classifier loss does
    g_conf = torch.autograd.grad(
        losses["conf"], moe.aux_cls.weight, retain_graph=True, allow_unused=True
    )
    assert g_conf[0] is None
    g_cls = torch.autograd.grad(losses["cls"], moe.aux_cls.weight, retain_graph=True)[0]
    assert g_cls.abs().sum() > 0
    p = torch.sigmoid(moe.aux_cls(info["eo"]))[..., 0]  # (N, k)
    target = torch.where(y_tok[:, None] > 0.5, p, 1 - p)
    torch.testing.assert_close(losses["conf"], F.mse_loss(info["conf"], target.detach()))
    # the confidence itself is in the graph of the ConfNet parameters
    assert torch.autograd.grad(losses["conf"], moe.conf_a, retain_graph=True)[0].abs().sum() > 0


def test_confidence_moe_mixes_picked_experts_by_confidence():
    for normalize in (False, True):
        torch.manual_seed(1)
        moe = ConfidenceMoE(D, 4, 2, 8, 1, normalize=normalize).eval()
        u = torch.randn(2, 3, D)
        y, info = moe(u)
        x = u.reshape(6, D)
        want = torch.zeros(6, D)
        for n in range(6):
            c = info["conf"][n]
            w = c / c.sum() if normalize else c
            for j, e in enumerate(info["idx"][n].tolist()):
                want[n] += w[j] * moe.experts.expert(x[n : n + 1], e)[0]
        torch.testing.assert_close(y.reshape(6, D), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["confidence", "none"])
def test_router_and_aux_classifier_gradients(mode):
    head = _head(router_training=mode).train()
    out = head(_tokens(), PRESENT, labels=_labels())
    (out.logits.sum() + out.aux_loss).backward()
    moe = head.moe[0]
    assert moe.aux_cls.weight.grad is not None and moe.aux_cls.weight.grad.abs().sum() > 0
    if mode == "confidence":
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert "router_loss" in out.extras
    else:
        assert moe.router.weight.grad is None and "router_loss" not in out.extras


def test_training_without_labels_skips_confidence_losses():
    head = _head().train()
    out = head(_tokens(), PRESENT)
    assert "conf_loss" not in out.extras and "cls_loss" not in out.extras
    assert "router_loss" in out.extras


def test_fill_buffer_updates_in_training_from_present_rows_only():
    head = _head()
    toks = _tokens(absent_value=1e4)  # absent rows (and the padded token) hold huge values
    head.eval()
    head(toks, PRESENT)
    assert torch.all(head.fill == 0) and torch.all(head.fill_count == 0)
    head.train()
    head(toks, PRESENT, labels=_labels())
    x = torch.cat([toks[m].tokens for m in MODS], 1)  # (B, 3T, D)
    real = torch.cat([toks[m].mask for m in MODS], 1)  # (B, 3T)
    want = (x * real.unsqueeze(-1)).sum(0) / real.sum(0).unsqueeze(-1)  # first update = the mean
    torch.testing.assert_close(head.fill, want)
    assert torch.all(head.fill_count == 1)
    assert head.fill.abs().max() < 100


def test_eval_is_deterministic_label_free_and_uses_the_buffer():
    head = _head(pool_size=2)
    head.train()
    head(_tokens(seed=3), PRESENT, labels=_labels())
    head.eval()
    toks = _tokens()
    torch.manual_seed(1)
    a = head(toks, PRESENT).logits
    torch.manual_seed(2)
    b = head(toks, PRESENT).logits
    assert torch.equal(a, b)
    # absent and padded content is replaced by the buffer: noise there is invisible
    noisy = _tokens(absent_value=-7.0)
    torch.testing.assert_close(head(noisy, PRESENT).logits, a, atol=1e-5, rtol=0)
    # a sample alone gives the same logits as in the batch
    alone = {m: ModalityTokens(t.tokens[2:3], t.mask[2:3]) for m, t in toks.items()}
    torch.testing.assert_close(head(alone, PRESENT[2:3]).logits, a[2:3], atol=1e-5, rtol=0)


def test_post_imputation_updates_only_imputed_tokens(monkeypatch):
    finals = []
    for shift in (0.0, 100.0):
        head = _head().eval()
        head.norm.register_forward_hook(lambda mod, inp, out: finals.append(inp[0].detach()))
        mod = head.impute["0"]
        monkeypatch.setattr(mod, "forward", lambda h, src, key_mask, s=shift: h + s)
        head(_tokens(), PRESENT)
    imputed = ~torch.cat([_tokens()[m].mask for m in MODS], 1)  # (B, 3T)
    diff = (finals[0] - finals[1]).abs().amax(-1)  # (B, 3T)
    assert torch.all(diff[~imputed] == 0)
    assert torch.all(diff[imputed] > 50)


def test_post_imputation_attends_to_real_keys_only():
    torch.manual_seed(0)
    imp = PostImputation(D, 4).eval()
    h, src = torch.randn(2, 5, D), torch.randn(2, 5, D)
    key_mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    ref = imp(h, src, key_mask)
    src2 = torch.where(key_mask.unsqueeze(-1), src, torch.randn(2, 5, D) * 10)
    torch.testing.assert_close(imp(h, src2, key_mask), ref)
    imp.topk_keys = 5
    torch.testing.assert_close(imp(h, src, key_mask), ref)
    imp.topk_keys = 1
    assert not torch.allclose(imp(h, src, key_mask), ref)
    imp.topk_keys = 2  # sparsity still never picks a masked key
    ref2 = imp(h, src, key_mask)
    for seed in range(3):
        noise = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed)) * 10
        src3 = torch.where(key_mask.unsqueeze(-1), src, noise)
        torch.testing.assert_close(imp(h, src3, key_mask), ref2)


def test_task_resolution_and_label_checks():
    head = _head(num_classes=3).train()
    head(_tokens(), PRESENT, labels=torch.tensor([0, 2, 1, 1, 0]))  # multiclass
    head(_tokens(), PRESENT, labels=torch.randint(0, 2, (B, 3)).float())  # multilabel
    with pytest.raises(ValueError, match="labels of shape"):
        head(_tokens(), PRESENT, labels=torch.zeros(B, 2))
    with pytest.raises(ValueError, match="num_classes=1"):
        _head(num_classes=2, task="binary")
    with pytest.raises(ValueError, match="router_training"):
        _head(router_training="sometimes")
    with pytest.raises(ValueError, match="num_tokens"):
        ConfSMoE(MODS, D, 1, None)


def _full_tokens(present=PRESENT, seed: int = 0):
    """Tokens without padding: only absent modalities leave tokens to impute."""
    gen = torch.Generator().manual_seed(seed)
    n = present.shape[0]
    return {
        m: ModalityTokens(
            torch.randn(n, T, D, generator=gen), present[:, i : i + 1].expand(-1, T).clone()
        )
        for i, m in enumerate(MODS)
    }


def _step(head, toks, present, labels):
    head.zero_grad(set_to_none=True)
    out = head(toks, present, labels=labels)
    (F.binary_cross_entropy_with_logits(out.logits.squeeze(-1), labels) + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    return out, grads


@pytest.mark.parametrize("missing", [False, True])
def test_skipped_post_imputation_equals_computing_it(missing):
    """Skipping stage 2 (nothing imputed) or running it on the imputed rows only gives the same
    logits, aux loss and gradients as running it on every row with every non-imputed query
    masked out (``skip_unimputed=False``, the previous behaviour)."""
    present = PRESENT if missing else torch.ones(B, len(MODS), dtype=torch.bool)
    toks, labels = _full_tokens(present), _labels()
    results = []
    for skip in (True, False):
        head = _head(num_layers=2, noisy=False).train()  # no dropout, no noise: deterministic
        head.skip_unimputed = skip
        results.append(_step(head, toks, present, labels))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-5, msg=name)
    if not missing:  # stage 2's exact gradient is zero when nothing is imputed
        assert all(torch.all(g == 0) for n, g in ga.items() if n.startswith("impute."))


def test_post_imputation_not_run_when_nothing_is_imputed(monkeypatch):
    head = _head().train()
    calls = []
    monkeypatch.setattr(PostImputation, "forward", lambda *a, **k: calls.append(1) or a[1])
    present = torch.ones(B, len(MODS), dtype=torch.bool)
    head(_full_tokens(present), present, labels=_labels())
    assert not calls
    head(_full_tokens(PRESENT), PRESENT, labels=_labels())
    assert calls


def test_class_weights_give_each_class_equal_total_weight():
    y = torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0])
    w = class_weights(y, torch.tensor([0.25]), "binary")  # (8, 1)
    assert torch.isclose(w[y > 0.5].sum(), w[y < 0.5].sum())
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    yc = torch.tensor([0, 0, 0, 1, 2, 2])
    wc = class_weights(yc, torch.tensor([0.5, 1 / 6, 1 / 3]), "multiclass")  # (6,)
    sums = torch.stack([wc[yc == c].sum() for c in range(3)])
    torch.testing.assert_close(sums, torch.full((3,), 2.0))
    ym = torch.tensor([[1.0, 0], [0, 0], [0, 1], [0, 1]])
    wm = class_weights(ym, torch.tensor([0.25, 0.5]), "multilabel")  # (4, 2)
    for lab in range(2):
        col, yl = wm[:, lab], ym[:, lab]
        assert torch.isclose(col[yl > 0.5].sum(), col[yl < 0.5].sum())


def test_class_frequency_buffer_is_a_running_mean_then_ema():
    head = _head(momentum=0.5).train()
    head.update_class_freq(torch.tensor([1.0, 0, 0, 0]), "binary")
    torch.testing.assert_close(head.class_freq, torch.tensor([0.25]))
    head.update_class_freq(torch.tensor([1.0, 1, 0, 0]), "binary")  # rate max(1/2, 0.5)
    torch.testing.assert_close(head.class_freq, torch.tensor([0.375]))
    head.eval()
    head(_tokens(), PRESENT)  # eval (no labels) leaves it alone
    torch.testing.assert_close(head.class_freq, torch.tensor([0.375]))


@pytest.mark.parametrize("balance", [True, False])
def test_aux_losses_count_real_tokens_only_and_balance_classes(balance):
    head = _head(noisy=False, class_balance=balance).train()
    seen = []
    head.moe[0].register_forward_hook(lambda mod, inp, out: seen.append(out[1]))
    toks, labels = _tokens(), _labels()
    out = head(toks, PRESENT, labels=labels)
    info, moe = seen[0], head.moe[0]
    real = torch.cat([toks[m].mask & PRESENT[:, i : i + 1] for i, m in enumerate(MODS)], 1)
    y_tok = labels.repeat_interleave(3 * T)  # (B*3T,)
    p = torch.sigmoid(moe.aux_cls(info["eo"]))[..., 0]  # (N, k)
    tcp = torch.where(y_tok[:, None] > 0.5, p, 1 - p).detach()
    w = real.reshape(-1).float()  # (N,)
    if balance:
        freq = labels.mean()  # the first update sets the buffer to the batch's frequency
        w = w * torch.where(y_tok > 0.5, 0.5 / freq, 0.5 / (1 - freq))
    w2 = w[:, None].expand_as(tcp)
    want_conf = (w2 * (info["conf"] - tcp) ** 2).sum() / w2.sum()
    bce = F.binary_cross_entropy_with_logits(
        moe.aux_cls(info["eo"])[..., 0], y_tok[:, None].expand_as(tcp), reduction="none"
    )
    torch.testing.assert_close(out.extras["conf_loss"], want_conf.detach())
    torch.testing.assert_close(out.extras["cls_loss"], ((w2 * bce).sum() / w2.sum()).detach())
    assert out.extras["router_loss"] >= 0  # a KL: zero at a perfect fit


def test_default_aux_weights_leave_the_task_loss_dominant():
    head = _head(num_layers=2).train()
    toks = _full_tokens(PRESENT)
    labels = torch.tensor([1.0, 0, 0, 0, 0])
    out = head(toks, PRESENT, labels=labels)
    task = F.binary_cross_entropy_with_logits(out.logits.squeeze(-1), labels)
    assert out.aux_loss < 0.5 * task


def test_post_imputation_fused_path_equals_explicit_attention():
    torch.manual_seed(0)
    imp = PostImputation(D, 4).eval()
    h, src = torch.randn(2, 5, D), torch.randn(2, 5, D)
    key_mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)  # 2nd: no key
    H, dh = 4, D // 4
    q = imp.q(imp.norm_q(h)).view(2, 5, H, dh).transpose(1, 2)  # (B, H, T, dh)
    k, v = imp.kv(imp.norm_kv(src)).view(2, 5, 2, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
    keep = (key_mask | ~key_mask.any(-1, keepdim=True))[:, None, None, :]
    s = (q @ k.transpose(-1, -2) * dh**-0.5).masked_fill(~keep, float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(2, 5, D)
    want = imp.norm_out(h + imp.out(o))
    torch.testing.assert_close(imp(h, src, key_mask), want, atol=1e-5, rtol=1e-5)
