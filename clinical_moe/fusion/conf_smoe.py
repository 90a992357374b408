"""ConfSMoE: confidence-guided sparse MoE with two-stage imputation for missing modalities.

Zheng et al., "Confidence-Guided Sparse Mixture of Experts for Multimodal Learning with Missing
Modalities" (2025), arXiv:2505.19525.

Pipeline (per sample; B batch, T = sum of the modalities' token counts, E experts, k per token):

1. Pre-imputation (stage 1): every token that is not real (absent modality or padding) is
   replaced by a per-modality, per-position mean of that modality's encoded tokens over observed
   training samples, so its content is invisible. Ours: an EMA buffer (``fill``) updated in
   training from the present rows' real tokens only (no grad) and used as is at eval. The released
   code averages 10 random observed samples, also at test time (non-deterministic). In training
   the current batch is folded into the buffer before the buffer is used;
   ``pool_size > 0`` draws such pools from the current batch during training only.
2. Backbone: tokens + positional + modality-type embedding; ``num_layers`` pre-LN blocks
   ``h = h + Attn(LN(h))`` then ``h = h + sum_{i in topk} w_i E_i(LN(h))`` (correct residuals).
3. Confidence-guided gate: the router picks the top-k experts per token (noisy in training only);
   the weight of a picked expert is its confidence, not the softmax score::

       c_i(h) = sigmoid(a_i . LN(E_i(h)) + b_i)          (ConfNet, one per expert)
       w_i = c_i            or  c_i / sum_{j in topk} c_j   (``normalize=True``)

   The confidence target is the true-class probability (TCP) of an auxiliary classifier ``W_p`` on
   the expert output, ``t_i = softmax(W_p E_i(h))[y]``; binary / multilabel use ``p`` if ``y = 1``
   else ``1 - p``, averaged over labels. The label of a token is its sample's label.
   ``L_conf = MSE(c_i, stopgrad(t_i))``. No load-balance loss.
4. Post-imputation (stage 2, after the MoE of each layer in ``impute_layers``): imputed tokens
   attend (queries) to the MoE outputs of the sample's real tokens (keys / values; imputed tokens
   are never keys; optional ``topk_keys`` sparsity), residual + LN; only imputed rows change.
   It runs only on the samples that have an imputed token, and not at all when no token of the
   batch is imputed (identical results: non-imputed queries are discarded anyway; the skipped
   parameters get their exact, zero, gradient through a zero-valued term).
5. Readout: LN, mean over all tokens (imputed included), linear -> C.

Where we deliberately differ from the released code (METHODS.md, "ConfSMoE"):

- Deterministic pre-imputation at eval (EMA buffer) instead of random pools.
- ``W_p`` is trained (cross-entropy / BCE on the expert outputs, ``cls_weight``; its gradient
  also reaches the experts), the TCP target is detached, and the multilabel TCP is averaged over
  labels.
- The router is trained (``router_training="confidence"``): ``BCE(sigmoid(s_i), stopgrad(c_i))``
  for the picked experts, where ``s_i`` are the scores the selection used (noisy in training, so
  the learned noise scale gets a gradient too; clean at eval). ``router_training="none"`` keeps the
  released behaviour for ablation: the router then gets no gradient, knowingly breaking
  invariant 4 (every parameter learns).
- ConfNet's LayerNorm has no affine parameters (they would be redundant with ``a_i``, ``b_i``).
- Imputed tokens (absent modalities, padding) are left out of ``L_conf``, the classifier loss and
  the router loss: their content is a training-set mean, so the sample's label says nothing about
  it, and fitting it would teach the confidences to follow the class prior.
- Class-balanced confidence target (``class_balance=True``). With a rare positive class an
  uninformative ``W_p`` predicts the prevalence ``pi``, so ``t_i`` is about ``1 - pi`` on
  negatives and ``pi`` on positives; the MSE is dominated by negatives and the confidences
  settle near ``1 - pi`` for every expert, hardly telling experts apart. We weight every token's
  ``L_conf`` and classifier-loss terms by the inverse frequency of its class (binary / per label
  ``1 / (2 pi)`` for positives, ``1 / (2 (1 - pi))`` for negatives; multiclass ``1 / (C pi_c)``),
  so both classes carry the same total weight. The balanced ``W_p`` then predicts 0.5 when it
  knows nothing and ``t_i`` rises above 0.5 only where the expert output is informative for
  either class. The frequencies ``pi`` are a running mean (then EMA at ``momentum``) of the
  training labels in a buffer (``class_freq``), so a batch without positives still gets sane
  weights; evaluation does not use them. ``class_balance=False`` restores plain means.
- The experts' dropout is the byte-mask dropout already used on the residual branches (drop rate
  rounded to a multiple of 1/256; :mod:`clinical_moe.fusion.moe`, issue #16); evaluation is
  unaffected.
- Attention-probability dropout is off by default (``attn_dropout=0``; ``dropout`` still acts on
  residual branches and inside the experts): on CPU it forces the unfused attention kernel.
- Auxiliary weights (``conf_weight=0.5``, ``cls_weight=0.1``, ``router_weight=0.1``; the paper
  and released code use 1 for each). With 1.0 each the aux terms were about 2.5x the task loss.
  The router loss is reported as a KL (BCE minus the constant entropy of its soft target; same
  gradient), so it goes to 0 at a perfect fit instead of sitting at the target's entropy. The
  classifier loss is ~0.69 when ``W_p`` is uninformative and falls as it learns; ``L_conf`` is a
  squared error between probabilities (typically < 0.1). With these weights the aux terms are
  roughly 0.05-0.15 in all, a modest fraction of a binary task loss of 0.3-0.7.

Paper defaults: D 128, S 48 tokens per modality, 4 (MIMIC) to 8 experts, top-2, 4 heads, dropout
0.1-0.4, lr 3e-4, batch 64-256, 30 epochs. Constructor defaults are small for CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from clinical_moe.fusion.backbone import Dropout, GroupedSelfAttention, safe_key_mask
from clinical_moe.fusion.base import FusionHead, zero_loss
from clinical_moe.fusion.moe import Experts, Router, topk_gates
from clinical_moe.registry import HEADS
from clinical_moe.types import FusionOutput

TASKS = ("binary", "multiclass", "multilabel")
ROUTER_TRAINING = ("confidence", "none")


def true_class_prob(
    logits: torch.Tensor,
    y: torch.Tensor,
    task: str,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TCP of an auxiliary classifier and its (optionally weighted) training loss.

    Args:
        logits: ``(N, k, C)`` auxiliary logits of each picked expert's output.
        y: Per-token labels: ``(N,)`` float (binary), ``(N,)`` long (multiclass) or ``(N, C)``
            float (multilabel).
        task: One of :data:`TASKS`.
        weight: Optional per-element loss weights: ``(N,)`` (multiclass) or ``(N, L)`` (binary
            ``L = 1`` / multilabel ``L = C``); the loss is ``sum(w * l) / sum(w)`` over tokens,
            picked experts and labels. None = plain mean.

    Returns:
        ``tcp (N, k)`` (in the graph; the caller detaches it) and the scalar classifier loss.
    """
    N, k, C = logits.shape
    if task == "multiclass":
        yk = y.unsqueeze(1).expand(-1, k)  # (N, k)
        logp = F.log_softmax(logits, -1)  # (N, k, C)
        nll = -logp.gather(-1, yk.unsqueeze(-1)).squeeze(-1)  # (N, k)
        w = None if weight is None else weight.reshape(N, 1).expand(N, k)  # (N, k)
        return (-nll).exp(), _weighted_mean(nll, w)
    yk = y.reshape(N, 1, -1).expand_as(logits).to(logits.dtype)  # (N, k, C)
    p = torch.sigmoid(logits)
    tcp = torch.where(yk > 0.5, p, 1.0 - p).mean(-1)  # (N, k): mean over labels
    bce = F.binary_cross_entropy_with_logits(logits, yk, reduction="none")  # (N, k, C)
    w = None if weight is None else weight.reshape(N, 1, -1).expand_as(bce)  # (N, k, C)
    return tcp, _weighted_mean(bce, w)


