"""FuseMoE: mixture-of-experts transformers for fleximodal fusion (Han et al., NeurIPS 2024).

The encoders already turn each modality into T tokens (mTAND for irregular series lives in
``clinical_moe.encoders``). This head implements the fusion part of the paper:

- Token-type embedding per modality; a missing modality is replaced by a learned missing-modality
  embedding of T tokens (paper; the public code fills zeros, we follow the paper).
- L MoE fusion layers (paper: 3). Each layer: per-modality self-attention (pre-LN, residual,
  within each modality's tokens, key padding mask), then cross-modal attention (pre-LN, residual:
  each modality's tokens attend to the real tokens of the *other* modalities, as the reference
  architecture's cross-modal attention over the time-aligned encoders' outputs does before its
  MoE), then the sparse MoE over the tokens of all modalities, residual, then a per-modality FFN
  (pre-LN, residual). Without the cross-modal step no layer exchanges information between
  modalities (attention, token-wise experts and FFNs are all within-modality), so the experts
  would only see one modality at a time and fusion would happen in the readout alone.
  ``cross_modal="none"`` restores that ablation.
- Router scores: softmax gate ``x . w_e``; Laplace gate ``-||x - w_e||_2`` (the paper's proposed
  gate and its best, default); Gaussian gate ``-||x - w_e||_2^2``. Per-modality routers with
  shared experts by default (the paper's best router design). Noisy top-k in training only.
- Loss: task loss + lambda * entropy regulariser (eq. 3)
  ``mean_i H(p_i) - H(mean_i p_i)``, averaged over the MoE layers; the other aux losses of
  :class:`clinical_moe.fusion.moe.MoELayer` are available through their weights.
- Readout: per modality the mean over its real tokens (or its last real token), concatenated, MLP.

Unlike the public code, every token of every sample is routed on its own (no reshape that mixes
patients), padded tokens take no part in attention, routing or readout, and the aux loss stays in
the graph. Paper defaults (Table 8): D 128, T 48, 16 experts, top-4, 3 layers, 8 heads, dropout
0.1; constructor defaults are small for CPU.

The experts' dropout is the shared layer's byte-mask dropout (drop rate rounded to a multiple of
1/256; :mod:`clinical_moe.fusion.moe`, issue #16); evaluation is unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinical_moe.fusion.base import FusionHead, masked_mean
from clinical_moe.fusion.moe import MoELayer
from clinical_moe.registry import HEADS
from clinical_moe.types import FusionOutput, ModalityTokens


class PerModalityLayerNorm(nn.Module):
    """LayerNorm with its own affine parameters per modality, on ``x (B, M, T, D)``."""

    def __init__(self, num_modalities: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_modalities, 1, d_model))  # (M, 1, D)
        self.bias = nn.Parameter(torch.zeros(num_modalities, 1, d_model))  # (M, 1, D)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class PerModalityAttention(nn.Module):
    """Self-attention within each modality's tokens, batched over modalities, own weights each.

    Args:
        num_modalities: M.
        d_model: Width D.
        num_heads: Attention heads (must divide D).
        dropout: Attention-probability dropout (training only).
    """

    def __init__(self, num_modalities: int, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.h, self.dropout = num_heads, dropout
        a = d_model**-0.5
        M, D = num_modalities, d_model
        self.w_qkv = nn.Parameter(torch.empty(M, D, 3 * D).uniform_(-a, a))
        self.b_qkv = nn.Parameter(torch.zeros(M, 1, 3 * D))
        self.w_out = nn.Parameter(torch.empty(M, D, D).uniform_(-a, a))
        self.b_out = nn.Parameter(torch.zeros(M, 1, D))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x (B, M, T, D)``, ``mask (B, M, T)`` (>= 1 True per (b, m)) -> ``(B, M, T, D)``."""
        B, M, T, D = x.shape
        qkv = torch.einsum("bmtd,mde->bmte", x, self.w_qkv) + self.b_qkv  # (B, M, T, 3D)
        qkv = qkv.reshape(B * M, T, 3, self.h, D // self.h).permute(
            2, 0, 3, 1, 4
        )  # (3, BM, h, T, dh)
        keep = mask.reshape(B * M, 1, 1, T)  # (BM, 1, 1, T): True = attend
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=keep, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, M, T, D)  # (B, M, T, D)
        return torch.einsum("bmtd,mde->bmte", out, self.w_out) + self.b_out


