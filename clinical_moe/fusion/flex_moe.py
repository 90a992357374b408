"""Flex-MoE: flexible modality combinations with a missing-modality bank (Yun et al., NeurIPS 2024).

Implements the fusion part of the paper (method section, Fig. 3) on the P tokens per modality that
the encoders emit:

- Missing-modality bank (Fig. 3b): a learnable ``bank[c, m]`` of P tokens for each observed
  combination c and modality m; a missing modality m of a sample whose combination id is c is filled
  with ``bank[c, m]`` (``bank="full"``, shape ``(2^M - 1, M, P, D)``). For large M,
  ``bank="factorized"`` uses ``bank_c[c] + bank_m[m]`` (``(2^M - 1, P, D)`` + ``(M, P, D)``).
- Combination ids (:func:`combination_id`): the full set is 0; the other non-empty subsets follow
  by decreasing size, then lexicographically by their modality indices. For M = 3 (a, b, c):
  0 abc, 1 ab, 2 ac, 3 bc, 4 a, 5 b, 6 c.
- Fusion: all M*P tokens + a learned positional embedding through L pre-LN transformer layers
  (``x = x + attn(LN(x))``; ``x = x + ffn(LN(x))`` -- the public code loses the input residual after
  attention, we do not). Layer 0's FFN is a sparse MoE, then dense and sparse alternate.
- Router: noisy top-k softmax (Shazeer et al. 2017). Combination c has the designated expert
  ``e_c = c mod E``; by default ``E >= 2^M - 1`` so each combination owns one expert.
- G-router (Fig. 3c, samples with every modality): ``L_G = CV^2(importance) + CV^2(load)`` over
  their tokens. S-router (Fig. 3d, samples with a missing modality): ``L_S = CE(s(x), e_c)``, the
  cross entropy of the router logits against the designated expert, plus ``CV^2`` balance over
  the other experts within each combination. One router serves both groups; they differ in loss.
  ``specialization="hard"`` gives ``e_c`` the top-1 slot of every token of such a sample, as the
  paper describes: it is selected first and gated with at least the token's best router score
  (so its weight is never below another selected expert's), the other k-1 slots go to the best
  remaining experts; ``"soft"`` applies the loss only (public code).
- Loss: task loss + ``gate_loss * mean over sparse layers (L_G + L_S)`` (paper gate-loss weight
  0.01). Load counts are not differentiable; importance and the cross entropy carry the gradient.
- Readout: mean over each modality's tokens, concatenated, LayerNorm'd, linear -> C.

The training-order sampler of the paper (most observed modalities first) lives in the data pipeline.
Dropout on the residual branches, in the dense FFNs and in the experts is the byte-mask dropout of
:mod:`clinical_moe.fusion.backbone` (issue #16: ``F.dropout``'s Bernoulli draws were ~10% of a
B 64 training step): drop rate rounded to a multiple of 1/256 (0.1 -> 0.1016), another random
stream; evaluation is unaffected. Self-attention is :class:`SelfAttention` (issue #16): the
computation of ``nn.MultiheadAttention(batch_first=True)`` (one packed q/k/v projection, scaled
dot-product attention, output projection) without its batch-first transposes and float key-padding
mask; its parameters keep ``nn.MultiheadAttention``'s names and initialisation, so earlier state
dicts load unchanged, and evaluation gives the same result. Attention-probability dropout (training)
is the same inverted Bernoulli(1 - p) at the exact rate p, drawn as ``uniform >= p`` (another random
stream than ``nn.MultiheadAttention``'s, at half the cost of its ``bernoulli_``).
Paper defaults: P 16, D 128, 16 experts, top-4, 4 heads, gate loss 0.01; defaults here are small.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinical_moe.fusion.backbone import Dropout, safe_key_mask
from clinical_moe.fusion.base import FusionHead, masked_mean
from clinical_moe.fusion.moe import MoELayer, cv_squared
from clinical_moe.registry import HEADS
from clinical_moe.types import FusionOutput, ModalityTokens


@cache
def _subsets(num_modalities: int) -> tuple[int, ...]:
    """Bitmasks (bit m = modality m observed) of the non-empty subsets, in combination-id order."""
    M = num_modalities
    members = {s: tuple(m for m in range(M) if s >> m & 1) for s in range(1, 1 << M)}
    return tuple(sorted(members, key=lambda s: (-len(members[s]), members[s])))


@cache
def _lookup(num_modalities: int) -> Tensor:
    """``(2^M,)`` long: bitmask -> combination id (-1 for the empty set)."""
    lut = torch.full((1 << num_modalities,), -1, dtype=torch.long)
    lut[list(_subsets(num_modalities))] = torch.arange((1 << num_modalities) - 1)
    return lut


def combination_id(present: Tensor) -> Tensor:
    """``present (B, M)`` bool -> ``LongTensor[B]`` combination ids (full set = 0).

    Raises:
        ValueError: If a row observes no modality.
    """
    B, M = present.shape
    bits = (present.long() << torch.arange(M, device=present.device)).sum(1)  # (B,)
    ids = _lookup(M).to(present.device)[bits]
    if bool((ids < 0).any()):
        raise ValueError(f"rows {(ids < 0).nonzero().flatten().tolist()} observe no modality")
    return ids


def combination_of(c: int, num_modalities: int) -> tuple[bool, ...]:
    """The present pattern of combination id ``c`` (inverse of :func:`combination_id`)."""
    s = _subsets(num_modalities)[c]
    return tuple(bool(s >> m & 1) for m in range(num_modalities))


def _masked_cv2(v: Tensor, keep: Tensor) -> Tensor:
    """Row-wise ``CV^2`` of ``v (G, E)`` over the entries where ``keep (G, E)`` -> ``(G,)``."""
    keep = keep.to(v.dtype)
    n = keep.sum(1).clamp_min(1.0)  # (G,)
    mean = (v * keep).sum(1) / n
    var = ((v - mean[:, None]) ** 2 * keep).sum(1) / n
    return torch.where(n > 1, var / (mean**2 + 1e-10), torch.zeros_like(var))


class SelfAttention(nn.Module):
    """Batch-first multi-head self-attention with ``nn.MultiheadAttention``'s parameters.

    Same parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), initialisation
    order and result as ``nn.MultiheadAttention(d_model, num_heads, dropout, batch_first=True)``
    called as ``attn(x, x, x, key_padding_mask=~key_mask, need_weights=False)[0]``; q, k and v are
    strided views of one projection and the key mask stays boolean.

    Args:
        d_model: Width D.
        num_heads: Heads (must divide D).
        dropout: Attention-probability dropout (training only).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # (3D, D)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))  # (3D,)
        self.out_proj = nn.Linear(d_model, d_model)  # drawn first, as in nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """``x (B, T, D)``, ``key_mask (B, T)`` bool (True = real key) -> ``(B, T, D)``."""
        B, T, D = x.shape
        H = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3D)
        q, k, v = (t.reshape(B, T, H, D // H).transpose(1, 2) for t in qkv.split(D, -1))
        mask = None if bool(key_mask.all()) else safe_key_mask(key_mask)[:, None, None, :]
        p = self.dropout if self.training else 0.0
        if p > 0:
            o = self.dropout_attention(q, k, v, mask, p)  # (B, H, T, dh)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, dh)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    @staticmethod
    def dropout_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
        """Attention with dropout ``p`` on the probabilities, as the unfused kernel computes it.

        CPU ``scaled_dot_product_attention`` with dropout takes its unfused path anyway; this one
        draws the kept entries as ``uniform >= p`` (the same Bernoulli(1 - p) as ``F.dropout``,
        another random stream, at half the cost of its ``bernoulli_``) with the ``1 / (1 - p)``
        scale folded into the mask, and skips the kernel's check for fully masked rows.

        Args:
            q, k, v: ``(B, H, T, dh)``.
            mask: ``(B, 1, 1, T)`` bool, True = real key (no row all False), or None.
            p: Dropout rate in (0, 1].
        """
        s = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # (B, H, T, T)
        if mask is not None:
            s = s.masked_fill_(~mask, float("-inf"))
        a = torch.softmax(s, -1)  # (B, H, T, T)
        if p >= 1.0:
            return torch.zeros_like(v)
        keep = torch.rand_like(a).ge_(p).mul_(1.0 / (1.0 - p))  # 0 or 1 / (1 - p)
        return torch.matmul(a * keep, v)  # (B, H, T, dh)


@HEADS.register("flex_moe")
class FlexMoE(FusionHead):
    """Flex-MoE fusion head (Yun et al., NeurIPS 2024); see the module docstring.

    Args:
        num_layers: Transformer layers L; layers 0, 2, ... have a sparse MoE FFN.
        num_experts: Experts E; None = ``max(2^M - 1, top_k)``. Smaller than ``2^M - 1`` is an
            error unless ``allow_shared_experts`` (then combinations share ``c mod E``).
        top_k: Experts per token (paper 4).
        num_heads: Attention heads (paper 4).
        expert_hidden: Hidden width of each expert (default ``2 * d_model``).
        ffn_mult: Dense FFN width as a multiple of D.
        specialization: ``"soft"`` (loss only) or ``"hard"`` (the designated expert takes the
            top-1 slot of every token of a sample with missing modalities, as the paper describes).
        gate_loss: Weight of the router losses ``L_G + L_S`` (paper 0.01).
        bank: ``"full"`` | ``"factorized"`` | None (full when M <= 6, else factorized).
        gate: Router gate (paper: ``"softmax"``).
        noisy: Noisy top-k in training.
        noise_scale: Router noise std relative to each token's score spread (fusion/moe.py).
        dropout: Dropout.
        allow_shared_experts: Permit ``num_experts < 2^M - 1``.
    """

    def __init__(
        self,
        modalities,
        d_model,
        num_classes,
        num_tokens=None,
        num_layers: int = 2,
        num_experts: int | None = None,
        top_k: int = 2,
        num_heads: int = 4,
        expert_hidden: int | None = None,
        ffn_mult: int = 2,
        specialization: str = "soft",
        gate_loss: float = 0.01,
        bank: str | None = None,
        gate: str = "softmax",
        noisy: bool = True,
        noise_scale: float = 0.25,
        dropout: float = 0.1,
        allow_shared_experts: bool = False,
    ):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        M, D = len(self.modalities), d_model
        C = (1 << M) - 1
        if specialization not in ("soft", "hard"):
            raise ValueError(f"specialization must be 'soft' or 'hard', got {specialization!r}")
        bank = bank or ("full" if M <= 6 else "factorized")
        if bank not in ("full", "factorized"):
            raise ValueError(f"bank must be 'full' or 'factorized', got {bank!r}")
        if num_experts is None:
            num_experts = max(C, top_k)
        elif num_experts < C and not allow_shared_experts:
            raise ValueError(
                f"Flex-MoE needs num_experts >= 2^M - 1 = {C} for M={M} modalities (one designated "
                f"expert per combination); got {num_experts}. Use num_experts=None (auto) or "
                "allow_shared_experts=True (combination c then uses expert c mod E)."
            )
        self.num_experts, self.specialization = num_experts, specialization
        self.gate_loss, self.bank_kind = gate_loss, bank
        self.token_counts = [int(self.num_tokens.get(m, 1)) for m in self.modalities]
        P = max(self.token_counts)
        if bank == "full":
            self.bank = nn.Parameter(torch.randn(C, M, P, D) * 0.02)  # (2^M-1, M, P, D)
        else:
            self.bank_c = nn.Parameter(torch.randn(C, 1, P, D) * 0.02)  # (2^M-1, 1, P, D)
            self.bank_m = nn.Parameter(torch.randn(1, M, P, D) * 0.02)  # (1, M, P, D)
        self.pos = nn.Parameter(torch.randn(M * P, D) * 0.02)  # (M*P, D)
        self.ln1 = nn.ModuleList(nn.LayerNorm(D) for _ in range(num_layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(num_layers))
        self.attn = nn.ModuleList(SelfAttention(D, num_heads, dropout) for _ in range(num_layers))
        self.ffn = nn.ModuleList(
            MoELayer(D, num_experts, top_k, expert_hidden or 2 * D, gate=gate, noisy=noisy,
                     noise_scale=noise_scale, dropout=dropout)
            if i % 2 == 0
            else nn.Sequential(nn.Linear(D, ffn_mult * D), nn.GELU(), Dropout(dropout),
                               nn.Linear(ffn_mult * D, D))
            for i in range(num_layers)
        )  # fmt: skip
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(M * D, num_classes)

    def combination_id(self, present: Tensor) -> Tensor:
        """``present (B, M)`` -> ``LongTensor[B]`` combination ids (module function)."""
        return combination_id(present)

    def combination_of(self, c: int) -> tuple[bool, ...]:
        """Present pattern of combination id ``c`` for this head's modalities."""
        return combination_of(c, len(self.modalities))

    def designated_expert(self, c: Tensor) -> Tensor:
        """The expert that specialises in combination ``c``: ``c mod E``."""
        return c % self.num_experts

    def bank_tokens(self, c: Tensor) -> Tensor:
        """``c (B,)`` -> ``(B, M, P, D)`` bank content for every modality of each sample."""
        if self.bank_kind == "full":
            return self.bank.index_select(0, c)  # (B, M, P, D)
        return self.bank_c.index_select(0, c) + self.bank_m  # (B, M, P, D)

    def assemble(self, tokens: dict[str, ModalityTokens], present: Tensor):
        """Fusion input before positional embedding.

        Returns:
            ``x (B, M, P, D)`` with missing modalities filled from the bank and padded tokens
            zeroed, ``mask (B, M, P)`` True = real (bank tokens are real), ``c (B,)`` ids. A present
            modality without any real token counts as missing.
        """
        P = max(tokens[m].tokens.shape[1] for m in self.modalities)
        has = torch.stack(
            [present[:, i] & tokens[m].mask.any(1) for i, m in enumerate(self.modalities)], 1
        )  # (B, M)
        c = combination_id(has)
        bank = self.bank_tokens(c)  # (B, M, P_bank, D)
        if bank.shape[2] < P:
            raise ValueError(
                f"a modality has {P} tokens but the head was built for {bank.shape[2]}"
            )
        xs, masks = [], []
        for i, name in enumerate(self.modalities):
            tok, mask = tokens[name].tokens, tokens[name].mask  # (B, P_m, D), (B, P_m)
            P_m = tok.shape[1]
            x = torch.where(mask.unsqueeze(-1), tok, tok.new_zeros(()))
            x = torch.where(has[:, i, None, None], x, bank[:, i, :P_m])  # (B, P_m, D)
            xs.append(F.pad(x, (0, 0, 0, P - P_m)))  # (B, P, D)
            masks.append(F.pad(mask | ~has[:, i, None], (0, P - P_m), value=False))  # (B, P)
        return torch.stack(xs, 1), torch.stack(masks, 1), c  # (B, M, P, D), (B, M, P), (B,)

    def router_losses(self, out, mask: Tensor, c: Tensor) -> dict[str, Tensor]:
        """G-router balance, S-router specialisation and balance, from one sparse layer's output.

        Args:
            out: :class:`~clinical_moe.fusion.moe.MoEOutput` of a ``(B, T)`` token grid.
            mask: ``(B, T)`` real tokens.
            c: ``(B,)`` combination ids.
        """
        B, T, E = out.scores.shape
        real = mask.reshape(B * T)  # (B*T,)
        tok_c = c[:, None].expand(B, T).reshape(B * T)  # (B*T,)
        idx = out.topk_idx.reshape(B * T, -1).clamp_min(0)  # (B*T, k)
        w = out.weights.reshape(B * T, -1)  # (B*T, k), zeros at masked tokens
        dense_w = w.new_zeros(B * T, E).scatter(1, idx, w)  # (B*T, E)
        hits = w.new_zeros(B * T, E).scatter(1, idx, 1.0) * real[:, None].to(w.dtype)  # (B*T, E)
        g, s = real & (tok_c == 0), real & (tok_c > 0)
        zero = out.scores.new_zeros(())
        bal_g = cv_squared(dense_w[g].sum(0)) + cv_squared(hits[g].sum(0)) if g.any() else zero
        if not s.any():
            return {"balance_g": bal_g, "specialization": zero, "balance_s": zero}
        target = self.designated_expert(tok_c[s])
        spec = F.cross_entropy(out.scores.reshape(B * T, E)[s], target)
        C = (1 << len(self.modalities)) - 1
        imp = w.new_zeros(C, E).index_add(0, tok_c[s], dense_w[s])  # (C, E)
        load = w.new_zeros(C, E).index_add(0, tok_c[s], hits[s])  # (C, E)
        keep = torch.ones(C, E, dtype=torch.bool, device=w.device)
        cs = torch.arange(C, device=w.device)
        keep[cs, self.designated_expert(cs)] = False  # balance over the other experts
        used = torch.zeros(C, dtype=torch.bool, device=w.device)
        used[tok_c[s]] = True
        bal_s = (_masked_cv2(imp, keep) + _masked_cv2(load, keep))[used].mean()
        return {"balance_g": bal_g, "specialization": spec, "balance_s": bal_s}

    def forward(self, tokens, present, labels=None) -> FusionOutput:
        x, mask, c = self.assemble(tokens, present)
        B, M, P, D = x.shape
        h = x.reshape(B, M * P, D) + self.pos[: M * P]  # (B, M*P, D)
        keep = mask.reshape(B, M * P)  # (B, M*P)
        forced = None
        if self.specialization == "hard":
            fc = torch.where(c > 0, self.designated_expert(c), torch.full_like(c, -1))  # (B,)
            forced = fc[:, None].expand(B, M * P)  # (B, M*P)
        parts: dict[str, list[Tensor]] = {}
        gates: dict[str, Tensor] = {"combination_id": c}
        agreement: dict[str, Tensor] = {}
        for i, (ln1, attn, ln2, ffn) in enumerate(zip(self.ln1, self.attn, self.ln2, self.ffn)):
            q = ln1(h)
            a = attn(q, keep)  # (B, M*P, D)
            h = self.drop.residual(h, a)  # h + drop(a), the dropout scale folded into the add
            if isinstance(ffn, MoELayer):
                out = ffn(ln2(h), keep, forced_expert=forced)
                h = self.drop.residual(h, out.y)
                for name, val in self.router_losses(out, keep, c).items():
                    parts.setdefault(name, []).append(val)
                gates[f"layer{i}/router_probs"] = out.probs  # (B, M*P, E)
                gates[f"layer{i}/topk"] = out.topk_idx  # (B, M*P, k)
                agreement[f"layer{i}/topk_agreement"] = out.extras["topk_agreement"]
            else:
                h = self.drop.residual(h, ffn(ln2(h)))
        gates["token_modality"] = torch.arange(M, device=h.device).repeat_interleave(P)  # (M*P,)
        h = self.norm(h).reshape(B * M, P, D)  # (B*M, P, D)
        pooled = masked_mean(h, mask.reshape(B * M, P)).reshape(B, M * D)  # (B, M*D)
        logits = self.out(pooled)
        losses = {k: torch.stack(v).mean() for k, v in parts.items()}
        aux = sum(losses.values(), h.new_zeros(())) * self.gate_loss
        return FusionOutput(
            logits,
            aux,
            gates=gates,
            extras={**{k: v.detach() for k, v in losses.items()}, **agreement},
        )
