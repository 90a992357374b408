"""Integrated Gradients over the encoders' output tokens, summed per modality.

Integrated Gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks"):
for an input ``x`` and a baseline ``x'``::

    IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x')) / dx_i da

Completeness: ``sum_i IG_i = F(x) - F(x')``. Here ``F`` is the fusion head followed by the target's
log-odds (:mod:`.target`), ``x`` is every token embedding the encoders emitted (the tokens the head
fuses; per modality ``(B, T_m, D)``) and a modality's attribution is the sum of IG over its tokens
and embedding dimensions.

Baseline: **zero token embeddings with the token masks kept**, i.e. "the modality is present but
its tokens carry no information". Zero is a neutral point every head accepts (the heads' own
missing embeddings differ from head to head, and Flex-MoE's bank even depends on the missingness
pattern), so IG numbers mean the same thing for every head. It is not the missing-modality path:
that is what the modality Shapley values measure. Absent modalities have zero tokens and a zero
baseline, so their IG is exactly 0.

Implementation: captum's :class:`~captum.attr.IntegratedGradients` with the per-modality token
tensors as its inputs and the masks as additional forward arguments. Interpolating the encoder
outputs this way is what ``LayerIntegratedGradients`` on the encoders' outputs computes, without
re-running the encoders at every interpolation step (and the encoders return
:class:`ModalityTokens`, which captum's layer hooks cannot interpolate). Heads with hard top-k
routing are piecewise smooth: where the path crosses a routing switch the Riemann / Gauss-Legendre
sum can miss the jump, so completeness holds only approximately; the gap is reported per stay.
"""

from __future__ import annotations

import torch

from clinical_moe.attribution.game import PresenceGame
from clinical_moe.types import ModalityTokens


def _head_forward(game: PresenceGame):
    M = game.num_modalities

    def forward(*args: torch.Tensor) -> torch.Tensor:
        toks, masks, present = args[:M], args[M : 2 * M], args[2 * M]
        tokens = {m: ModalityTokens(toks[i], masks[i]) for i, m in enumerate(game.modalities)}
        out = game.target.log_odds(game.head(tokens, present).logits.float())  # (n * B,)
        # keep every input in the graph: tokens a head ignores get gradient 0, not an autograd error
        return out + sum(t.sum(dim=(1, 2)) for t in toks) * 0.0

    return forward


def modality_integrated_gradients(
    game: PresenceGame, n_steps: int = 32, internal_batch_size: int | None = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IG of the target log-odds w.r.t. each modality's tokens, summed per modality.

    Args:
        game: The batch's modality game (its cached encoder outputs are the IG inputs).
        n_steps: Integration steps (Gauss-Legendre).
        internal_batch_size: Rows per forward pass (steps x stays are chunked to bound memory).

    Returns:
        ``attr (B, M)`` per-modality IG; ``delta (B,)`` completeness gap
        ``sum_m attr - (F(x) - F(x'))``; ``base (B,)`` = ``F(x')``, the log-odds at the baseline.
    """
    from captum.attr import IntegratedGradients

    mods, dev = game.modalities, game.device
    inputs = tuple(game.tokens[m].tokens.detach() for m in mods)  # (B, T_m, D) each
    masks = tuple(game.tokens[m].mask for m in mods)  # (B, T_m) each
    present = game.natural.to(dev)
    forward = _head_forward(game)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    ibs = None
    if internal_batch_size is not None:
        ibs = max(internal_batch_size, game.batch_size)  # captum needs >= one stay per step
    with torch.enable_grad():
        attrs, delta = IntegratedGradients(forward).attribute(
            inputs,
            baselines=baselines,
            additional_forward_args=(*masks, present),
            n_steps=n_steps,
            internal_batch_size=ibs,
            return_convergence_delta=True,
        )
    per_mod = torch.stack([a.detach().float().sum(dim=(1, 2)).cpu() for a in attrs], 1)  # (B, M)
    with torch.no_grad():
        base = forward(*baselines, *masks, present).cpu()  # (B,)
    return per_mod, delta.detach().float().cpu(), base
