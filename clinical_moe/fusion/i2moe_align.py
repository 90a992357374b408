"""Alignment of I2MoE's reweighting weights with where each expert's interaction acts (ours).

**This is our addition, not the paper's objective.** Xin et al. (ICML 2025) train the
reweighting model by the task loss only; the interaction losses shape the experts' outputs, so
nothing ties, say, the synergy weight to the stays where synergy acts. On the synthetic
benchmark (issue 12) the synergy weight did not rise on synergy-driven stays (pulmonary =
infection = 1 with CXR and EHR): it tracked severity instead. This term adds that tie.

From the perturbed passes the head already runs in training (``x`` and every ``x^(-m)``), each
expert's *perturbation response* per sample (all detached)::

    r_U_m = 1 - cos(U_m(x), U_m(x^(-m)))                 (U_m reacts to losing its modality)
    r_S   = mean_m 1 - cos(S(x), S(x^(-m)))              (S reacts to losing any modality)
    r_R   = mean_m max(cos(R(x), R(x^(-m))), 0)          (R survives losing any one)

over the variants that exist for the sample (``valid``). The target distribution over experts is

- ``target="raw"``: ``q_j = r_j / sum_k r_k`` over the sample's defined experts;
- ``target="relative"``: each response first divided by that expert's mean response over the
  batch, ``q_j ∝ r_j / mean_b r_j``: the target tilts the weights towards an expert on the samples
  where its response is *above its own average*, whatever the experts' scales (the synergy loss
  drives ``r_S`` towards its maximum on every sample, so its raw level says little about where
  synergy acts).

and the loss is ``KL(q || w)`` averaged over the samples with at least one variant, ``w`` the
reweighter's weights. ``q`` is detached: the term moves the weights, not the experts. The head
computes ``w`` for this term from detached reweighter inputs, so it trains the reweighting model
(and the learned missing-modality embedding) only, not the encoders.

Evidence (2,000-patient synthetic corpus, seed 5, demo config, 3 training seeds, ``lambda_align``
0.5, ``raw``): the term is met almost at once (KL ~0.01) and does not cost AUROC (AUROC /
ceiling 0.960 vs 0.961 without), but it does not make the synergy weight rise on synergy-driven
stays consistently (test difference +0.005 / +0.010 / +0.016 against -0.008 / +0.009 / +0.017
without, n = 16-21 such stays per seed) and lowers the synergy weight's mean share (0.20 ->
0.13). ``relative`` and ``lambda_align`` 2 were no better on seed 0. The target itself does
not separate those stays: S's embedding response is no larger there (the synergy loss drives
it up on every sample), so tying ``w`` to it cannot make the weight track the synergy. Off by
default for that reason.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

ALIGN_TARGETS = ("raw", "relative")


def perturbation_responses(
    vec: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's response to the perturbations, per sample (no gradient).

    Args:
        vec: ``(M + 2, M + 1, B, V)``: expert j (``U_0..U_{M-1}``, S, R) on variant v (0 = the
            input, ``1 + m`` = modality m removed), as in ``interaction_losses``.
        valid: ``BoolTensor[M + 1, B]``: whether variant v exists for sample b (row 0 all True).

    Returns:
        ``resp (B, M + 2)`` (>= 0; 0 where undefined) and ``defined BoolTensor[B, M + 2]``.
    """
    with torch.no_grad():
        M = vec.shape[0] - 2
        vm = valid[1:]  # (M, B)
        vec = vec.float()
        # cos of expert j on x vs on x^(-m), for every expert and m: (M + 2, M, B)
        cos = F.cosine_similarity(vec[:, 1:], vec[:, :1], dim=-1)
        idx = torch.arange(M, device=vec.device)
        r_u = 1.0 - cos[idx, idx]  # (M, B): U_m on x^(-m)
        n = vm.sum(0)  # (B,)
        zero = cos.new_zeros(())
        r_s = torch.where(vm, 1.0 - cos[M], zero).sum(0) / n.clamp_min(1)  # (B,)
        r_r = torch.where(vm, cos[M + 1].clamp_min(0.0), zero).sum(0) / n.clamp_min(1)  # (B,)
        resp = torch.cat([r_u.T, r_s[:, None], r_r[:, None]], 1).clamp_min(0.0)  # (B, M + 2)
        any_v = (n > 0)[:, None]  # (B, 1)
        defined = torch.cat([vm.T, any_v, any_v], 1)  # (B, M + 2)
        return torch.where(defined, resp, zero), defined


def alignment_target(
    resp: torch.Tensor, defined: torch.Tensor, target: str = "raw", eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached target distribution ``q (B, M + 2)`` over experts and the rows it exists for.

    Rows with no defined expert get ``q = 0`` and ``rows[b] = False``; a row whose responses are
    all ~0 gets the uniform distribution over its defined experts.
    """
    if target not in ALIGN_TARGETS:
        raise ValueError(f"align_target must be one of {ALIGN_TARGETS}, got {target!r}")
    with torch.no_grad():
        r = torch.where(defined, resp, resp.new_zeros(()))
        if target == "relative":
            mean = r.sum(0) / defined.sum(0).clamp_min(1)  # (G,): each expert's batch mean
            r = r / (mean + eps)
        r = torch.where(defined, r + eps, r.new_zeros(()))  # all-zero rows -> uniform
        total = r.sum(1, keepdim=True)  # (B, 1)
        rows = defined.any(1)  # (B,)
        q = r / total.clamp_min(eps)
        return q, rows


def alignment_loss(
    q: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """``KL(q || w)`` averaged over ``rows``: ``sum_j q_j (log q_j - log w_j)``, 0 where
    ``q_j = 0`` (``w`` may hold exact zeros there: absent modalities' uniqueness experts)."""
    q = q.detach()
    logw = w.clamp_min(eps).log()
    logq = q.clamp_min(eps).log()
    kl = torch.where(q > 0, q * (logq - logw), w.new_zeros(())).sum(1)  # (B,)
    return torch.where(rows, kl, kl.new_zeros(())).sum() / rows.sum().clamp_min(1)
