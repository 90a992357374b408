"""The fusion-head interface and small helpers every head shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clinical_moe.types import FusionOutput, ModalityTokens


class FusionHead(nn.Module):
    """Base class: per-modality tokens + presence mask -> :class:`FusionOutput`.

    Args:
        modalities: Modality names, in the order of the columns of ``present``.
        d_model: Token width D (all encoders emit this width).
        num_classes: Output logits C (1 for a binary task).
        num_tokens: Tokens per modality as emitted by the encoders (heads with a fixed token layout,
            such as Flex-MoE's bank, use it); None when unknown.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        d_model: int,
        num_classes: int,
        num_tokens: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.d_model = d_model
        self.num_classes = num_classes
        self.num_tokens = dict(num_tokens or {})

    def forward(
        self,
        tokens: dict[str, ModalityTokens],
        present: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> FusionOutput:  # pragma: no cover - interface
        """Fuse.

        Args:
            tokens: One :class:`ModalityTokens` per modality; rows of absent modalities have an
                all-False mask and must not influence the output.
            present: ``BoolTensor[B, M]``.
            labels: Only passed in training, for heads whose auxiliary losses need them (ConfSMoE);
                evaluation never receives labels.
        """
        raise NotImplementedError


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, T, D)`` over positions where ``mask (B, T)`` is True; zeros for empty rows."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)


def zero_loss(ref: torch.Tensor) -> torch.Tensor:
    """A scalar zero on ``ref``'s device and dtype (for heads with no auxiliary loss)."""
    return torch.zeros((), dtype=ref.dtype, device=ref.device)
