"""Multi-time attention (mTAND): irregularly timed observations -> values at fixed reference times.

Implements the multi-time attention module of Shukla & Marlin, "Multi-Time Attention Networks for
Irregularly Sampled Time Series" (ICLR 2021, Sec. 3), as FuseMoE (Han et al., NeurIPS 2024) uses it
to turn EHR series and event embeddings into a fixed number of tokens (METHODS.md, "FuseMoE"):

- learned time embedding (mTAND eq. 1): ``phi(t) = [w0 * t + b0, sin(W t + b)]``;
- for reference time ``r`` and head ``h``, the weight of observation ``j`` is
  ``softmax_j(phi(r) Q_h . (phi(t_j) K_h) / sqrt(d_k))`` over the *observed* ``j`` only, and the
  output is the weighted sum of the observed values (mTAND eq. 2-3). For a multivariate series the
  softmax runs per variable, so each variable attends over its own observations;
- the heads' outputs are concatenated (the caller projects them to the model width).

A variable (or an event sequence) with no observation in a row gets zero weight everywhere and a
zero output, without NaNs in the forward or backward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """``phi(t) = [w0 * t + b0, sin(W t + b)]`` (mTAND eq. 1): 1 linear, ``dim - 1`` periodic terms.

    Args:
        dim: Embedding size (>= 2).
        scale: Times are divided by ``scale`` first (e.g. the window length in hours) so the
            initial frequencies suit the time range.
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"time embedding needs dim >= 2, got {dim}")
        self.scale = float(scale)
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, dim - 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t (...)`` in hours -> ``(..., dim)``."""
        t = (t / self.scale).unsqueeze(-1)  # (..., 1)
        return torch.cat([self.linear(t), torch.sin(self.periodic(t))], dim=-1)  # (..., dim)


def masked_softmax_weights(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``mask``; all-masked slices give zeros.

    The shift by the (detached) masked maximum is exact for a softmax and keeps every exponent
    <= 0, so no slice underflows to 0/0; masked entries get weight 0 and zero gradient.
    """
    neg_inf = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~mask, neg_inf)
    shift = masked.amax(dim=dim, keepdim=True).detach()
    shift = torch.where(shift > neg_inf / 2, shift, torch.zeros_like(shift))
    e = torch.exp((masked - shift).clamp_max(0.0)) * mask  # masked -> exactly 0
    denom = e.sum(dim=dim, keepdim=True)
    return e / denom.clamp_min(torch.finfo(scores.dtype).tiny)


class MultiTimeAttention(nn.Module):
    """mTAND attention from reference times to observation times.

    Args:
        time_embed_dim: Size of ``phi(t)`` (paper: 64 in FuseMoE, 128 in mTAND).
        num_heads: Heads H; each has its own query / key maps of size ``time_embed_dim // H``.
        time_scale: Divides times before the embedding (use the window length).
    """

    def __init__(self, time_embed_dim: int = 64, num_heads: int = 1, time_scale: float = 1.0):
        super().__init__()
        if time_embed_dim % num_heads:
            raise ValueError(
                f"time_embed_dim {time_embed_dim} not divisible by num_heads {num_heads}"
            )
        self.num_heads = num_heads
        self.d_k = time_embed_dim // num_heads
        self.embed = TimeEmbedding(time_embed_dim, scale=time_scale)
        self.query = nn.Linear(time_embed_dim, time_embed_dim)
        self.key = nn.Linear(time_embed_dim, time_embed_dim)

    def scores(self, ref_times: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """``ref_times (R,)`` or ``(B, R)`` and ``times (B, L)`` -> scores ``(B, H, R, L)``."""
        B, L = times.shape
        if ref_times.dim() == 1:
            ref_times = ref_times.unsqueeze(0).expand(B, -1)  # (B, R)
        R = ref_times.shape[1]
        q = self.query(self.embed(ref_times)).view(B, R, self.num_heads, self.d_k)  # (B, R, H, dk)
        k = self.key(self.embed(times)).view(B, L, self.num_heads, self.d_k)  # (B, L, H, dk)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, R, dk), (B, H, L, dk)
        return q @ k.transpose(-1, -2) / math.sqrt(self.d_k)  # (B, H, R, L)

    def forward(
        self,
        ref_times: torch.Tensor,
        times: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Interpolate ``values`` at ``ref_times``.

        Args:
            ref_times: ``(R,)`` shared or ``(B, R)`` per-row reference times.
            times: ``(B, L)`` observation times; times at fully masked positions are ignored.
            values: ``(B, L, F)`` observations.
            mask: ``(B, L, F)`` per-feature (per-variable softmax) or ``(B, L)`` per-position
                (one softmax shared by all features, e.g. event embeddings). True = observed.

        Returns:
            ``(B, R, H * F)``: per head, the attention-weighted observed values; heads concatenated.
        """
        mask = mask.bool()
        seen = mask if mask.dim() == 2 else mask.any(-1)  # (B, L)
        zero = torch.zeros((), dtype=times.dtype, device=times.device)
        times = torch.where(seen, times, zero)  # padded times never enter the embedding
        m_full = mask if mask.dim() == 3 else mask.unsqueeze(-1).expand_as(values)  # (B, L, F)
        values = torch.where(
            m_full, values, torch.zeros((), dtype=values.dtype, device=values.device)
        )
        s = self.scores(ref_times, times)  # (B, H, R, L)
        B, H, R, L = s.shape
        if mask.dim() == 2:
            w = masked_softmax_weights(s, mask[:, None, None, :], dim=-1)  # (B, H, R, L)
            out = w @ values.unsqueeze(1)  # (B, H, R, F)
        else:
            m5 = mask[:, None, None, :, :]  # (B, 1, 1, L, F)
            w = masked_softmax_weights(s.unsqueeze(-1), m5, dim=3)  # (B, H, R, L, F)
            out = (w * values[:, None, None]).sum(dim=3)  # (B, H, R, F)
        return out.permute(0, 2, 1, 3).reshape(B, R, -1)  # (B, R, H * F)


def reference_times(num: int, window_hours: float) -> torch.Tensor:
    """``num`` reference times evenly spaced over the window (bin centres): ``(num,)``."""
    step = window_hours / num
    return torch.arange(num, dtype=torch.float32) * step + step / 2


class EventMTAND(nn.Module):
    """Event embeddings at irregular times -> exactly T tokens (FuseMoE's event path).

    Args:
        d_model: Width D of the event embeddings and of the output tokens.
        num_tokens: Reference times T, evenly spaced over the window.
        window_hours: Length of the window the reference times cover.
        num_heads: mTAND heads.
        time_embed_dim: Size of ``phi(t)``.
    """

    def __init__(
        self,
        d_model: int,
        num_tokens: int,
        window_hours: float = 48.0,
        num_heads: int = 1,
        time_embed_dim: int = 16,
    ) -> None:
        super().__init__()
        self.mtan = MultiTimeAttention(time_embed_dim, num_heads, time_scale=window_hours)
        self.register_buffer(
            "ref_times", reference_times(num_tokens, window_hours), persistent=False
        )
        self.proj = nn.Linear(num_heads * d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, events: torch.Tensor, times: torch.Tensor, event_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``events (B, N, D)``, ``times``, ``event_mask (B, N)`` -> ``(B, T, D)``, ``(B, T)``."""
        out = self.mtan(self.ref_times, times, events, event_mask)  # (B, T, H * D)
        tokens = self.norm(self.proj(out))  # (B, T, D)
        return tokens, self.ref_times.unsqueeze(0).expand(events.shape[0], -1)  # (B, T)
