"""FuseMoE-specific behaviour: missing embedding, Laplace per-modality routing, entropy loss."""

from __future__ import annotations

import pytest
import torch

from clinical_moe import create_model
from clinical_moe.fusion.fusemoe import FuseMoE
from clinical_moe.fusion.moe import entropy_reg
from clinical_moe.testing import noise_padded_tokens, random_batch
from clinical_moe.types import ModalityTokens

MODS = ("a", "b", "c")
D, T = 16, 4


def _head(**kw) -> FuseMoE:
    torch.manual_seed(0)
    kw = {"num_experts": 4, "top_k": 2, "num_heads": 2, **kw}
    return FuseMoE(MODS, D, 2, {m: T for m in MODS}, **kw)


def _tokens(present: torch.Tensor, seed: int = 0, pad: bool = True) -> dict[str, ModalityTokens]:
    g = torch.Generator().manual_seed(seed)
    B = present.shape[0]
    out = {}
    for i, m in enumerate(MODS):
        mask = torch.ones(B, T, dtype=torch.bool)
        if pad:
            mask[:, T - 1 - (i % 2) :] = False  # some trailing padding in present rows
            mask[:, 0] = True
        mask &= present[:, i : i + 1]
        tok = torch.randn(B, T, D, generator=g) * mask[..., None]
        out[m] = ModalityTokens(tok, mask)
    return out


PRESENT = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)


def test_defaults_are_laplace_per_modality():
    head = _head()
    for layer in head.layers:
        assert layer.moe.routing == "per_modality" and len(layer.moe.routers) == len(MODS)
        assert all(r.gate == "laplace" for r in layer.moe.routers)
    assert head.missing_embed.shape == (len(MODS), T, D)


def test_learned_missing_embedding_affects_only_samples_missing_it():
    head = _head().eval()
    toks = _tokens(PRESENT)
    before = head(toks, PRESENT).logits
    with torch.no_grad():
        head.missing_embed[1] += torch.randn(T, D)  # modality "b"
    after = head(toks, PRESENT).logits
    missing_b = ~PRESENT[:, 1]
    assert not torch.allclose(before[missing_b], after[missing_b])
    torch.testing.assert_close(before[~missing_b], after[~missing_b])
    x, mask = head.assemble(toks, PRESENT)
    torch.testing.assert_close(x[4, 1], head.missing_embed[1] + head.type_embed[1])
    assert mask[4, 1].all()  # the missing embedding's tokens take part in attention and routing


def test_absent_content_and_padding_are_invisible():
    for readout in ("mean", "last"):
        head = _head(readout=readout).eval()
        toks = _tokens(PRESENT)
        ref = head(toks, PRESENT).logits
        noisy = noise_padded_tokens(toks)
        torch.testing.assert_close(head(noisy, PRESENT).logits, ref)


def test_padded_tokens_not_routed_and_gate_shapes():
    head = _head(num_layers=2).eval()
    toks = _tokens(PRESENT)
    out = head(toks, PRESENT)
    B = PRESENT.shape[0]
    assert out.gates["layer1/router_probs"].shape == (B, len(MODS) * T, 4)
    assert out.gates["layer0/topk"].shape == (B, len(MODS) * T, 2)
    assert torch.equal(out.gates["token_modality"], torch.arange(3).repeat_interleave(T))
    _, mask = head.assemble(toks, PRESENT)
    real = mask.reshape(B, -1)
    assert torch.all(out.gates["layer0/topk"][~real] == -1)
    assert torch.all(out.gates["layer0/topk"][real] >= 0)


def test_no_cross_sample_mixing():
    head = _head().eval()
    toks = _tokens(PRESENT)
    full = head(toks, PRESENT).logits
    for b in range(PRESENT.shape[0]):
        one = {m: ModalityTokens(t.tokens[b : b + 1], t.mask[b : b + 1]) for m, t in toks.items()}
        torch.testing.assert_close(
            head(one, PRESENT[b : b + 1]).logits, full[b : b + 1], atol=1e-5, rtol=1e-5
        )


