"""The encoder interface: raw inputs of one modality -> :class:`ModalityTokens`.

Encoders are called by :class:`clinical_moe.model.MultimodalModel` on the rows where their modality
is present only, so an absent modality's (zero) inputs never reach them. Inside a present row, an
encoder must still ignore whatever its own masks mark as padding; the ``padding`` class attribute
declares those masks so the registry-wide tests can fill padding with noise and check that nothing
changes (ARCHITECTURE.md invariant 3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clinical_moe.types import ModalityInputs, ModalityTokens


class ModalityEncoder(nn.Module):
    """Base class of every modality encoder.

    Args:
        d_model: Width D of the output tokens.
        num_tokens: Number of tokens T per sample; built-in encoders always emit exactly T tokens so
            heads with a fixed token layout (Flex-MoE's bank) can rely on it.
    """

    #: input key -> key of the boolean mask whose False entries are padding for that input. The
    #: mask's shape is a prefix of the input's shape (e.g. values (B, L, V) with time_mask (B, L)).
    padding: dict[str, str] = {}

    def __init__(self, d_model: int, num_tokens: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_tokens = num_tokens

    def forward(self, inputs: ModalityInputs) -> ModalityTokens:  # pragma: no cover - interface
        raise NotImplementedError

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        """Valid random raw inputs for ``batch_size`` rows, with some padding (for tests/demos)."""
        raise NotImplementedError  # pragma: no cover - interface

    def freeze(self) -> ModalityEncoder:
        """Stop training this encoder (its parameters get ``requires_grad=False``; eval mode)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self._frozen = True
        return self

    def train(self, mode: bool = True) -> ModalityEncoder:
        # A frozen encoder stays in eval mode (no dropout / batch-norm updates) when the model trains.
        return super().train(mode and not getattr(self, "_frozen", False))

    def load_pretrained(self, path: str | Path, strict: bool = False) -> ModalityEncoder:
        """Load weights from a user's local file (a state dict); never from the network.

        Args:
            path: A ``.pt`` / ``.pth`` file holding a state dict (optionally under ``"state_dict"``
                or ``"model"``).
            strict: Passed to ``load_state_dict``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
        missing, unexpected = self.load_state_dict(state, strict=strict)
        if not strict and len(missing) == len(self.state_dict()):
            raise ValueError(f"{path}: no parameter name matches {type(self).__name__}")
        return self