def _weighted_mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``sum(w * x) / sum(w)`` (plain mean when ``w`` is None; 0 when every weight is 0)."""
    if w is None:
        return x.mean()
    return (w * x).sum() / w.sum().clamp_min(1e-12)


def class_weights(y: torch.Tensor, freq: torch.Tensor, task: str) -> torch.Tensor:
    """Inverse-frequency weights so that each class carries the same total weight.

    Binary / multilabel (per label l with positive rate ``p_l``): ``1 / (2 p_l)`` for a positive,
    ``1 / (2 (1 - p_l))`` for a negative. Multiclass (class rate ``p_c``): ``1 / (C p_c)``. Under
    the estimated frequencies every weight averages to 1.

    Args:
        y: Labels as in :func:`true_class_prob` (``(N,)`` or ``(N, C)``).
        freq: ``(L,)`` class (multiclass) or positive (binary / multilabel) frequencies.
        task: One of :data:`TASKS`.

    Returns:
        ``(N,)`` (multiclass) or ``(N, L)`` weights.
    """
    f = freq.clamp(1e-3, 1 - 1e-3)
    if task == "multiclass":
        return 1.0 / (f.numel() * f[y])  # (N,)
    yl = y.reshape(y.shape[0], -1).to(f.dtype)  # (N, L)
    return torch.where(yl > 0.5, 0.5 / f, 0.5 / (1.0 - f))  # (N, L)


class ConfidenceMoE(nn.Module):
    """Sparse MoE FFN whose picked experts are weighted by their ConfNet confidence.

    Args:
        d_model: Width D.
        num_experts: Experts E.
        top_k: Experts per token k.
        hidden: Expert hidden width.
        num_classes: Outputs C of the auxiliary classifier ``W_p``.
        gate: Router gate (see :class:`clinical_moe.fusion.moe.Router`).
        noisy: Noisy top-k selection in training.
        dropout: Dropout inside the experts.
        normalize: Divide the k confidences by their sum.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        hidden: int,
        num_classes: int,
        gate: str = "softmax",
        noisy: bool = True,
        dropout: float = 0.0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k, self.normalize = top_k, normalize
        self.router = Router(d_model, num_experts, gate, noisy)
        self.experts = Experts(num_experts, d_model, hidden, dropout)
        self.conf_a = nn.Parameter(torch.randn(num_experts, d_model) * d_model**-0.5)  # ConfNet a_i
        self.conf_b = nn.Parameter(torch.zeros(num_experts))  # ConfNet b_i
        self.aux_cls = nn.Linear(d_model, num_classes)  # W_p

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``u (B, T, D)`` (normalised tokens) -> mixture ``(B, T, D)`` and per-token details."""
        B, T, D = u.shape
        x = u.reshape(B * T, D)  # (N, D)
        scores, clean = self.router(x)  # (N, E) each
        _, idx = topk_gates(scores, self.top_k)  # (N, k)
        eo = self.experts(x, idx)  # (N, k, D)
        a, b = self.conf_a[idx], self.conf_b[idx]  # (N, k, D), (N, k)
        conf = torch.sigmoid((F.layer_norm(eo, (D,)) * a).sum(-1) + b)  # (N, k)
        w = conf / conf.sum(-1, keepdim=True).clamp_min(1e-6) if self.normalize else conf
        y = (w.unsqueeze(-1) * eo).sum(1).view(B, T, D)  # (B, T, D)
        info = {"idx": idx, "scores": scores, "clean": clean, "conf": conf, "eo": eo}
        return y, info


class PostImputation(nn.Module):
    """Cross-attention from imputed tokens to the MoE outputs of real tokens, residual + LN.

    Args:
        d_model: Width D.
        num_heads: Heads (must divide D).
        dropout: Dropout on the residual branch.
        topk_keys: Keep only the ``topk_keys`` best-scoring real keys per query (None = all).
        attn_dropout: Dropout on the attention probabilities. Without key sparsity and with
            ``attn_dropout == 0`` (or in eval) the fused attention kernel runs.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        topk_keys: int | None = None,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.num_heads, self.topk_keys = num_heads, topk_keys
        self.norm_q, self.norm_kv = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.kv = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model)
        self.out, self.norm_out = nn.Linear(d_model, d_model), nn.LayerNorm(d_model)
        self.drop = Dropout(dropout)
        self.attn_drop = Dropout(attn_dropout)

    def forward(self, h: torch.Tensor, src: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``LN(h + CA(q=h, kv=src[key_mask]))`` for every token: ``(B, T, D)``."""
        B, T, D = h.shape
        H = self.num_heads
        q = self.q(self.norm_q(h)).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, dh)
        kv = self.kv(self.norm_kv(src)).view(B, T, 2, H, D // H)  # (B, T, 2, H, dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, T, dh)
        keep = safe_key_mask(key_mask)[:, None, None, :]  # (B, 1, 1, Tk)
        sparse = self.topk_keys is not None and self.topk_keys < T
        if not sparse and not (self.training and self.attn_drop.p > 0):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, Tq, dh)
            o = o.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
            return self.norm_out(self.drop.residual(h, self.out(o)))
        s = q @ k.transpose(-1, -2) * (D // H) ** -0.5  # (B, H, Tq, Tk)
        neg = torch.finfo(s.dtype).min
        if sparse:
            kth = (
                s.masked_fill(~keep, neg).topk(self.topk_keys, -1).values[..., -1:]
            )  # (B, H, T, 1)
            keep = keep & (s >= kth)
        p = self.attn_drop(torch.softmax(s.masked_fill(~keep, neg), -1))  # (B, H, Tq, Tk)
        o = (p @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.norm_out(self.drop.residual(h, self.out(o)))


@HEADS.register("conf_smoe")
class ConfSMoE(FusionHead):
    """Confidence-guided sparse MoE with pre- and post-imputation of missing modalities.

    Args:
        num_layers: Transformer layers, each with a confidence-gated MoE FFN.
        num_heads: Attention heads (paper 4).
        num_experts: Experts per layer (paper 4 on MIMIC to 8).
        top_k: Experts per token (paper 2).
        hidden: Expert hidden width.
        dropout: Dropout (paper 0.1-0.4) on residual branches, in the experts and stage 2.
        attn_dropout: Dropout on the attention probabilities of the self-attention and stage 2
            (0 by default: on CPU any value > 0 forces the unfused attention kernel that keeps a
            ``T x T`` matrix per head).
        gate: Router gate: ``"softmax"``, ``"laplace"`` or ``"gaussian"``.
        noisy: Noisy top-k selection in training.
        normalize: Divide the k confidences by their sum.
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``; None = binary if
            ``num_classes == 1``, else multilabel for ``(B, C)`` labels and multiclass otherwise.
        router_training: ``"confidence"`` (ours) or ``"none"`` (released code; router frozen).
        impute_layers: Layers followed by post-imputation (None = all; ``[]`` = none).
        topk_keys: Sparse post-imputation: keys kept per query (None = all real keys).
        momentum: EMA rate of the pre-imputation buffer (a running mean until ``1/momentum``
            updates of a position).
        pool_size: > 0: in training, fill from the mean of this many random observed samples of
            the batch (the released code's 10) instead of the buffer; eval always uses the buffer.
        class_balance: Weight the confidence and classifier losses by inverse class frequency
            (module docstring); False = plain means over real tokens.
        conf_weight: Weight of ``L_conf``.
        cls_weight: Weight of the auxiliary classifier's loss.
        router_weight: Weight of the router's confidence-prediction loss (a KL).
    """

    def __init__(
        self,
        modalities,
        d_model,
        num_classes,
        num_tokens=None,
        num_layers: int = 1,
        num_heads: int = 4,
        num_experts: int = 4,
        top_k: int = 2,
        hidden: int = 64,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        gate: str = "softmax",
        noisy: bool = True,
        normalize: bool = False,
        task: str | None = None,
        router_training: str = "confidence",
        impute_layers: Sequence[int] | None = None,
        topk_keys: int | None = None,
        momentum: float = 0.01,
        pool_size: int = 0,
        class_balance: bool = True,
        conf_weight: float = 0.5,
        cls_weight: float = 0.1,
        router_weight: float = 0.1,
    ):
        super().__init__(modalities, d_model, num_classes, num_tokens)
        lacking = [m for m in self.modalities if m not in self.num_tokens]
        if lacking:
            raise ValueError(f"conf_smoe needs num_tokens for every modality; missing {lacking}")
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
        if task == "binary" and num_classes != 1:
            raise ValueError(f"task 'binary' needs num_classes=1, got {num_classes}")
        if router_training not in ROUTER_TRAINING:
            raise ValueError(
                f"router_training must be one of {ROUTER_TRAINING}, got {router_training!r}"
            )
        impute = range(num_layers) if impute_layers is None else [int(i) for i in impute_layers]
        bad = [i for i in impute if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"impute_layers {bad} out of range for num_layers={num_layers}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.task, self.router_training = task, router_training
        self.momentum, self.pool_size = momentum, pool_size
        self.weights = {"conf": conf_weight, "cls": cls_weight, "router": router_weight}
        self.class_balance = class_balance
        # Skip stage 2 where no token is imputed (and run it only on rows that have one); False
        # runs it on every row of every training batch, as before (kept for tests / ablation).
        self.skip_unimputed = True
        seg = torch.cat(
            [torch.full((self.num_tokens[m],), i) for i, m in enumerate(self.modalities)]
        )
        T = seg.numel()
        self.register_buffer("seg", seg.long(), persistent=False)  # (T,) modality id per position
        self.register_buffer("fill", torch.zeros(T, d_model))  # stage-1 running mean per position
        self.register_buffer("fill_count", torch.zeros(T, dtype=torch.long))
        # class (multiclass) or positive (binary / multilabel) frequency of the training labels
        self.register_buffer("class_freq", torch.full((num_classes,), 0.5))
        self.register_buffer("class_count", torch.zeros((), dtype=torch.long))

        self.pos_embed = nn.Parameter(torch.randn(T, d_model) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities), d_model) * 0.02)
        self.norm1 = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.attn = nn.ModuleList(
            GroupedSelfAttention(1, d_model, num_heads, attn_dropout) for _ in range(num_layers)
        )
        self.norm2 = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.moe = nn.ModuleList(
            ConfidenceMoE(
                d_model, num_experts, top_k, hidden, num_classes, gate, noisy, dropout, normalize
            )
            for _ in range(num_layers)
        )
        self.impute = nn.ModuleDict(
            {
                str(i): PostImputation(d_model, num_heads, dropout, topk_keys, attn_dropout)
                for i in sorted(set(impute))
            }
        )
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, num_classes)

    # ------------------------------------------------------------------ stage 1
    @torch.no_grad()
    def update_fill(self, x: torch.Tensor, real: torch.Tensor) -> None:
        """EMA of the real tokens ``x (B, T, D)`` per position (``real (B, T)``); no gradient."""
        w = real.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        cnt = w.sum(0)  # (T, 1)
        seen = cnt.squeeze(-1) > 0  # (T,)
        mean = (x.detach() * w).sum(0) / cnt.clamp_min(1.0)  # (T, D)
        rate = (1.0 / (self.fill_count + 1).to(x.dtype)).clamp_min(self.momentum).unsqueeze(-1)
        new = self.fill + rate * (mean - self.fill)  # (T, D)
        self.fill.copy_(torch.where(seen.unsqueeze(-1), new, self.fill))
        self.fill_count.add_(seen.long())

    @torch.no_grad()
    def update_class_freq(self, labels: torch.Tensor, task: str) -> None:
        """Running mean (then EMA at ``momentum``) of the label frequencies of training batches."""
        if task == "multiclass":
            batch = F.one_hot(labels.reshape(-1).long(), self.num_classes).float().mean(0)  # (C,)
        else:
            batch = labels.reshape(labels.shape[0], -1).float().mean(0)  # (C,)
        rate = max(1.0 / (int(self.class_count) + 1), self.momentum)
        self.class_freq.add_(rate * (batch.to(self.class_freq.dtype) - self.class_freq))
        self.class_count.add_(1)

    def _pool_fill(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Training only: per sample, the mean of ``pool_size`` random observed rows (B, T, D)."""
        B = x.shape[0]
        fill = self.fill.unsqueeze(0).expand(B, -1, -1).clone()  # (B, T, D)
        for i in range(len(self.modalities)):
            pos = (self.seg == i).nonzero().flatten()  # (T_i,)
            rows = real[:, pos].any(1).nonzero().flatten()  # (n_obs,)
            if rows.numel() == 0:
                continue
            pick = rows[torch.randint(rows.numel(), (B, self.pool_size), device=x.device)]  # (B, P)
            xt = x.detach()[:, pos][pick]  # (B, P, T_i, D)
            w = real[:, pos][pick].to(x.dtype).unsqueeze(-1)  # (B, P, T_i, 1)
            cnt = w.sum(1)  # (B, T_i, 1)
            mean = (xt * w).sum(1) / cnt.clamp_min(1.0)  # (B, T_i, D)
            fill[:, pos] = torch.where(cnt > 0, mean, fill[:, pos])
        return fill

    # ------------------------------------------------------------------ losses
    def _resolve_task(self, labels: torch.Tensor) -> str:
        C, B = self.num_classes, labels.shape[0]
        task = self.task or (
            "binary" if C == 1 else "multilabel" if labels.dim() == 2 else "multiclass"
        )
        if task == "multiclass":
            ok = labels.numel() == B and not labels.is_floating_point()
        else:
            ok = labels.numel() == B * C
        if not ok:
            raise ValueError(
                f"conf_smoe task {task!r}: labels of shape {tuple(labels.shape)} and dtype "
                f"{labels.dtype} do not fit num_classes={C}"
            )
        return task

    def _layer_losses(
        self, moe: ConfidenceMoE, info, y_tok, task, tok_w, cls_w
    ) -> dict[str, torch.Tensor]:
        """Auxiliary losses of one layer, over real tokens only.

        Args:
            moe: The layer's :class:`ConfidenceMoE`.
            info: Its per-token details (``conf``, ``eo``, ``idx``, ``scores``; N = B * T rows).
            y_tok: Per-token labels, or None (no labels: only the router loss).
            task: Resolved task, or None.
            tok_w: ``(N,)`` weight of each token: 0 for imputed tokens, else 1 or its class weight.
            cls_w: Per-element weights of the auxiliary classifier's loss (see
                :func:`true_class_prob`), or None.
        """
        conf = info["conf"]  # (N, k)
        k = conf.shape[1]
        out = {}
        if y_tok is not None:
            tcp, cls_loss = true_class_prob(moe.aux_cls(info["eo"]), y_tok, task, cls_w)  # (N, k)
            sq = (conf - tcp.detach()).pow(2)  # (N, k)
            out["conf"] = _weighted_mean(sq, tok_w.unsqueeze(1).expand(-1, k))
            out["cls"] = cls_loss
        if self.router_training == "confidence":
            s = info["scores"].gather(1, info["idx"])  # (N, k) selection scores of the picked
            t = conf.detach()
            bce = F.binary_cross_entropy_with_logits(s, t, reduction="none")  # (N, k)
            # minus the target's entropy (constant): the KL, 0 at a perfect fit; same gradient
            kl = bce - F.binary_cross_entropy(t, t, reduction="none")  # (N, k)
            real_w = (tok_w > 0).to(s.dtype).unsqueeze(1).expand(-1, k)  # (N, k)
            out["router"] = _weighted_mean(kl, real_w)
        return out

    def _post_impute(self, mod: PostImputation, h, y, real, imputed) -> torch.Tensor:
        """Stage 2 on the rows that have an imputed token; other rows are returned unchanged."""
        rows = imputed.any(1)  # (B,)
        if not self.skip_unimputed or bool(rows.all()):
            refined = mod(h, y, real)  # (B, T, D)
            return torch.where(imputed.unsqueeze(-1), refined, h)
        r = rows.nonzero().flatten()  # (R,)
        hr = h.index_select(0, r)  # (R, T, D)
        refined = mod(hr, y.index_select(0, r), real.index_select(0, r))  # (R, T, D)
        return h.index_copy(
            0, r, torch.where(imputed.index_select(0, r).unsqueeze(-1), refined, hr)
        )

    # ------------------------------------------------------------------ forward
    def forward(self, tokens, present, labels=None) -> FusionOutput:
        x = torch.cat([tokens[m].tokens for m in self.modalities], 1)  # (B, T, D)
        real = torch.cat(
            [tokens[m].mask & present[:, i : i + 1] for i, m in enumerate(self.modalities)], 1
        )  # (B, T)
        B, T, D = x.shape
        if self.seg.numel() != T:
            raise ValueError(f"conf_smoe was built for {self.seg.numel()} tokens, got {T}")
        if self.training:
            self.update_fill(x, real)
        fill = self._pool_fill(x, real) if self.training and self.pool_size > 0 else self.fill
        imputed = ~real  # (B, T)
        any_imputed = bool(imputed.any()) or not self.skip_unimputed
        h = torch.where(real.unsqueeze(-1), x, fill.expand(B, T, D))  # (B, T, D)
        h = h + self.pos_embed + self.type_embed[self.seg]

        task = y_tok = cls_w = None
        tok_w = real.reshape(B * T).to(x.dtype)  # (B*T,): imputed tokens carry no aux loss
        if labels is not None:
            task = self._resolve_task(labels)
            lab = labels.reshape(B, -1) if task != "multiclass" else labels.reshape(B, 1)  # (B, L)
            L = lab.shape[1]
            y_tok = lab.unsqueeze(1).expand(B, T, L).reshape(B * T, L)  # (B*T, L)
            if task in ("multiclass", "binary"):
                y_tok = y_tok.squeeze(-1)  # (B*T,)
            if self.training and self.class_balance:
                self.update_class_freq(labels, task)
            if self.class_balance:
                cw = class_weights(
                    lab.squeeze(-1) if task == "multiclass" else lab, self.class_freq, task
                )  # (B,) or (B, L)
                cw = cw.unsqueeze(1).expand(B, T, *cw.shape[1:]).reshape(B * T, *cw.shape[1:])
                cls_w = cw * tok_w.view(-1, *([1] * (cw.dim() - 1)))  # (B*T,) or (B*T, L)
                tok_w = cls_w if cls_w.dim() == 1 else cls_w.mean(-1)  # (B*T,)
            else:
                cls_w = tok_w if task == "multiclass" else tok_w.unsqueeze(-1)

        parts: dict[str, list[torch.Tensor]] = {"conf": [], "cls": [], "router": []}
        gates: dict[str, torch.Tensor] = {}
        idle: list[nn.Module] = []  # stage-2 modules skipped in a training step
        for layer, moe in enumerate(self.moe):
            a = self.attn[layer](self.norm1[layer](h).unsqueeze(0)).squeeze(0)  # (B, T, D)
            h = self.drop.residual(h, a)  # h + drop(a), the dropout scale folded into the add
            y, info = moe(self.norm2[layer](h))  # (B, T, D)
            h = self.drop.residual(h, y)
            key = str(layer)
            if key in self.impute and any_imputed:
                h = self._post_impute(self.impute[key], h, y, real, imputed)  # (B, T, D)
            elif key in self.impute:
                idle.append(self.impute[key])
            for name, val in self._layer_losses(moe, info, y_tok, task, tok_w, cls_w).items():
                parts[name].append(val)
            k = info["idx"].shape[1]
            probs = torch.softmax(info["clean"].detach(), -1)  # (B*T, E)
            gates[f"layer{layer}/router_probs"] = probs.view(B, T, -1)  # (B, T, E)
            gates[f"layer{layer}/confidence"] = info["conf"].detach().view(B, T, k)  # (B, T, k)
            gates[f"layer{layer}/topk_idx"] = info["idx"].view(B, T, k)  # (B, T, k)

        logits = self.out(self.norm(h).mean(1))  # (B, C)
        aux = zero_loss(logits)
        extras = {}
        for name, vals in parts.items():
            if vals:
                val = torch.stack(vals).mean()
                aux = aux + self.weights[name] * val
                extras[f"{name}_loss"] = val.detach()
        if self.training and idle and torch.is_grad_enabled():
            # With no imputed token, stage 2 changes nothing and its exact gradient is zero; a
            # zero-valued term gives its parameters that zero gradient without running it.
            aux = aux + sum(p.sum() for mod in idle for p in mod.parameters()) * 0.0
        return FusionOutput(logits, aux, gates=gates, extras=extras)
