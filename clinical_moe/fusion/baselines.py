"""Baseline fusion heads: late fusion, concatenation and a dense transformer (METHODS.md).

They share the contract of the MoE heads so every comparison runs through the same pipeline.
"""

from __future__ import annotations

import torch
from torch import nn

from clinical_moe.fusion.base import FusionHead, masked_mean, zero_loss
from clinical_moe.registry import HEADS
from clinical_moe.types import FusionOutput, ModalityTokens


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
    )


@HEADS.register("late")
class LateFusion(FusionHead):
    """One classifier per modality on its pooled tokens; logits averaged over present modalities.

    Args:
        hidden: Width of each per-modality classifier.
        dropout: Dropout inside the classifiers.
    """

    def __init__(
        self,
        modalities,
        d_model,
        num_classes,
        num_tokens=None,
        hidden: int = 64,
        dropout: float = 0.1,
    ):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        self.classifiers = nn.ModuleDict(
            {m: _mlp(d_model, hidden, num_classes, dropout) for m in self.modalities}
        )

    def forward(self, tokens: dict[str, ModalityTokens], present, labels=None) -> FusionOutput:
        per = torch.stack(
            [
                self.classifiers[m](masked_mean(tokens[m].tokens, tokens[m].mask))
                for m in self.modalities
            ],
            1,
        )  # (B, M, C)
        w = present.to(per.dtype).unsqueeze(-1)  # (B, M, 1)
        logits = (per * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, C)
        return FusionOutput(logits, zero_loss(logits), extras={})


@HEADS.register("concat")
class ConcatFusion(FusionHead):
    """Pooled tokens per modality (a learned embedding when absent), concatenated -> MLP.

    Args:
        hidden: MLP width.
        dropout: MLP dropout.
    """

    def __init__(
        self,
        modalities,
        d_model,
        num_classes,
        num_tokens=None,
        hidden: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        self.missing = nn.Parameter(torch.zeros(len(self.modalities), d_model))
        self.mlp = _mlp(d_model * len(self.modalities), hidden, num_classes, dropout)

    def forward(self, tokens, present, labels=None) -> FusionOutput:
        pooled = torch.stack(
            [masked_mean(tokens[m].tokens, tokens[m].mask) for m in self.modalities], 1
        )
        pooled = torch.where(present.unsqueeze(-1), pooled, self.missing.unsqueeze(0))  # (B, M, D)
        logits = self.mlp(pooled.flatten(1))  # (B, M*D) -> (B, C)
        return FusionOutput(logits, zero_loss(logits))


@HEADS.register("transformer")
class TransformerFusion(FusionHead):
    """Dense transformer over all real tokens (key padding mask) -> masked mean -> linear.

    Args:
        num_layers: Transformer layers.
        num_heads: Attention heads.
        ffn_mult: FFN width as a multiple of D.
        dropout: Dropout.
    """

    def __init__(
        self,
        modalities,
        d_model,
        num_classes,
        num_tokens=None,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities), d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            d_model * ffn_mult,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, num_classes)

    def forward(self, tokens, present, labels=None) -> FusionOutput:
        xs = [tokens[m].tokens + self.type_embed[i] for i, m in enumerate(self.modalities)]
        x = torch.cat(xs, 1)  # (B, sum T_m, D)
        mask = torch.cat([tokens[m].mask for m in self.modalities], 1)  # (B, sum T_m)
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        h = self.encoder(x, src_key_padding_mask=~mask)
        logits = self.out(self.norm(masked_mean(h, mask)))
        return FusionOutput(logits, zero_loss(logits))
