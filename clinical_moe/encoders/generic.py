"""A generic encoder for any modality that arrives as a padded sequence of feature vectors.

Used for modality names without a dedicated encoder (tests use M = 1..5 of them) and for users'
own precomputed features. Tokens are resampled to a fixed count T by learned-query attention over
the real positions only, so padding never influences the output.
"""

from __future__ import annotations

import torch
from torch import nn

from clinical_moe.encoders.base import ModalityEncoder
from clinical_moe.encoders.resample import TokenResampler
from clinical_moe.registry import ENCODERS
from clinical_moe.types import ModalityInputs, ModalityTokens


@ENCODERS.register("sequence")
class SequenceEncoder(ModalityEncoder):
    """``x (B, L, F)`` with ``mask (B, L)`` -> ``T`` tokens of width ``D``.

    Args:
        d_model: Token width D.
        num_tokens: Output tokens T.
        in_features: Feature size F of the input vectors.
        max_len: Length L drawn by :meth:`random_inputs`.
    """

    padding = {"x": "mask", "times": "mask"}

    def __init__(
        self, d_model: int = 32, num_tokens: int = 4, in_features: int = 8, max_len: int = 6
    ):
        super().__init__(d_model, num_tokens)
        self.in_features = in_features
        self.max_len = max_len
        self.proj = nn.Sequential(
            nn.Linear(in_features, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )
        self.resample = TokenResampler(d_model, num_tokens)

    def forward(self, inputs: ModalityInputs) -> ModalityTokens:
        x, mask = inputs["x"], inputs["mask"].bool()
        h = self.proj(x)  # (B, L, D)
        tokens = self.resample(h, mask)  # (B, T, D)
        return ModalityTokens(
            tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)
        )

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        L = self.max_len
        x = torch.randn(batch_size, L, self.in_features, generator=generator)
        lengths = torch.randint(1, L + 1, (batch_size,), generator=generator)
        mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
        times = torch.rand(batch_size, L, generator=generator).cumsum(1) * 8.0
        return {"x": x * mask[..., None], "mask": mask, "times": times * mask}
