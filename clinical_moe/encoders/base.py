"""The encoder interface: raw inputs of one modality -> :class:`ModalityTokens`.

Encoders are called by :class:`clinical_moe.model.MultimodalModel` on the rows where their modality
is present only, so an absent modality's (zero) inputs never reach them. Inside a present row, an
encoder must still ignore whatever its own masks mark as padding; the ``padding`` class attribute
declares those masks so the registry-wide tests can fill padding with noise and check that nothing
changes (ARCHITECTURE.md invariant 3).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from clinical_moe.types import ModalityInputs, ModalityTokens

log = logging.getLogger(__name__)

#: Accepted values of ``freeze`` -> the part frozen (None = nothing).
FREEZE_MODES: dict = {True: "all", False: None, None: None, "all": "all", "backbone": "backbone"}
#: State-dict prefix of the optional per-event target head (see :mod:`.events`).
TARGET_HEAD = "target_head."


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
    #: State-dict prefixes of the feature extractor: what ``freeze("backbone")`` freezes and what
    #: a pretrained file must match exactly.
    backbone_prefixes: tuple[str, ...] = ("backbone.",)
    #: Size K of the per-event target logits (0: no target head; see :mod:`.events`).
    num_targets: int = 0

    def __init__(self, d_model: int, num_tokens: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_tokens = num_tokens

    def forward(self, inputs: ModalityInputs) -> ModalityTokens:  # pragma: no cover - interface
        raise NotImplementedError

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        """Valid random raw inputs for ``batch_size`` rows, with some padding (for tests/demos)."""
        raise NotImplementedError  # pragma: no cover - interface

    def freeze(self, part: bool | str = True) -> ModalityEncoder:
        """Stop training this encoder, or only its backbone.

        Args:
            part: ``True`` / ``"all"``: every parameter gets ``requires_grad=False`` and the encoder
                stays in eval mode; ``"backbone"``: only the parameters under
                :attr:`backbone_prefixes` (the feature extractor) are frozen and kept in eval
                mode, while the token projection stays trainable (so heads with another
                ``d_model`` / ``num_tokens`` can reuse one pretrained backbone); ``False``: no-op.
        """
        part = FREEZE_MODES.get(part, part)
        if part is None:
            return self
        if part not in ("all", "backbone"):
            raise ValueError(f"freeze must be true, false, 'all' or 'backbone'; got {part!r}")
        if part == "backbone" and not any(self.is_backbone(n) for n, _ in self.named_parameters()):
            raise ValueError(
                f"{type(self).__name__} has no separate backbone to freeze; use freeze: true"
            )
        for name, p in self.named_parameters():
            if part == "all" or self.is_backbone(name):
                p.requires_grad_(False)
        self._frozen = part
        return self.train(self.training)

    def is_backbone(self, name: str) -> bool:
        """Whether the parameter / buffer ``name`` belongs to the backbone (feature extractor)."""
        return any(name.startswith(prefix) for prefix in self.backbone_prefixes)

    def train(self, mode: bool = True) -> ModalityEncoder:
        # A frozen encoder (or frozen backbone) stays in eval mode (no dropout / batch-norm updates)
        # when the model trains.
        frozen = getattr(self, "_frozen", None)
        super().train(mode and frozen != "all")
        if mode and frozen == "backbone":
            for name, module in self.named_modules():
                if name and self.is_backbone(name + "."):
                    module.eval()
        return self

    def load_pretrained(
        self, path: str | Path, strict: bool = False, require: str = "backbone"
    ) -> ModalityEncoder:
        """Load weights from a user's local file (a state dict); never from the network.

        The backbone must match the file exactly (every backbone tensor present, same shape), or
        this raises naming the file. Other tensors (token projection, per-event target head) are
        loaded where their shapes match; those that do not are skipped with a logged note, so a
        backbone pretrained at one ``d_model`` / ``num_tokens`` serves heads of any width.

        Args:
            path: A ``.pt`` / ``.pth`` file holding a state dict (optionally under ``"state_dict"``
                or ``"model"``), e.g. written by ``clinical-moe pretrain``.
            strict: Every tensor of the encoder, target head excepted, must match the file.
            require: ``"backbone"`` (default) or ``"all"`` (same as ``strict``; used with
                ``freeze: true``, where a skipped projection would stay random and frozen).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
        if hasattr(self, "adapt_pool"):  # event encoders: weights pretrained with other pooling
            self.adapt_pool(state)
        own = self.state_dict()
        if not any(k in own for k in state):
            raise ValueError(f"{path}: no parameter name matches {type(self).__name__}")
        strict = strict or require == "all"
        problems, skipped = [], []
        for key, ref in own.items():
            theirs = state.get(key)
            bad = theirs is None or tuple(theirs.shape) != tuple(ref.shape)
            if not bad:
                continue
            what = "missing" if theirs is None else f"{tuple(theirs.shape)} vs {tuple(ref.shape)}"
            needed = self.is_backbone(key) or (strict and not key.startswith(TARGET_HEAD))
            (problems if needed else skipped).append(f"{key} ({what})")
        extra = [k for k in state if k not in own and self.is_backbone(k)]
        problems += [f"{k} (not in this encoder)" for k in extra]
        if problems:
            raise ValueError(
                f"{path}: its weights do not match this {type(self).__name__} "
                f"({'all tensors' if strict else 'backbone'} must match; check the encoder "
                f"options it was pretrained with): {', '.join(problems[:4])}"
                + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            )
        if skipped:
            log.info(
                "%s: %d tensor(s) not loaded into %s (shape differs or absent; they keep their "
                "initial values and train): %s",
                path,
                len(skipped),
                type(self).__name__,
                ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""),
            )
        keep = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        self.load_state_dict(keep, strict=False)
        return self
