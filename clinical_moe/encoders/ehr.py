"""EHR encoder: irregular multivariate time series (vitals, labs) + static features -> T tokens.

Two modes (METHODS.md, "Encoders" and "FuseMoE"):

- ``mode="mtand"`` (default): multi-time attention (Shukla & Marlin, ICLR 2021, eq. 1-3, as used
  by FuseMoE, Han et al., NeurIPS 2024): T reference times evenly spaced over the window attend,
  per variable, over that variable's observed values (see :mod:`.mtand`). Each token gets, per
  head and variable, the interpolated value, plus per variable a flag "observed in this stay".
- ``mode="grid"``: an hourly-style grid of T bins over the window; per bin and variable the mean
  of the observed values and an "observed" flag (optionally forward-filled values and an
  "ever observed so far" flag), then a small temporal convolution to D (mimic3-benchmarks style
  discretisation, Harutyunyan et al., Sci. Data 2019).

Static features (age, sex, ...) are projected and added to every token, so there are exactly T
tokens. Values are expected standardised (the data pipeline's fitted scaler); unobserved entries
and padded time points take no part, whatever they hold.
"""

from __future__ import annotations

import torch
from torch import nn

from clinical_moe.encoders.base import ModalityEncoder
from clinical_moe.encoders.mtand import MultiTimeAttention, TimeEmbedding, reference_times
from clinical_moe.registry import ENCODERS
from clinical_moe.types import ModalityInputs, ModalityTokens

MODES = ("mtand", "grid")


