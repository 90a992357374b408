"""The modality game of one batch: a coalition of modalities -> the model's target log-odds.

Modality Shapley values and modality ablation treat each modality as one player of a cooperative
game (Shapley 1953; for model explanation, Lundberg & Lee 2017, "A unified approach to
interpreting model predictions"). The value of a coalition ``S`` for stay ``b`` is::

    v_b(S) = log-odds of the target when the model sees only the modalities in S ∩ present_b
    v_b({}) = log-odds of the training prevalence (the model cannot run without any modality)

"Not seeing" a modality uses the head's *own* missing-modality path: it is exactly
``model(batch.with_present(S ∩ present))``, so a removed modality is treated like a truly missing
one (a learned missing embedding, a Flex-MoE bank entry, ConfSMoE's imputation, I2MoE's
renormalised weights, ...), never like a zero-filled input the model was not trained on.

Efficiency: encoders run each present row independently (ARCHITECTURE.md invariant 2), so their
outputs are computed once per batch and only the fusion head is re-run per coalition, on the rows
that hold that coalition: one head forward per coalition per batch, never one per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from clinical_moe.attribution.target import Target
from clinical_moe.model import MultimodalModel
from clinical_moe.types import Batch, ModalityTokens


def restrict_tokens(
    tokens: Mapping[str, ModalityTokens],
    modalities: tuple[str, ...],
    rows: torch.Tensor | None,
    present: torch.Tensor,
) -> dict[str, ModalityTokens]:
    """Encoder outputs of ``rows`` as :meth:`MultimodalModel.encode` gives them under ``present``.

    Args:
        tokens: Encoder outputs of the whole batch (natural presence).
        modalities: Modality order (columns of ``present``).
        rows: ``LongTensor[N]`` rows of the batch to take (repeats allowed), or None for all.
        present: ``BoolTensor[N, M]``, a subset of the rows' natural presence.

    Returns:
        Tokens whose removed modalities are zero with an all-False mask, like ``encode`` makes them.
    """
    out = {}
    for i, name in enumerate(modalities):
        t = tokens[name]
        tok, mask, times = t.tokens, t.mask, t.times
        if rows is not None:
            tok, mask = tok.index_select(0, rows), mask.index_select(0, rows)
            times = None if times is None else times.index_select(0, rows)
        keep = present[:, i]  # (N,)
        tok = torch.where(keep[:, None, None], tok, torch.zeros((), dtype=tok.dtype))  # (N, T, D)
        mask = mask & keep[:, None]  # (N, T)
        if times is not None:
            times = torch.where(keep[:, None], times, torch.zeros((), dtype=times.dtype))
        out[name] = ModalityTokens(tok, mask, times)
    return out


def by_modality(values: torch.Tensor, modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``(B, M)`` per-modality values -> ``{modality: Tensor[B]}`` (ARCHITECTURE.md contract)."""
    if values.dim() != 2 or values.shape[1] != len(modalities):
        raise ValueError(f"values must be (B, {len(modalities)}), got {tuple(values.shape)}")
    return {m: values[:, i] for i, m in enumerate(modalities)}


def coalition_bits(num_modalities: int) -> torch.Tensor:
    """``LongTensor[M]`` of powers of two: coalition code = ``(present * bits).sum(-1)``."""
    return 2 ** torch.arange(num_modalities)


def coalition_code(bits: tuple) -> int:
    """``(b_0, b_1, ...)`` (1 = modality m in the coalition) -> its code ``sum b_m 2^m``."""
    return sum(int(b) << i for i, b in enumerate(bits))


def coalition_name(code: int, modalities: tuple[str, ...]) -> str:
    """The coalition with ``code`` (bit m = modality m) as ``"ehr+ecg"`` (modality order)."""
    return "+".join(m for i, m in enumerate(modalities) if code >> i & 1) or "none"


