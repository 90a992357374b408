"""The shared sparse mixture-of-experts layer: routers, experts, grouped dispatch, aux losses.

Used by every MoE head (METHODS.md, "Shared MoE layer"). Token-level routing: each real token of
each sample is routed on its own, so in eval mode a token's output never depends on other tokens
or samples (no noise, no capacity dropping).

- Router scores ``s_e(x)``: softmax gate ``x . w_e``; Laplace gate ``-||x - w_e||_2``; Gaussian
  gate ``-||x - w_e||_2^2`` (FuseMoE, Han et al. 2024). Training only, noisy top-k
  (Shazeer et al. 2017): ``s_e + eps * sigma_e(x)``, ``eps ~ N(0, 1)``.
- Noise scale (ours): Shazeer's ``sigma_e = softplus(x . v_e)`` starts at ``softplus(0) = 0.69``
  whatever the scale of the scores, which at initialisation (score std ~0.02) makes routing in
  training almost random and different from the clean routing used at evaluation. We scale it to
  the token's own score spread: ``sigma_e = noise_scale * sd_e(s(x)) * softplus(x . v_e) /
  softplus(0)`` (the spread detached, ``v`` starting at 0 and still learned through the smooth
  load estimator), so noise explores near the decision boundary only. The fraction of tokens whose
  noisy top-k equals the clean top-k is reported as ``topk_agreement``.
- Gates: softmax over the k selected scores; ``y = sum_{e in topk} g_e E_e(x)``; the caller adds the
  residual. A forced expert (Flex-MoE's hard specialisation) takes the top-1 slot: it is selected
  first and gated with at least the best score of the token.
- Aux losses over real tokens only: Switch load balance ``E * sum_e f_e P_e`` (Fedus et al. 2022);
  ``CV^2(importance) + CV^2(load)`` (Shazeer et al. 2017; smooth load estimator while noisy); the
  entropy regulariser ``mean_i H(p_i) - H(mean_i p_i)`` (FuseMoE eq. 3); router z-loss
  ``mean(logsumexp(s)^2)`` (Zoph et al. 2022).
- Expert dropout (training only) is the byte-mask dropout of :mod:`clinical_moe.fusion.backbone`
  (issue #16: ``F.dropout``'s per-element Bernoulli draw cost more than the expert matmuls at
  small widths): the drop rate is ``p`` rounded to a multiple of 1/256 (0.1 -> 0.1016) and the
  random stream differs from ``F.dropout``'s; evaluation is unchanged. Its scale is folded into
  the second matmul.
- Grouped combine (:meth:`Experts.mix`, issue #16): with many tokens per expert, the gather of an
  expert's tokens, its two matmuls, the gate multiply and the scatter-add into the output run expert
  by expert on blocks that stay in cache, forward and (hand-written) backward, instead of whole
  ``(N*k, D)`` passes for the gather, concatenation, gate product and scatter; same results to
  float rounding, same dropout draws as the per-expert reference path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinical_moe.fusion.backbone import Dropout, byte_keep_mask

GATES = ("softmax", "laplace", "gaussian")
ROUTINGS = ("joint", "per_modality", "disjoint")
AUX_LOSSES = ("load_balance", "cv2", "entropy", "z_loss")


class Router(nn.Module):
    """Scores of one token against ``E`` experts, with optional training-time noise.

    Args:
        d_model: Token width D.
        num_experts: Experts E.
        gate: ``"softmax"`` (dot product), ``"laplace"`` (negative L2 distance) or ``"gaussian"``
            (negative squared L2 distance) between the token and a learned per-expert vector.
        noisy: Add ``eps * sigma_e(x)`` to the scores in training mode (module docstring).
        noise_scale: Noise std relative to the spread of the token's clean scores over experts.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        gate: str = "softmax",
        noisy: bool = True,
        noise_scale: float = 0.25,
    ):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {GATES}")
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        self.gate, self.noisy, self.num_experts = gate, noisy, num_experts
        self.noise_scale = float(noise_scale)
        std = 0.02 if gate == "softmax" else 1.0 / math.sqrt(d_model)
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * std)  # (E, D)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy else None

    def clean_scores(self, x: Tensor) -> Tensor:
        """``x (N, D) -> (N, E)`` noise-free scores."""
        dot = x @ self.weight.t()  # (N, E)
        if self.gate == "softmax":
            return dot
        # ||x - w||^2 = |x|^2 - 2 x.w + |w|^2, without materialising (N, E, D).
        d2 = (x * x).sum(-1, keepdim=True) - 2 * dot + (self.weight * self.weight).sum(-1)  # (N, E)
        d2 = d2.clamp_min(0.0)
        if self.gate == "gaussian":
            return -d2
        return -d2.clamp_min(1e-12).sqrt()

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``x (N, D)`` -> (selection scores, clean scores, noise std or None), each ``(N, E)``."""
        clean = self.clean_scores(x)
        if not (self.training and self.noisy) or clean.shape[0] == 0:
            return clean, clean, None
        spread = clean.detach().std(-1, keepdim=True, unbiased=False)  # (N, 1)
        rel = F.softplus(x @ self.noise_weight.t()) / math.log(2.0)  # (N, E), 1 at v = 0
        std = (self.noise_scale * spread * rel).clamp_min(1e-6)  # (N, E)
        return clean + torch.randn_like(clean) * std, clean, std

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (N, D)`` -> (scores used for top-k selection, clean scores), each ``(N, E)``."""
        scores, clean, _ = self.route(x)
        return scores, clean


