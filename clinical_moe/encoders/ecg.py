"""12-lead ECG encoder: N recordings per stay -> exactly T tokens.

A small 1D residual CNN in the style of the ResNets used for ECG classification (He et al., CVPR
2016, adapted to 1D as in Ribeiro et al., Nat. Commun. 2020): a strided stem, then stages of
residual blocks whose first convolution halves the time axis. Normalisation is GroupNorm, so a
recording's features never depend on other recordings. Tokens are either T segments along time
(``token_mode="time"``; adaptive average pooling of the feature sequence, averaged over the stay's
recordings with their time embedding) or one embedding per recording followed by FuseMoE's
multi-time attention over recording times (``token_mode="event"``; see :mod:`.events`). Any signal
length S works (MIMIC-IV-ECG: 5000 samples = 10 s at 500 Hz).
"""

from __future__ import annotations

import torch
from torch import nn

from clinical_moe.encoders.events import EventMapEncoder, random_events
from clinical_moe.registry import ENCODERS
from clinical_moe.types import ModalityInputs


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(4 if channels % 4 == 0 else 1, channels)


class ResidualBlock1d(nn.Module):
    """``conv(stride) -> GN -> GELU -> conv -> GN`` plus a (projected) skip, then GELU.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first convolution (2 halves the time axis).
        kernel_size: Odd kernel size of both convolutions.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel_size: int = 7) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=pad, bias=False),
            _norm(c_out),
            nn.GELU(),
            nn.Conv1d(c_out, c_out, kernel_size, padding=pad, bias=False),
            _norm(c_out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))
        )
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))  # (n, C_out, S')


class ResNet1d(nn.Module):
    """Stem (stride 2) + one stage per width, each ``blocks`` residual blocks, the first strided.

    Args:
        in_channels: Leads.
        channels: Widths of the stages; the stem uses the first.
        blocks: Residual blocks per stage.
        kernel_size: Kernel size of the residual blocks (the stem uses ``2 * kernel_size + 1``).
    """

    def __init__(
        self,
        in_channels: int = 12,
        channels: tuple[int, ...] = (16, 32, 32),
        blocks: int = 1,
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        k = 2 * kernel_size + 1
        layers: list[nn.Module] = [
            nn.Conv1d(in_channels, channels[0], k, stride=2, padding=k // 2, bias=False),
            _norm(channels[0]),
            nn.GELU(),
        ]
        c_prev = channels[0]
        for c in channels:
            for b in range(blocks):
                layers.append(
                    ResidualBlock1d(c_prev, c, stride=2 if b == 0 else 1, kernel_size=kernel_size)
                )
                c_prev = c
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (n, C, S / 2^(1 + stages))


@ENCODERS.register("ecg")
class ECGEncoder(EventMapEncoder):
    """``signal (B, N, 12, S)`` in mV + ``times``, ``event_mask`` -> T tokens.

    Args:
        d_model: Token width D.
        num_tokens: Output tokens T.
        token_mode: ``"time"`` (T segments along the recording) or ``"event"`` (mTAND over events).
        channels: Widths of the CNN stages (each halves the time axis after a stride-2 stem).
        blocks: Residual blocks per stage.
        kernel_size: Kernel size of the residual blocks.
        leads: Leads per recording.
        window_hours: Window of the event reference times / time embeddings.
        num_heads: mTAND heads (event mode).
        time_embed_dim: Size of the time embeddings.
        signal_length: S drawn by :meth:`random_inputs`.
        num_events: Events N drawn by :meth:`random_inputs`.
        num_targets: K per-event target logits from the pooled backbone feature
            (``ModalityTokens.event_logits``; 0: no target head).
    """

    input_key = "signal"
    cell_modes = ("time",)
    padding = {"signal": "event_mask", "times": "event_mask"}

    def __init__(
        self,
        d_model: int = 32,
        num_tokens: int = 4,
        token_mode: str = "time",
        channels: tuple[int, ...] = (16, 32, 32),
        blocks: int = 1,
        kernel_size: int = 7,
        leads: int = 12,
        window_hours: float = 48.0,
        num_heads: int = 1,
        time_embed_dim: int = 16,
        signal_length: int = 500,
        num_events: int = 2,
        num_targets: int = 0,
    ) -> None:
        channels = tuple(channels)
        super().__init__(
            d_model,
            num_tokens,
            channels[-1],
            token_mode,
            window_hours,
            num_heads,
            time_embed_dim,
            num_targets=num_targets,
        )
        self.leads = leads
        self.signal_length = signal_length
        self.num_events = num_events
        self.backbone = ResNet1d(leads, channels, blocks, kernel_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Real recordings ``(n, leads, S)`` -> ``(n, C, S')``."""
        if x.dim() != 3 or x.shape[1] != self.leads:
            raise ValueError(
                f"ecg signals must be (B, N, {self.leads}, S); got events of shape {tuple(x.shape)}"
            )
        return self.backbone(x)

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        event_mask, times = random_events(batch_size, self.num_events, self.window_hours, generator)
        sig = torch.randn(
            batch_size, self.num_events, self.leads, self.signal_length, generator=generator
        )
        sig = sig.cumsum(-1) * 0.05  # smooth-ish, mV scale
        return {
            "signal": sig * event_mask[:, :, None, None],
            "times": times,
            "event_mask": event_mask,
        }