def test_entropy_aux_loss_reaches_routers():
    head = _head(entropy=0.5, dropout=0.0).train()
    out = head(_tokens(PRESENT), PRESENT)
    torch.testing.assert_close(out.aux_loss.detach(), 0.5 * out.extras["entropy"])
    assert out.aux_loss.requires_grad
    out.aux_loss.backward()
    for layer in head.layers:
        for r in layer.moe.routers:
            assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    # the logged entropy is the eq. 3 value of the router probabilities (eval, one layer)
    head = _head(num_layers=1, entropy=1.0).eval()
    toks = _tokens(PRESENT)
    out = head(toks, PRESENT)
    _, mask = head.assemble(toks, PRESENT)
    probs, mods = out.gates["layer0/router_probs"], out.gates["token_modality"]
    real = mask.reshape(PRESENT.shape[0], -1)
    per_router = [entropy_reg(probs[:, mods == m][real[:, mods == m]]) for m in range(3)]
    torch.testing.assert_close(
        out.extras["entropy"], torch.stack(per_router).mean(), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("gate", ["softmax", "gaussian"])
@pytest.mark.parametrize("routing", ["joint", "disjoint"])
def test_options_and_unequal_token_counts(gate, routing):
    torch.manual_seed(0)
    counts = {"a": 3, "b": 5, "c": 1}
    head = FuseMoE(MODS, D, 1, counts, num_heads=2, gate=gate, routing=routing).eval()
    B = PRESENT.shape[0]
    toks = {}
    for i, m in enumerate(MODS):
        mask = PRESENT[:, i : i + 1].expand(B, counts[m]).clone()
        toks[m] = ModalityTokens(torch.randn(B, counts[m], D) * mask[..., None], mask)
    out = head(toks, PRESENT)
    assert out.logits.shape == (B, 1) and torch.isfinite(out.logits).all()
    assert out.gates["layer0/router_probs"].shape[1] == 9
    assert torch.equal(out.gates["token_modality"], torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2]))


def test_built_by_name_and_trains():
    model = create_model("fusemoe", modalities=("a", "b"), num_tokens=3, d_model=16, num_heads=2)
    batch = random_batch(model, 4, seed=1)
    out = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], batch.labels)
    (loss + out.aux_loss).backward()
    assert model.head.missing_embed.grad is not None
    with pytest.raises(ValueError, match="readout"):
        _head(readout="max")


def test_padding_equals_truncation():
    """Padded tokens take no part in attention, routing or readout: dropping them is a no-op."""
    head = _head().eval()
    present = torch.ones(4, 3, dtype=torch.bool)  # a missing modality's tokens are all real
    toks = _tokens(present, pad=False)
    ref = head(toks, present).logits
    padded = {}
    for m, t in toks.items():  # append two padded tokens to every modality
        B = t.tokens.shape[0]
        mask = torch.cat([t.mask, torch.zeros(B, 2, dtype=torch.bool)], 1)
        padded[m] = ModalityTokens(torch.cat([t.tokens, torch.zeros(B, 2, D)], 1), mask)
    head.token_counts = [T + 2] * 3
    with torch.no_grad():
        head.missing_embed.data = torch.cat([head.missing_embed, torch.zeros(3, 2, D)], 1)
    torch.testing.assert_close(head(padded, present).logits, ref, atol=1e-5, rtol=1e-5)


def _hidden_states(head: FuseMoE, tokens, present) -> torch.Tensor:
    """``(B, M, T, D)`` input of the readout norm: each modality's state after fusion."""
    seen = {}
    handle = head.norm.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        head(tokens, present)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("cross_modal", ["attention", "none"])
def test_modalities_exchange_information_before_the_readout(cross_modal):
    """Noise in modality a's tokens reaches modality b's hidden states only with cross-modal mixing."""
    head = _head(cross_modal=cross_modal).eval()
    present = torch.ones(4, len(MODS), dtype=torch.bool)
    tokens = _tokens(present, pad=False)
    noised = dict(tokens)
    a = tokens["a"]
    noised["a"] = ModalityTokens(torch.randn_like(a.tokens) * 3, a.mask)
    before, after = _hidden_states(head, tokens, present), _hidden_states(head, noised, present)
    b_change = (after[:, 1] - before[:, 1]).abs().max().item()
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-3  # a itself changed
    if cross_modal == "attention":
        assert b_change > 1e-3, "b's states did not see a's content"
    else:
        assert b_change < 1e-6, "without cross-modal attention b must not see a"


def test_cross_modal_attention_ignores_absent_modalities_and_works_alone():
    head = _head().eval()
    present = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    tokens = _tokens(present, pad=True)
    b = tokens["b"]
    noised = dict(tokens, b=ModalityTokens(torch.randn_like(b.tokens) * 5, b.mask))
    with torch.no_grad():
        x0 = head(tokens, present).logits[0]
        x1 = head(noised, present).logits[0]
    torch.testing.assert_close(x0, x1)  # row 0 lacks b: its noise is invisible
    single = FuseMoE(("a",), D, 1, {"a": T}, num_experts=4, top_k=2, num_heads=2).eval()
    out = single({"a": tokens["a"]}, torch.ones(2, 1, dtype=torch.bool))
    assert torch.isfinite(out.logits).all()  # no other modality: a zero cross-modal update