class PerModalityFFN(nn.Module):
    """A GELU MLP ``D -> H -> D`` with its own weights per modality, on ``x (B, M, T, D)``."""

    def __init__(self, num_modalities: int, d_model: int, hidden: int, dropout: float):
        super().__init__()
        M, D, H = num_modalities, d_model, hidden
        a1, a2 = D**-0.5, H**-0.5
        self.w1 = nn.Parameter(torch.empty(M, D, H).uniform_(-a1, a1))
        self.b1 = nn.Parameter(torch.zeros(M, 1, H))
        self.w2 = nn.Parameter(torch.empty(M, H, D).uniform_(-a2, a2))
        self.b2 = nn.Parameter(torch.zeros(M, 1, D))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.gelu(torch.einsum("bmtd,mdh->bmth", x, self.w1) + self.b1))  # (B, M, T, H)
        return torch.einsum("bmth,mhd->bmtd", h, self.w2) + self.b2  # (B, M, T, D)


class CrossModalAttention(nn.Module):
    """Each modality's tokens attend to the real tokens of the other modalities.

    Queries of modality m see keys of modalities m' != m only (key padding masked). A query with
    no such key (a single-modality model, or every other modality padded) gets a zero update.

    Args:
        d_model: Width D.
        num_heads: Attention heads (must divide D).
        dropout: Attention-probability dropout (training only).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.h, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x (B, M, T, D)``, ``mask (B, M, T)`` -> ``(B, M, T, D)`` update."""
        B, M, T, D = x.shape
        mod = torch.arange(M, device=x.device).repeat_interleave(T)  # (M*T,)
        other = mod[:, None] != mod[None, :]  # (MT, MT): query modality != key modality
        allowed = other.unsqueeze(0) & mask.reshape(B, 1, M * T)  # (B, MT, MT)
        has_key = allowed.any(-1)  # (B, MT)
        allowed = allowed | ~has_key.unsqueeze(-1)  # keep SDPA finite; those rows are zeroed
        qkv = self.qkv(x.reshape(B, M * T, D))  # (B, MT, 3D)
        qkv = qkv.view(B, M * T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)  # (3, B, h, MT, dh)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=allowed.unsqueeze(1), dropout_p=p
        )  # (B, h, MT, dh)
        out = self.out(out.transpose(1, 2).reshape(B, M * T, D))  # (B, MT, D)
        out = out * has_key.unsqueeze(-1)  # (B, MT, D)
        return out.view(B, M, T, D)


class FuseMoELayer(nn.Module):
    """One layer: per-modality attention -> cross-modal attention -> MoE -> per-modality FFN."""

    def __init__(
        self,
        M: int,
        d_model: int,
        num_heads: int,
        ffn_hidden: int,
        dropout: float,
        moe,
        cross_modal: bool = True,
    ):
        super().__init__()
        self.cross = CrossModalAttention(d_model, num_heads, dropout) if cross_modal else None
        self.ln_cross = PerModalityLayerNorm(M, d_model) if cross_modal else None
        self.ln_attn, self.ln_moe = (
            PerModalityLayerNorm(M, d_model),
            PerModalityLayerNorm(M, d_model),
        )
        self.ln_ffn = PerModalityLayerNorm(M, d_model)
        self.attn = PerModalityAttention(M, d_model, num_heads, dropout)
        self.moe: MoELayer = moe
        self.ffn = PerModalityFFN(M, d_model, ffn_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, modality_ids: Tensor):
        B, M, T, D = x.shape
        x = x + self.drop(self.attn(self.ln_attn(x), mask))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.ln_cross(x), mask))  # modalities exchange here
        flat = self.ln_moe(x).reshape(B, M * T, D)  # (B, M*T, D): all modalities meet here
        out = self.moe(flat, mask.reshape(B, M * T), modality_ids)
        x = x + self.drop(out.y.view(B, M, T, D))  # (B, M, T, D)
        x = x + self.drop(self.ffn(self.ln_ffn(x)))
        return x, out


