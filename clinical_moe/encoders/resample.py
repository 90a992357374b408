"""Learned-query attention pooling: a variable number of masked tokens -> exactly T tokens."""

from __future__ import annotations

import torch
from torch import nn


class TokenResampler(nn.Module):
    """Cross-attention from ``num_tokens`` learned queries to the real positions of a sequence.

    Padding positions get zero attention weight, so their content is invisible. Every row must have
    at least one real position (encoders run on present rows only).

    Args:
        d_model: Width D of inputs and outputs.
        num_tokens: Number of output tokens T.
        num_heads: Attention heads (must divide D; falls back to 1 otherwise).
    """

    def __init__(self, d_model: int, num_tokens: int, num_heads: int = 4) -> None:
        super().__init__()
        heads = num_heads if d_model % num_heads == 0 else 1
        self.queries = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
        self.norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool ``x (B, L, D)`` with ``mask (B, L)`` (True = real) into ``(B, T, D)``."""
        if not bool(mask.any(dim=1).all()):
            raise ValueError("TokenResampler: a row has no real position to attend to")
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, T, D)
        out, _ = self.attn(
            q, self.norm(x), self.norm(x), key_padding_mask=~mask, need_weights=False
        )
        return self.out_norm(out + q)  # (B, T, D)