class PresenceGame:
    """The modality game of one batch (see the module docstring).

    Args:
        model: A model in eval mode.
        batch: The stays (natural presence in ``batch.present``).
        target: What is attributed, including ``v(empty)``.
        tokens: The batch's encoder outputs, if already computed (saves one encoder pass).
    """

    def __init__(
        self,
        model: MultimodalModel,
        batch: Batch,
        target: Target,
        tokens: dict[str, ModalityTokens] | None = None,
    ) -> None:
        if model.training:
            raise ValueError("attribution needs the model in eval mode (call model.eval())")
        self.model, self.head, self.target = model, model.head, target
        self.modalities = tuple(model.modalities)
        self.natural = batch.present.cpu()  # (B, M)
        self.batch_size, self.num_modalities = self.natural.shape
        if tokens is None:
            with torch.no_grad():
                tokens = model.encode(batch)
        self.tokens = {
            m: ModalityTokens(t.tokens.detach(), t.mask, t.times) for m, t in tokens.items()
        }
        self.device = next(iter(self.tokens.values())).tokens.device
        self.bits = coalition_bits(self.num_modalities)  # (M,)
        self.natural_code = (self.natural.long() * self.bits).sum(1)  # (B,)

    # ---------------------------------------------------------------------------- values
    @torch.no_grad()
    def values(self, present: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``v`` of rows ``rows`` (``LongTensor[N]``) seeing ``present`` (``BoolTensor[N, M]``).

        ``present`` is intersected with the rows' natural presence; rows left with no modality
        get ``v(empty)``.
        """
        present = present.bool() & self.natural.index_select(0, rows)  # (N, M)
        out = torch.full((rows.numel(),), self.target.base_log_odds, dtype=torch.float32)
        some = present.any(1)  # (N,)
        if bool(some.any()):
            sel = some.nonzero().flatten()
            p = present.index_select(0, sel)
            r, p = rows.index_select(0, sel).to(self.device), p.to(self.device)
            logits = self.head(restrict_tokens(self.tokens, self.modalities, r, p), p).logits
            out[sel] = self.target.log_odds(logits.float()).cpu()  # (N',)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A captum forward function: presence ``(n * B, M)`` (1 = in the coalition) -> ``v``.

        Row ``r`` is stay ``r % B`` (captum stacks perturbations along the batch dimension).
        """
        rows = torch.arange(x.shape[0]) % self.batch_size
        return self.values(x.detach().cpu() > 0.5, rows)

    def coalition_table(self) -> torch.Tensor:
        """``(B, 2^M)`` values of every coalition; column ``c`` is the coalition with code ``c``.

        One head forward per non-empty coalition, over the rows that have all of its modalities.
        Column 0 is ``v(empty)``; coalitions a stay cannot form (it lacks one of the modalities)
        are NaN and are never read (their value equals that of the coalition's present part).
        """
        B, M = self.batch_size, self.num_modalities
        table = torch.full((B, 2**M), float("nan"))
        table[:, 0] = self.target.base_log_odds
        for code in range(1, 2**M):
            rows = ((self.natural_code & code) == code).nonzero().flatten()  # (N,)
            if rows.numel() == 0:
                continue
            present = ((code & self.bits) > 0).expand(rows.numel(), M)  # (N, M)
            table[rows, code] = self.values(present, rows)
        return table

    def lookup(self, table: torch.Tensor, transform: Callable | None = None) -> Callable:
        """A captum forward function that reads coalition values from ``table`` (no model call).

        Args:
            table: From :meth:`coalition_table`.
            transform: Optional map applied to the values (e.g. ``torch.sigmoid`` for risk).
        """

        def forward(x: torch.Tensor) -> torch.Tensor:
            present = x.detach().cpu() > 0.5  # (n * B, M)
            rows = torch.arange(x.shape[0]) % self.batch_size
            codes = ((present & self.natural.index_select(0, rows)).long() * self.bits).sum(1)
            v = table[rows, codes]  # (n * B,)
            if bool(torch.isnan(v).any()):
                raise RuntimeError("coalition table has no value for a coalition a stay can form")
            return v if transform is None else transform(v)

        return forward

    def full_values(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` ``v(natural presence)``, the model's log-odds on the stays as they are."""
        if table is not None:
            return table[torch.arange(self.batch_size), self.natural_code]
        return self.values(self.natural, torch.arange(self.batch_size))