@HEADS.register("fusemoe")
class FuseMoE(FusionHead):
    """FuseMoE fusion head (Han et al., NeurIPS 2024); see the module docstring.

    Args:
        num_layers: MoE fusion layers L (paper 3).
        num_experts: Experts E per MoE layer (paper 16).
        top_k: Experts per token (paper 4).
        num_heads: Attention heads (paper 8).
        expert_hidden: Hidden width of each expert (default ``2 * d_model``).
        ffn_mult: Per-modality FFN width as a multiple of D.
        gate: Router gate ``"laplace"`` (paper's best) | ``"softmax"`` | ``"gaussian"``.
        routing: ``"per_modality"`` (paper's best) | ``"joint"`` | ``"disjoint"``.
        noisy: Noisy top-k routing in training.
        noise_scale: Router noise std relative to each token's score spread (fusion/moe.py).
        cross_modal: ``"attention"`` (default; cross-modal attention before each MoE layer) or
            ``"none"`` (ablation: modalities meet only in the readout).
        dropout: Dropout (paper 0.1).
        entropy: lambda, weight of the entropy regulariser (eq. 3); 0.01 is our default.
        load_balance: Weight of the Switch load-balance loss (off in the paper).
        cv2: Weight of ``CV^2(importance) + CV^2(load)`` (computed and dropped by the public code).
        z_loss: Weight of the router z-loss.
        readout: ``"mean"`` over each modality's real tokens or its ``"last"`` real token.
        readout_hidden: Width of the readout MLP (default ``2 * d_model``).
    """

    def __init__(
        self,
        modalities,
        d_model,
        num_classes,
        num_tokens=None,
        num_layers: int = 2,
        num_experts: int = 8,
        top_k: int = 2,
        num_heads: int = 4,
        expert_hidden: int | None = None,
        ffn_mult: int = 2,
        gate: str = "laplace",
        routing: str = "per_modality",
        noisy: bool = True,
        noise_scale: float = 0.25,
        cross_modal: str = "attention",
        dropout: float = 0.1,
        entropy: float = 0.01,
        load_balance: float = 0.0,
        cv2: float = 0.0,
        z_loss: float = 0.0,
        readout: str = "mean",
        readout_hidden: int | None = None,
    ):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        if readout not in ("mean", "last"):
            raise ValueError(f"readout must be 'mean' or 'last', got {readout!r}")
        if cross_modal not in ("attention", "none"):
            raise ValueError(f"cross_modal must be 'attention' or 'none', got {cross_modal!r}")
        M, D = len(self.modalities), d_model
        self.readout, self.num_layers = readout, num_layers
        self.token_counts = [int(self.num_tokens.get(m, 1)) for m in self.modalities]
        T = max(self.token_counts)
        self.type_embed = nn.Parameter(torch.randn(M, 1, D) * 0.02)  # (M, 1, D)
        self.missing_embed = nn.Parameter(torch.randn(M, T, D) * 0.02)  # (M, T, D)
        self.layers = nn.ModuleList(
            FuseMoELayer(
                M, D, num_heads, ffn_mult * D, dropout,
                MoELayer(
                    D, num_experts, top_k, expert_hidden or 2 * D, gate=gate, routing=routing,
                    modalities=self.modalities, noisy=noisy, noise_scale=noise_scale,
                    dropout=dropout, load_balance=load_balance, cv2=cv2, entropy=entropy,
                    z_loss=z_loss,
                ),
                cross_modal=cross_modal == "attention",
            )
            for _ in range(num_layers)
        )  # fmt: skip
        self.norm = PerModalityLayerNorm(M, D)
        h = readout_hidden or 2 * D
        self.classifier = nn.Sequential(
            nn.Linear(M * D, h), nn.GELU(), nn.Dropout(dropout), nn.Linear(h, num_classes)
        )

    def _missing(self, m: int, T: int) -> Tensor:
        emb = self.missing_embed[m]  # (T_max, D)
        if self.token_counts[m] == 1:
            return emb[:1].expand(T, -1)  # (T, D): one learned vector when T is unknown
        if emb.shape[0] < T:
            raise ValueError(
                f"modality {self.modalities[m]!r} has {T} tokens but the head was built for "
                f"{self.token_counts[m]} (num_tokens)"
            )
        return emb[:T]

    def assemble(self, tokens: dict[str, ModalityTokens], present: Tensor):
        """Stack modalities to ``x (B, M, T_max, D)`` + ``mask (B, M, T_max)``.

        Absent modalities (and present ones without a real token) take the learned missing
        embedding, all of whose tokens are real; padded tokens are zeroed and masked.
        """
        T = max(max(tokens[m].tokens.shape[1] for m in self.modalities), 1)
        xs, masks = [], []
        for i, name in enumerate(self.modalities):
            tok, mask = tokens[name].tokens, tokens[name].mask  # (B, T_m, D), (B, T_m)
            B, T_m, _ = tok.shape
            has = present[:, i] & mask.any(1)  # (B,)
            x = torch.where(mask.unsqueeze(-1), tok, tok.new_zeros(()))  # padded -> 0
            x = torch.where(
                has[:, None, None], x, self._missing(i, T_m).unsqueeze(0)
            )  # (B, T_m, D)
            mask = mask | ~has[:, None]  # (B, T_m): the missing embedding's tokens are real
            xs.append(F.pad(x, (0, 0, 0, T - T_m)))  # (B, T, D)
            masks.append(F.pad(mask, (0, T - T_m), value=False))  # (B, T)
        x = torch.stack(xs, 1) + self.type_embed  # (B, M, T, D)
        return x, torch.stack(masks, 1)  # (B, M, T, D), (B, M, T)

    def forward(self, tokens, present, labels=None) -> FusionOutput:
        x, mask = self.assemble(tokens, present)
        B, M, T, D = x.shape
        mod = torch.arange(M, device=x.device).repeat_interleave(T)  # (M*T,)
        modality_ids = mod.expand(B, -1)  # (B, M*T)
        counts = self.token_counts_of(tokens)
        slots = torch.cat([torch.arange(t, device=x.device) + m * T for m, t in enumerate(counts)])
        aux = x.new_zeros(())
        gates, extras = {}, {}
        for i, layer in enumerate(self.layers):
            x, out = layer(x, mask, modality_ids)
            aux = aux + out.aux_loss / self.num_layers
            gates[f"layer{i}/router_probs"] = out.probs[:, slots]  # (B, T_total, E)
            gates[f"layer{i}/topk"] = out.topk_idx[:, slots]  # (B, T_total, k)
            for k, v in out.extras.items():
                if k == "topk_agreement":  # per layer: is training routing the eval routing?
                    extras[f"layer{i}/topk_agreement"] = v
                else:
                    extras[k] = extras.get(k, 0.0) + v / self.num_layers
        gates["token_modality"] = mod[slots]  # (T_total,)
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padded slots can hold anything: drop them
        h = self.norm(x)  # (B, M, T, D)
        if self.readout == "mean":
            pooled = masked_mean(h.reshape(B * M, T, D), mask.reshape(B * M, T))  # (B*M, D)
        else:
            last = (mask * torch.arange(1, T + 1, device=x.device)).argmax(-1)  # (B, M)
            pooled = h.gather(2, last[..., None, None].expand(B, M, 1, D))  # (B, M, 1, D)
        logits = self.classifier(pooled.reshape(B, M * D))  # (B, M*D) -> (B, C)
        return FusionOutput(logits, aux, gates=gates, extras=extras)

    def token_counts_of(self, tokens: dict[str, ModalityTokens]) -> list[int]:
        """Tokens per modality in this batch, in modality order."""
        return [tokens[m].tokens.shape[1] for m in self.modalities]