class _GroupedMix(torch.autograd.Function):
    """Expert by expert (module docstring, "Grouped combine"): with gates, ``y (N, D) = sum_j
    g_nj E_{e_nj}(x_n)``; without, ``y (N*k, D)``: each assignment's output in assignment order.

    Forward inputs: ``x (N, D)``; ``gate (N*k,)`` (or None) and ``src (N*k,)`` the gate weight and
    token of each assignment, sorted by expert; ``dst (N*k,)`` the assignment's row in ``y``
    (summed into with gates, copied to without); the stacked expert weights; ``counts`` (python
    ints, assignments per expert); the dropout rate (0 in eval mode).
    """

    @staticmethod
    def forward(ctx, x, gate, w1, b1, w2, b2, src, dst, counts, p):
        if gate is None:
            y = x.new_empty(dst.numel(), w2.shape[2])  # (N*k, D), every row written once
        else:
            y = x.new_zeros(x.shape[0], w2.shape[2])  # (N, D)
        saved, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = x.index_select(0, src[start : start + n])  # (n, D)
            pre = torch.addmm(b1[e], xe, w1[e])  # (n, H)
            keep, scale = byte_keep_mask(pre.shape, p, x.device, x.dtype)  # (n, H) 0/1 or None
            h = F.gelu(pre) if keep is None else F.gelu(pre).mul_(keep)  # (n, H)
            out = torch.addmm(b2[e], h, w2[e], alpha=scale)  # (n, D), before the gate
            rows = dst[start : start + n]  # (n,)
            if gate is None:
                y.index_copy_(0, rows, out)
            else:
                y.index_add_(0, rows, out * gate[start : start + n, None])
            saved.append((e, start, n, xe, pre, keep, scale, h, out))
            start += n
        ctx.saved, ctx.empty = saved, [e for e, n in enumerate(counts) if n == 0]
        ctx.save_for_backward(x, gate, w1, w2, src, dst)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, gate, w1, w2, src, dst = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch.zeros_like(x)
        ggate = None if gate is None else torch.empty_like(gate)
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)  # every used expert's slot written
        gb1, gb2 = w1.new_empty(w1.shape[0], w1.shape[2]), w2.new_empty(w2.shape[0], w2.shape[2])
        for g in (gw1, gw2, gb1, gb2):
            g[ctx.empty] = 0.0  # experts without a token
        for e, start, n, xe, pre, keep, scale, h, out in ctx.saved:
            go = gy.index_select(0, dst[start : start + n])  # (n, D)
            if gate is not None:
                ggate[start : start + n] = (go * out).sum(1)
                go.mul_(gate[start : start + n, None])  # gradient of the expert output
            torch.mm(h.t(), go, out=gw2[e])
            torch.sum(go, 0, out=gb2[e])
            gh = torch.mm(go, w2[e].t())  # (n, H)
            if keep is not None:
                gh.mul_(keep)
            gpre = torch.ops.aten.gelu_backward(gh, pre)  # (n, H)
            if scale != 1.0:
                gw2[e].mul_(scale)
                gpre.mul_(scale)
            torch.mm(xe.t(), gpre, out=gw1[e])
            torch.sum(gpre, 0, out=gb1[e])
            gx.index_add_(0, src[start : start + n], torch.mm(gpre, w1[e].t()))
        ctx.saved = None
        return gx, ggate, gw1, gb1, gw2, gb2, None, None, None, None


