"""A model = one encoder per modality + one fusion head; built by name from the registry."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from clinical_moe.encoders.base import FREEZE_MODES, ModalityEncoder
from clinical_moe.fusion.base import FusionHead
from clinical_moe.registry import ENCODERS, HEADS, closest
from clinical_moe.types import DEFAULT_MODALITIES, Batch, FusionOutput, ModalityTokens


def check_nonempty(batch: Batch) -> None:
    """Reject samples with no modality at all, naming the first such stay (invariant 5)."""
    empty = ~batch.present.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        ids = [batch.ids[r] for r in rows[:5]]
        raise ValueError(
            f"{len(rows)} sample(s) have no modality at all (stay ids {ids}); every sample needs "
            "at least one observed modality"
        )


class MultimodalModel(nn.Module):
    """Encoders (injected) + fusion head (injected): ``model(batch) -> FusionOutput``.

    Args:
        encoders: One encoder per modality name.
        head: The fusion head; its ``modalities`` must match the encoders' keys, in order.
    """

    def __init__(self, encoders: Mapping[str, ModalityEncoder], head: FusionHead) -> None:
        super().__init__()
        if tuple(encoders) != tuple(head.modalities):
            raise ValueError(
                f"encoders {tuple(encoders)} and head modalities {head.modalities} differ"
            )
        self.modalities: tuple[str, ...] = tuple(head.modalities)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.head = head

    def encode(self, batch: Batch) -> dict[str, ModalityTokens]:
        """Run each encoder on the rows where its modality is present; zero tokens elsewhere."""
        if tuple(batch.modalities) != self.modalities:
            raise ValueError(f"batch modalities {batch.modalities} != model's {self.modalities}")
        B = batch.batch_size
        out: dict[str, ModalityTokens] = {}
        for m, name in enumerate(self.modalities):
            enc = self.encoders[name]
            rows = batch.present[:, m].nonzero().flatten()  # (B_m,)
            if rows.numel() == 0:
                T = enc.num_tokens
                ref = batch.present
                out[name] = ModalityTokens(
                    torch.zeros(B, T, enc.d_model, device=ref.device),
                    torch.zeros(B, T, dtype=torch.bool, device=ref.device),
                )
                continue
            sub = {k: v.index_select(0, rows) for k, v in batch.inputs[name].items()}
            toks = enc(sub)  # tokens (B_m, T, D)
            T, D = toks.tokens.shape[1:]
            tokens = toks.tokens.new_zeros(B, T, D).index_copy(0, rows, toks.tokens)  # (B, T, D)
            mask = toks.mask.new_zeros(B, T).index_copy(0, rows, toks.mask)  # (B, T)
            times = event_logits = None
            if toks.times is not None:
                times = toks.times.new_zeros(B, T).index_copy(0, rows, toks.times)
            if toks.event_logits is not None:
                ev = toks.event_logits  # (B_m, N, K)
                event_logits = ev.new_zeros(B, *ev.shape[1:]).index_copy(0, rows, ev)  # (B, N, K)
            out[name] = ModalityTokens(tokens, mask, times, event_logits)
        return out

    def forward(
        self, batch: Batch, return_tokens: bool = False, head_present: Tensor | None = None
    ) -> FusionOutput | tuple[FusionOutput, dict[str, ModalityTokens]]:
        """Encode the present modalities and fuse them.

        Args:
            batch: The mini-batch.
            return_tokens: Also return the encoders' :class:`ModalityTokens` (with their per-event
                target logits), for training losses on the encoders (through DDP's forward).
            head_present: Optional ``BoolTensor[B, M]``, a subset of ``batch.present``: what the
                fusion head is shown (train-time modality dropout). Encoders still run on every
                present modality, so their own losses keep all the data, while the head sees the
                hidden modalities exactly as truly absent ones (zero tokens, all-False mask).
        """
        check_nonempty(batch)
        tokens = self.encode(batch)
        present = batch.present
        if head_present is not None:
            if bool((head_present & ~present).any()):
                raise ValueError("head_present must be a subset of batch.present")
            check_nonempty(replace(batch, present=head_present))
            tokens_head = {}
            for m, name in enumerate(self.modalities):
                keep = head_present[:, m]  # (B,)
                t = tokens[name]
                tokens_head[name] = replace(
                    t,
                    tokens=t.tokens * keep[:, None, None].to(t.tokens.dtype),  # (B, T, D)
                    mask=t.mask & keep[:, None],  # (B, T)
                )
            present = head_present
        else:
            tokens_head = tokens
        labels = batch.labels if self.training else None  # evaluation never sees labels
        out = self.head(tokens_head, present, labels=labels)
        return (out, tokens) if return_tokens else out


def list_models() -> list[str]:
    """Names of every registered fusion head (heads and baselines)."""
    _import_builtins()
    return HEADS.names()


def default_encoder_type(modality: str) -> str:
    """The encoder used for ``modality`` unless configured: its own name if registered, else generic."""
    _import_builtins()
    return modality if modality in ENCODERS else "sequence"


def _check_kwargs(fn, kwargs: Mapping[str, Any], what: str) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            raise TypeError(f"unknown {what} option {key!r}{closest(key, params)}")


def build_encoders(
    modalities: Sequence[str],
    d_model: int,
    num_tokens: int,
    encoders: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, ModalityEncoder]:
    """One encoder per modality from ``{modality: {"type": ..., **kwargs}}`` (missing -> defaults).

    Besides the encoder's own options, a modality's spec may hold ``pretrained: PATH`` (a state dict,
    e.g. from ``clinical-moe pretrain``) and ``freeze``: ``true`` (the whole encoder; the file must
    then match every tensor), ``"backbone"`` (the feature extractor only; the token projection
    trains and may differ in shape from the file's, e.g. another ``d_model``) or ``false``.
    """
    _import_builtins()
    encoders = dict(encoders or {})
    unknown = set(encoders) - set(modalities)
    if unknown:
        key = sorted(unknown)[0]
        raise ValueError(f"encoder config for unknown modality {key!r}{closest(key, modalities)}")
    built: dict[str, ModalityEncoder] = {}
    for name in modalities:
        spec = dict(encoders.get(name) or {})
        kind = spec.pop("type", None) or default_encoder_type(name)
        pretrained = spec.pop("pretrained", None)
        freeze = spec.pop("freeze", False)
        if not isinstance(freeze, (bool, str, type(None))) or freeze not in FREEZE_MODES:
            raise ValueError(
                f"encoders.{name}.freeze: {freeze!r} is not one of true, false, 'backbone'"
            )
        freeze = FREEZE_MODES[freeze]
        spec.setdefault("num_tokens", num_tokens)
        cls = ENCODERS.get(kind)
        _check_kwargs(cls, spec, f"encoder {kind!r}")
        enc = cls(d_model=d_model, **spec)
        if pretrained:
            # Frozen whole: everything but the target head must match (a skipped projection would
            # stay random and frozen). Otherwise the backbone must match and the rest may differ.
            enc.load_pretrained(pretrained, require="all" if freeze == "all" else "backbone")
        if freeze:
            enc.freeze(freeze)
        built[name] = enc
    return built


def create_model(
    name: str,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    num_classes: int = 1,
    d_model: int = 32,
    num_tokens: int = 4,
    encoders: Mapping[str, Mapping[str, Any]] | None = None,
    **head_kwargs: Any,
) -> MultimodalModel:
    """Build encoders + the fusion head registered as ``name``.

    Args:
        name: A name from :func:`list_models`.
        modalities: Modality names (any non-empty subset / order; unknown names use the generic
            sequence encoder).
        num_classes: Logits per sample (1 for binary tasks).
        d_model: Shared token width.
        num_tokens: Tokens per modality emitted by each encoder (overridable per encoder).
        encoders: Per-modality encoder options, e.g. ``{"cxr": {"type": "cxr", "freeze": True}}``.
        **head_kwargs: Options of the head (see the head's docstring); unknown keys are errors.
    """
    modalities = tuple(modalities)
    if not modalities:
        raise ValueError("create_model needs at least one modality")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"duplicate modality names in {modalities}")
    _import_builtins()
    head_cls = HEADS.get(name)
    _check_kwargs(head_cls, head_kwargs, f"{name!r} head")
    encs = build_encoders(modalities, d_model, num_tokens, encoders)
    head = head_cls(
        modalities=modalities,
        d_model=d_model,
        num_classes=num_classes,
        num_tokens={m: e.num_tokens for m, e in encs.items()},
        **head_kwargs,
    )
    return MultimodalModel(encs, head)


def _import_builtins() -> None:
    """Import the modules whose decorators register the built-in encoders and heads."""
    import clinical_moe.encoders  # noqa: F401
    import clinical_moe.fusion  # noqa: F401
