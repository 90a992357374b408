"""The three data contracts every part of the package speaks: read this file first.

Flow (ARCHITECTURE.md): a collate function builds a :class:`Batch`; each modality encoder turns its
raw inputs into :class:`ModalityTokens`; a fusion head turns the tokens of all modalities into a
:class:`FusionOutput`. A missing modality is data, not an exception: its inputs are zero-filled and
its ``present`` entry is False.

Raw input schema per modality (what collate produces and encoders consume). Every tensor's first
dimension is the batch; ``N`` is the number of events (images / ECGs / notes) kept per stay:

- ``ehr``:   ``values`` float (B, L, V); ``obs_mask`` bool (B, L, V) True = observed;
  ``times`` float (B, L) hours since ICU admission; ``time_mask`` bool (B, L) True = real time
  point (False = padding); ``static`` float (B, S).
- ``cxr``:   ``image`` float (B, N, 1, H, W) in [0, 1], bright = dense; or ``embedding`` float
  (B, N, F) for precomputed features; ``times`` float (B, N); ``event_mask`` bool (B, N).
- ``ecg``:   ``signal`` float (B, N, 12, S) in mV, canonical lead order; ``times``; ``event_mask``.
- ``notes``: ``input_ids`` long (B, N, L); ``attention_mask`` bool (B, N, L); ``times``;
  ``event_mask``.
- any other name (generic): ``x`` float (B, L, F); ``mask`` bool (B, L); optional ``times``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

#: Default modality order; configs may choose any non-empty subset or add their own names.
DEFAULT_MODALITIES: tuple[str, ...] = ("ehr", "cxr", "ecg", "notes")

# One modality's raw inputs: a dict of named tensors whose first dimension is the batch, e.g.
# {"values": (B, L, V), "times": (B, L), "obs_mask": (B, L, V), "static": (B, S)} for the EHR.
ModalityInputs = dict[str, torch.Tensor]


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nested dict / list / tuple, leaving other leaves alone."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class Batch:
    """A padded mini-batch of stays, modality by modality.

    Attributes:
        inputs: Raw per-modality inputs keyed by modality name. Every tensor's first dimension is
            the batch. Rows of an absent modality are zero / padding and must never influence the
            output (invariant 3).
        present: ``BoolTensor[B, M]``; True where modality ``modalities[m]`` is observed.
        labels: ``Tensor[B]`` (binary: float 0/1; multi-class: long class ids) or ``Tensor[B, C]``
            (multilabel), or None at inference.
        ids: Stay ids, one per row, so predictions can be traced back to a stay.
        modalities: Names of the columns of ``present``, in order.
    """

    inputs: dict[str, ModalityInputs]
    present: torch.Tensor
    labels: torch.Tensor | None = None
    ids: list[int] = field(default_factory=list)
    modalities: tuple[str, ...] = DEFAULT_MODALITIES

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.present.dim() != 2 or self.present.shape[1] != len(self.modalities):
            raise ValueError(
                f"Batch.present must be [B, M={len(self.modalities)}] for modalities "
                f"{self.modalities}; got shape {tuple(self.present.shape)}"
            )
        if self.present.dtype != torch.bool:
            self.present = self.present.bool()
        if not self.ids:
            self.ids = list(range(self.present.shape[0]))
        if len(self.ids) != self.present.shape[0]:
            raise ValueError(f"Batch has {self.present.shape[0]} rows but {len(self.ids)} ids")

    def __len__(self) -> int:
        return self.present.shape[0]

    @property
    def batch_size(self) -> int:
        return self.present.shape[0]

    def index(self, modality: str) -> int:
        """Column of ``present`` that holds ``modality``."""
        try:
            return self.modalities.index(modality)
        except ValueError:
            raise KeyError(
                f"modality {modality!r} not in batch modalities {self.modalities}"
            ) from None

    def present_of(self, modality: str) -> torch.Tensor:
        """``BoolTensor[B]``: which rows observe ``modality``."""
        return self.present[:, self.index(modality)]

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device`` (non-blocking where possible)."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return replace(
            self,
            inputs=_map_tensors(self.inputs, move),
            present=move(self.present),
            labels=None if self.labels is None else move(self.labels),
        )

    def select(self, rows: torch.Tensor | Sequence[int]) -> Batch:
        """A new batch holding only ``rows`` (a LongTensor of indices or a BoolTensor[B])."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        take = lambda t: t.index_select(0, rows.to(t.device))  # noqa: E731
        return replace(
            self,
            inputs=_map_tensors(self.inputs, take),
            present=take(self.present),
            labels=None if self.labels is None else take(self.labels),
            ids=[self.ids[i] for i in rows.tolist()],
        )

    def with_present(self, present: torch.Tensor) -> Batch:
        """Same inputs with a new presence mask (used to simulate missingness).

        A modality can only be removed, never added: rows where the new mask is True but the
        modality was never observed raise, because there is no data to reveal.
        """
        present = present.to(self.present.device).bool()
        if present.shape != self.present.shape:
            raise ValueError(
                f"present must be {tuple(self.present.shape)}, got {tuple(present.shape)}"
            )
        added = present & ~self.present
        if bool(added.any()):
            r, m = added.nonzero()[0].tolist()
            raise ValueError(
                f"with_present would reveal modality {self.modalities[m]!r} for stay {self.ids[r]}, "
                "which was never observed"
            )
        return replace(self, present=present)


@dataclass
class ModalityTokens:
    """One modality's encoded tokens.

    Attributes:
        tokens: ``FloatTensor[B, T_m, D]``.
        mask: ``BoolTensor[B, T_m]``; True = real token. A whole row is False when the modality is
            absent for that sample.
        times: Optional ``FloatTensor[B, T_m]`` of token times in hours since ICU admission (used
            by event-token heads such as FuseMoE's mTAND).
        event_logits: Optional ``FloatTensor[B, N, K]``: the encoder's logits of K modality-native
            targets per event slot (e.g. CheXpert findings per image), for auxiliary training
            losses only; heads never read them. Zero at padded slots and absent rows.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    times: torch.Tensor | None = None
    event_logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, T, D], got {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"mask must be [B, T]={tuple(self.tokens.shape[:2])}, got {tuple(self.mask.shape)}"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()
        if self.event_logits is not None and (
            self.event_logits.dim() != 3 or self.event_logits.shape[0] != self.tokens.shape[0]
        ):
            raise ValueError(
                f"event_logits must be [B={self.tokens.shape[0]}, N, K], "
                f"got {tuple(self.event_logits.shape)}"
            )

    @property
    def present(self) -> torch.Tensor:
        """``BoolTensor[B]``: rows with at least one real token."""
        return self.mask.any(dim=1)


@dataclass
class FusionOutput:
    """What every fusion head returns.

    Attributes:
        logits: ``FloatTensor[B, C]``.
        aux_loss: Scalar tensor, already weighted; zero where the head has none. When non-zero it is
            part of the autograd graph so it reaches backward.
        gates: Routing tensors for analysis, e.g. ``"layer0/router_probs": [B, T, E]`` or I2MoE's
            ``"interaction_weights": [B, M + 2]``. Detached; never used for the loss.
        extras: Raw (unweighted, detached) loss parts and statistics for logging.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


_ELSEWHERE = {  # the registry and the config loader live in their own modules (no import cycle)
    "create_model": "clinical_moe.model",
    "list_models": "clinical_moe.model",
    "load_config": "clinical_moe.config",
    "Config": "clinical_moe.config",
    "ConfigError": "clinical_moe.config",
}


def __getattr__(name: str):
    """``from clinical_moe.types import create_model, list_models, load_config`` also works."""
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