def grid_bins(
    values: torch.Tensor, obs: torch.Tensor, times: torch.Tensor, num_bins: int, window: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean per bin and variable over ``[0, window]`` (times outside go to the edge bins).

    Args:
        values: ``(B, L, V)``; obs: ``(B, L, V)`` bool; times: ``(B, L)`` hours.

    Returns:
        ``mean (B, T, V)`` (0 where a bin has no observation) and ``seen (B, T, V)`` bool.
    """
    idx = (times / window * num_bins).floor().clamp(0, num_bins - 1).long()  # (B, L)
    onehot = nn.functional.one_hot(idx, num_bins).to(values.dtype)  # (B, L, T)
    w = obs.to(values.dtype)  # (B, L, V)
    sums = torch.einsum("blt,blv->btv", onehot, values * w)  # (B, T, V)
    counts = torch.einsum("blt,blv->btv", onehot, w)  # (B, T, V)
    return sums / counts.clamp_min(1.0), counts > 0


def forward_fill(mean: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry each variable's last observed bin forward: ``(B, T, V)`` values and ever-seen flags."""
    T = mean.shape[1]
    pos = torch.arange(T, device=mean.device).view(1, T, 1)  # (1, T, 1)
    last = torch.where(seen, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # (B, T, V)
    filled = mean.gather(1, last.clamp_min(0)) * (last >= 0)  # (B, T, V)
    return filled, last >= 0


@ENCODERS.register("ehr")
class EHREncoder(ModalityEncoder):
    """``values/obs_mask (B, L, V)``, ``times/time_mask (B, L)``, ``static (B, S)`` -> T tokens.

    Args:
        d_model: Token width D.
        num_tokens: Output tokens T (reference times or grid bins over the window).
        num_variables: Variables V (the 17 mimic3-benchmarks variables by default).
        num_static: Static features S (0: none).
        mode: ``"mtand"`` or ``"grid"``.
        num_heads: mTAND heads.
        time_embed_dim: Size of the time embedding ``phi(t)`` (FuseMoE: 64).
        window_hours: Window covered by the reference times / bins (IHM-48h: 48).
        forward_fill: Grid mode: forward-fill values and add an "ever observed" channel.
        dropout: Dropout on the tokens (training only).
        max_len: Time points L drawn by :meth:`random_inputs`.
    """

    padding = {"values": "obs_mask", "obs_mask": "time_mask", "times": "time_mask"}

    def __init__(
        self,
        d_model: int = 32,
        num_tokens: int = 4,
        num_variables: int = 17,
        num_static: int = 8,
        mode: str = "mtand",
        num_heads: int = 2,
        time_embed_dim: int = 16,
        window_hours: float = 48.0,
        forward_fill: bool = True,
        dropout: float = 0.1,
        max_len: int = 12,
    ) -> None:
        super().__init__(d_model, num_tokens)
        if mode not in MODES:
            raise ValueError(f"unknown ehr mode {mode!r}; use one of {MODES}")
        self.mode = mode
        self.num_variables = num_variables
        self.num_static = num_static
        self.window_hours = float(window_hours)
        self.forward_fill = forward_fill
        self.max_len = max_len
        V = num_variables
        self.register_buffer(
            "ref_times", reference_times(num_tokens, window_hours), persistent=False
        )
        if mode == "mtand":
            self.mtan = MultiTimeAttention(time_embed_dim, num_heads, time_scale=window_hours)
            self.in_proj = nn.Linear(num_heads * V + V, d_model)
            self.ref_embed = TimeEmbedding(time_embed_dim, scale=window_hours)
            self.ref_proj = nn.Linear(time_embed_dim, d_model)
        else:
            channels = (3 if forward_fill else 2) * V
            self.conv = nn.Sequential(
                nn.Conv1d(channels, d_model, 3, padding=1),
                nn.GELU(),
                nn.Conv1d(d_model, d_model, 3, padding=1),
            )
            self.pos = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
        self.static_proj = nn.Linear(num_static, d_model) if num_static > 0 else None
        self.ffn = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, 2 * d_model),
            nn.GELU(),
            nn.Linear(2 * d_model, d_model),
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, inputs: ModalityInputs) -> ModalityTokens:
        values = inputs["values"]
        B, L, V = values.shape
        if self.num_variables != V:
            raise ValueError(
                f"ehr values have {V} variables, expected num_variables={self.num_variables}"
            )
        time_mask = inputs["time_mask"].bool()  # (B, L)
        obs = inputs["obs_mask"].bool() & time_mask[..., None]  # (B, L, V)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        values = torch.where(obs, values, zero)  # (B, L, V)
        times = torch.where(time_mask, inputs["times"].to(values.dtype), zero)  # (B, L)
        if self.mode == "mtand":
            interp = self.mtan(self.ref_times, times, values, obs)  # (B, T, H * V)
            ever = obs.any(1, keepdim=True).to(values.dtype)  # (B, 1, V)
            ever = ever.expand(B, self.num_tokens, V)  # (B, T, V)
            h = self.in_proj(torch.cat([interp, ever], dim=-1))  # (B, T, D)
            h = h + self.ref_proj(self.ref_embed(self.ref_times))  # (B, T, D)
        else:
            # (B, T, V) masked means per bin and "observed in the bin" flags
            mean, seen = grid_bins(values, obs, times, self.num_tokens, self.window_hours)
            feats = [mean, seen.to(values.dtype)]
            if self.forward_fill:
                filled, ever = forward_fill(mean, seen)
                feats = [filled, seen.to(values.dtype), ever.to(values.dtype)]
            x = torch.cat(feats, dim=-1).transpose(1, 2)  # (B, C, T)
            h = self.conv(x).transpose(1, 2) + self.pos  # (B, T, D)
        if self.static_proj is not None:
            h = h + self.static_proj(inputs["static"].to(values.dtype)).unsqueeze(1)  # (B, T, D)
        h = h + self.ffn(h)
        tokens = self.norm(self.dropout(h))  # (B, T, D)
        mask = torch.ones(B, self.num_tokens, dtype=torch.bool, device=values.device)
        token_times = self.ref_times.unsqueeze(0).expand(B, -1)  # (B, T)
        return ModalityTokens(tokens, mask, token_times)

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        B, L, V = batch_size, self.max_len, self.num_variables
        lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=generator)
        time_mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
        times = torch.rand(B, L, generator=generator).sort(dim=1).values * self.window_hours
        obs = (torch.rand(B, L, V, generator=generator) < 0.4) & time_mask[..., None]  # (B, L, V)
        obs[:, 0, 0] = True  # every stay has at least one observation
        values = torch.randn(B, L, V, generator=generator) * obs
        return {
            "values": values,
            "obs_mask": obs,
            "times": times * time_mask,
            "time_mask": time_mask,
            "static": torch.randn(B, self.num_static, generator=generator),
        }