class Experts(nn.Module):
    """``E`` two-layer GELU MLPs ``D -> H -> D`` with stacked weights and grouped dispatch.

    Args:
        num_experts: Experts E.
        d_model: Width D.
        hidden: Hidden width H of each expert.
        dropout: Dropout on the hidden activations.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        a1, a2 = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden).uniform_(-a1, a1))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden).uniform_(-a1, a1))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model).uniform_(-a2, a2))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model).uniform_(-a2, a2))
        self.dropout = Dropout(dropout)  # byte-mask dropout (module docstring)
        #: Padded-bmm dispatch below this mean number of assignments per expert (0 = never).
        self.padded_below = 384

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Run expert ``e`` alone on ``x (N, D)`` (reference path for tests and analysis)."""
        h, s = self.dropout.unscaled(F.gelu(torch.addmm(self.b1[e], x, self.w1[e])))  # (N, H)
        return torch.addmm(self.b2[e], h, self.w2[e], alpha=s)  # (N, D)

    def _grouped(self, x: Tensor, expert_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs of the ``N*k`` assignments sorted by expert, and the sort order.

        Many tokens per expert: one ``addmm`` per expert over its contiguous slice. Few tokens per
        expert (per-op overhead dominates) with balanced loads: one padded ``(E, C, D)`` ``bmm``.
        """
        E, k = self.num_experts, expert_idx.shape[1]
        flat = expert_idx.reshape(-1)  # (N*k,)
        sorted_e, order = torch.sort(flat, stable=True)
        counts_t = torch.bincount(sorted_e, minlength=E)  # (E,)
        xs = x.index_select(0, order // k)  # (N*k, D), grouped by expert
        nk, cap = flat.numel(), int(counts_t.max())
        if nk < self.padded_below * E and E * cap <= 2 * nk:
            start = counts_t.cumsum(0) - counts_t  # (E,)
            slot = sorted_e * cap + torch.arange(nk, device=x.device) - start[sorted_e]  # (N*k,)
            buf = x.new_zeros(E * cap, x.shape[1]).index_copy(0, slot, xs)
            buf = buf.view(E, cap, -1)  # (E, C, D)
            h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), buf, self.w1))  # (E, C, H)
            h, s = self.dropout.unscaled(h)  # the dropout scale goes into the next matmul
            y = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2, alpha=s)  # (E, C, D)
            return y.view(E * cap, -1).index_select(0, slot), order  # (N*k, D), (N*k,)
        counts = counts_t.tolist()
        # unbind once: its backward stacks the E slices, instead of E full-size zero tensors.
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        outs = []
        for e, (chunk, n) in enumerate(zip(xs.split(counts), counts)):
            if n == 0:
                continue
            h, s = self.dropout.unscaled(F.gelu(torch.addmm(b1[e], chunk, w1[e])))  # (n, H)
            outs.append(torch.addmm(b2[e], h, w2[e], alpha=s))  # (n, D)
        return torch.cat(outs, 0), order  # (N*k, D), (N*k,)

    def forward(self, x: Tensor, expert_idx: Tensor) -> Tensor:
        """``x (N, D)``, ``expert_idx (N, k)`` long -> ``(N, k, D)``: each assignment's output.

        Grouped dispatch: the ``N*k`` assignments are sorted by expert and each expert runs one
        matmul over its own tokens; never every expert on every token.
        """
        N, k = expert_idx.shape
        if N == 0:
            return x.new_zeros(0, k, self.d_model)
        E, nk = self.num_experts, N * k
        if nk < self.padded_below * E:  # few tokens per expert: maybe the padded bmm
            ys, order = self._grouped(x, expert_idx)
            out = torch.empty_like(ys).index_copy(0, order, ys)  # (N*k, D) in assignment order
            return out.view(N, k, self.d_model)  # (N, k, D)
        order, counts = self._sorted(expert_idx)
        w1, b1, w2, b2, p = self.w1, self.b1, self.w2, self.b2, self._rate()
        out = _GroupedMix.apply(x, None, w1, b1, w2, b2, order // k, order, counts, p)
        return out.view(N, k, self.d_model)  # (N, k, D)

    def _sorted(self, expert_idx: Tensor) -> tuple[Tensor, list[int]]:
        """The ``N*k`` assignments sorted by expert (stable) and the count of each expert."""
        sorted_e, order = torch.sort(expert_idx.reshape(-1), stable=True)  # (N*k,) each
        return order, torch.bincount(sorted_e, minlength=self.num_experts).tolist()

    def _rate(self) -> float:
        """The hidden-activation dropout rate in effect (0 in eval mode)."""
        return self.dropout.p if self.training else 0.0

    def mix(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        """``sum_j weights[n, j] * E_{expert_idx[n, j]}(x_n)`` -> ``(N, D)`` (fused combine)."""
        N, k = expert_idx.shape
        if N == 0:
            return x.new_zeros(0, self.d_model)
        E, nk = self.num_experts, N * k
        if nk < self.padded_below * E:  # few tokens per expert: maybe the padded bmm
            ys, order = self._grouped(x, expert_idx)
            w = weights.reshape(-1).index_select(0, order).unsqueeze(1)  # (N*k, 1)
            return x.new_zeros(N, self.d_model).index_add(0, order // k, ys * w)  # (N, D)
        order, counts = self._sorted(expert_idx)
        gate = weights.reshape(-1).index_select(0, order)  # (N*k,) in expert order
        w1, b1, w2, b2, p, src = self.w1, self.b1, self.w2, self.b2, self._rate(), order // k
        return _GroupedMix.apply(x, gate, w1, b1, w2, b2, src, src, counts, p)  # (N, D)


class DenseFFN(nn.Module):
    """A dense two-layer GELU MLP ``D -> hidden -> D`` (benchmark baseline).

    Args:
        d_model: Width D.
        hidden: Hidden width.
        dropout: Dropout on the hidden activations.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


def topk_gates(scores: Tensor, k: int, forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``scores (N, E)`` -> (weights ``(N, k)`` = softmax over the k selected scores, indices).

    Args:
        scores: Selection scores.
        k: Experts per token.
        forced: Optional ``(N,)`` long; where ``>= 0`` that expert takes the top-1 slot: it is
            selected first, gated with ``max(its score, the token's best score)``, and the other
            ``k - 1`` slots go to the best remaining experts (Flex-MoE's hard specialisation).
    """
    idx = scores.topk(k, dim=-1).indices  # (N, k)
    if forced is None:
        return torch.softmax(scores.gather(1, idx), dim=-1), idx
    has = forced >= 0  # (N,)
    f = forced.clamp_min(0).unsqueeze(1)  # (N, 1)
    onehot = torch.zeros_like(scores, dtype=torch.bool).scatter(1, f, True)  # (N, E)
    rest = scores.masked_fill(onehot, float("-inf")).topk(k - 1, dim=-1).indices  # (N, k-1)
    idx = torch.where(has.unsqueeze(1), torch.cat([f, rest], 1), idx)  # (N, k)
    sel = scores.gather(1, idx)  # (N, k)
    first = torch.where(has, torch.maximum(sel[:, 0], scores.max(-1).values), sel[:, 0])  # (N,)
    sel = torch.cat([first.unsqueeze(1), sel[:, 1:]], 1)  # (N, k)
    return torch.softmax(sel, dim=-1), idx


def topk_agreement(noisy: Tensor, clean: Tensor, k: int, noisy_idx: Tensor | None = None) -> Tensor:
    """Fraction of tokens whose top-k expert set under ``noisy`` equals the one under ``clean``.

    ``noisy_idx``: ``noisy.topk(k).indices`` when the caller already has it.
    """
    if noisy is clean or noisy.shape[0] == 0:
        return clean.new_ones(())
    with torch.no_grad():
        a = noisy.topk(k, dim=-1).indices if noisy_idx is None else noisy_idx
        a = a.sort(-1).values  # (N, k)
        b = clean.topk(k, dim=-1).indices.sort(-1).values  # (N, k)
        return (a == b).all(-1).float().mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (population variance); 0 if len 1."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var(unbiased=False) / (x.float().mean() ** 2 + eps)


def entropy_reg(probs: Tensor, eps: float = 1e-9) -> Tensor:
    """FuseMoE eq. 3: ``mean_i H(p_i) - H(mean_i p_i)`` for router probabilities ``(N, E)``."""
    h_tok = -(probs * (probs + eps).log()).sum(-1).mean()
    mean_p = probs.mean(0)  # (E,)
    return h_tok + (mean_p * (mean_p + eps).log()).sum()


def smooth_load(clean: Tensor, noisy: Tensor, std: Tensor, k: int) -> Tensor:
    """Shazeer's differentiable load: ``sum_n P(expert e in top-k of token n)`` -> ``(E,)``."""
    top = noisy.topk(k + 1, dim=-1).values  # (N, k+1)
    thr_in, thr_out = top[:, k : k + 1], top[:, k - 1 : k]  # (N, 1) each
    is_in = noisy > thr_in  # (N, E)
    normal = torch.distributions.Normal(0.0, 1.0)
    z = torch.where(is_in, clean - thr_in, clean - thr_out) / std.clamp_min(1e-6)  # (N, E)
    return normal.cdf(z).sum(0)


def router_losses(
    clean: Tensor, noisy: Tensor, std: Tensor | None, weights: Tensor, idx: Tensor
) -> dict[str, Tensor]:
    """Every aux loss (unweighted, in the graph) of one router over its ``N >= 1`` tokens.

    Args:
        clean: ``(N, E)`` clean scores (their softmax is the router probability p).
        noisy: ``(N, E)`` selection scores (equal to ``clean`` without noise).
        std: ``(N, E)`` noise std, or None when not noisy.
        weights: ``(N, k)`` gate weights of the selected experts.
        idx: ``(N, k)`` selected experts.
    """
    N, E = clean.shape
    k = idx.shape[1]
    probs = torch.softmax(clean, -1)  # (N, E)
    counts = torch.bincount(idx.reshape(-1), minlength=E).to(probs.dtype)  # (E,)
    importance = clean.new_zeros(N, E).scatter(1, idx, weights).sum(0)  # (E,)
    load = smooth_load(clean, noisy, std, k) if std is not None and k < E else counts
    return {
        "load_balance": E * ((counts / (N * k)) * probs.mean(0)).sum(),
        "cv2": cv_squared(importance) + cv_squared(load),
        "entropy": entropy_reg(probs),
        "z_loss": torch.logsumexp(clean, -1).pow(2).mean(),
    }


@dataclass
class MoEOutput:
    """What :class:`MoELayer` returns.

    Attributes:
        y: ``(B, T, D)`` mixture ``sum_{e in topk} g_e E_e(x)``; zeros at masked tokens (the caller
            adds the residual).
        aux_loss: Scalar, weighted sum of the configured aux losses (in the graph).
        probs: ``(B, T, E)`` router softmax of the clean scores, zeros at masked tokens; detached.
        topk_idx: ``(B, T, k)`` selected experts (local to the token's pool), -1 at masked tokens.
        extras: Unweighted detached loss parts (``load_balance``, ``cv2``, ``entropy``,
            ``z_loss``) and ``topk_agreement``: the fraction of tokens whose noisy top-k equals
            the clean one (1 in eval mode or without noise).
        scores: ``(B, T, E)`` clean router scores (logits), zeros at masked tokens; in the graph.
        weights: ``(B, T, k)`` gate weights of the selected experts, zeros at masked; in the graph.
    """

    y: Tensor
    aux_loss: Tensor
    probs: Tensor
    topk_idx: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    scores: Tensor | None = None
    weights: Tensor | None = None


class MoELayer(nn.Module):
    """Sparse top-k MoE over the real tokens of a ``(B, T, D)`` sequence.

    Args:
        d_model: Width D.
        num_experts: Experts E (per pool).
        top_k: Experts per token k (<= E).
        hidden: Hidden width of each expert (default ``2 * d_model``).
        gate: One of :data:`GATES`.
        routing: ``"joint"`` (one router, shared experts), ``"per_modality"`` (one router per
            modality, shared experts) or ``"disjoint"`` (a router and an expert pool per modality).
        modalities: Modality names (routers / pools for the non-joint modes).
        noisy: Noisy top-k in training.
        noise_scale: Router noise std relative to each token's score spread (see module docstring).
        dropout: Dropout inside the experts.
        load_balance: Weight of the Switch load-balance loss.
        cv2: Weight of ``CV^2(importance) + CV^2(load)``.
        entropy: Weight of the entropy regulariser (FuseMoE eq. 3).
        z_loss: Weight of the router z-loss.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        gate: str = "softmax",
        routing: str = "joint",
        modalities: Sequence[str] = (),
        noisy: bool = True,
        noise_scale: float = 0.25,
        dropout: float = 0.0,
        load_balance: float = 0.0,
        cv2: float = 0.0,
        entropy: float = 0.0,
        z_loss: float = 0.0,
    ):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of {ROUTINGS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.modalities = tuple(modalities)
        if routing != "joint" and not self.modalities:
            raise ValueError(f"routing {routing!r} needs the modality names")
        self.d_model, self.num_experts, self.top_k, self.routing = (
            d_model,
            num_experts,
            top_k,
            routing,
        )
        self.num_routers = 1 if routing == "joint" else len(self.modalities)
        pools = len(self.modalities) if routing == "disjoint" else 1
        self.routers = nn.ModuleList(
            Router(d_model, num_experts, gate, noisy, noise_scale) for _ in range(self.num_routers)
        )
        self.experts = Experts(num_experts * pools, d_model, hidden or 2 * d_model, dropout)
        self.aux_weights = dict(zip(AUX_LOSSES, (load_balance, cv2, entropy, z_loss)))

    def _route(self, xt: Tensor, mid: Tensor | None, forced: Tensor | None):
        """Route ``xt (N, D)``: clean scores, gate weights, expert ids and per-router aux parts."""
        N, E, k = xt.shape[0], self.num_experts, self.top_k
        clean_all, w_all = xt.new_zeros(N, E), xt.new_zeros(N, k)  # filled router by router
        idx_all = torch.zeros(N, k, dtype=torch.long, device=xt.device)
        parts: dict[str, list[Tensor]] = {name: [] for name in (*AUX_LOSSES, "topk_agreement")}
        for r in range(self.num_routers):
            sel = None if mid is None else (mid == r).nonzero().squeeze(1)  # (N_r,)
            if N == 0 or (sel is not None and sel.numel() == 0):
                continue
            xg = xt if sel is None else xt.index_select(0, sel)  # (N_r, D)
            fg = forced if forced is None or sel is None else forced.index_select(0, sel)
            noisy, clean, std = self.routers[r].route(xg)
            w, idx = topk_gates(noisy, k, fg)
            for name, val in router_losses(clean, noisy, std, w, idx).items():
                parts[name].append(val)
            # without noise (eval mode) the two selections are the same tensor: no extra top-k
            # the gates' top-k of the noisy scores is reused unless an expert was forced
            reuse = idx if fg is None else None
            agree = xg.new_ones(()) if std is None else topk_agreement(noisy, clean, k, reuse)
            parts["topk_agreement"].append(agree)
            if self.routing == "disjoint":
                idx = idx + r * E  # global index into the stacked pools
            if sel is None:
                clean_all, w_all, idx_all = clean, w, idx
            else:
                clean_all = clean_all.index_copy(0, sel, clean)
                w_all, idx_all = w_all.index_copy(0, sel, w), idx_all.index_copy(0, sel, idx)
        return clean_all, w_all, idx_all, parts

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        modality_ids: Tensor | None = None,
        forced_expert: Tensor | None = None,
    ) -> MoEOutput:
        """Route the real tokens.

        Args:
            x: ``(B, T, D)`` tokens.
            mask: ``(B, T)`` bool, True = real token; others are not routed and get ``y = 0``.
            modality_ids: ``(B, T)`` long index into ``modalities``; needed unless joint.
            forced_expert: Optional ``(B, T)`` long; where ``>= 0`` that (local) expert is always
                among the token's top-k (Flex-MoE hard specialisation).
        """
        B, T, D = x.shape
        tok = mask.reshape(B * T).nonzero().squeeze(1)  # (N,) flat positions of real tokens
        N = tok.numel()
        every = N == B * T  # no padding: skip the gather / scatter copies
        gather = (lambda t: t) if every else (lambda t: t.index_select(0, tok))  # noqa: E731
        xt = gather(x.reshape(B * T, D))  # (N, D)
        mid = None
        if self.routing != "joint":
            if modality_ids is None:
                raise ValueError(f"routing {self.routing!r} needs modality_ids (B, T)")
            mid = gather(modality_ids.reshape(B * T))  # (N,)
            if N and not bool(((mid >= 0) & (mid < self.num_routers)).all()):
                raise ValueError(
                    f"modality_ids must lie in [0, {self.num_routers}) for real tokens"
                )
        forced = None if forced_expert is None else gather(forced_expert.reshape(B * T))  # (N,)
        clean_all, w_all, idx_all, parts = self._route(xt, mid, forced)

        y_tok = self.experts.mix(xt, idx_all, w_all)  # (N, D)

        def spread(v: Tensor, fill: int = 0) -> Tensor:
            """``(N, F)`` values of the real tokens -> ``(B, T, F)`` with ``fill`` elsewhere."""
            if every:
                return v.view(B, T, -1)  # (B, T, F)
            out = v.new_full((B * T, v.shape[1]), fill).index_copy(0, tok, v)  # (B*T, F)
            return out.view(B, T, -1)  # (B, T, F)

        y = spread(y_tok)  # (B, T, D)
        aux = x.new_zeros(())
        extras = {}
        for name in AUX_LOSSES:
            val = torch.stack(parts[name]).mean() if parts[name] else x.new_zeros(())
            extras[name] = val.detach()
            if self.aux_weights[name]:
                aux = aux + self.aux_weights[name] * val
        agree = parts["topk_agreement"]
        extras["topk_agreement"] = torch.stack(agree).mean() if agree else x.new_ones(())

        local_idx = idx_all % self.num_experts if self.routing == "disjoint" else idx_all
        scores = spread(clean_all)  # (B, T, E)
        probs = spread(torch.softmax(clean_all.detach(), -1))  # (B, T, E)
        topk = spread(local_idx, fill=-1)  # (B, T, k)
        return MoEOutput(y, aux, probs, topk, extras, scores, spread(w_all))
