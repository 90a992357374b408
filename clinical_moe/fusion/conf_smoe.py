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
   else ``1 - p``, averaged over labels. The label of a token is its sample's label (every token,
   imputed ones included).
   ``L_conf = MSE(c_i, stopgrad(t_i))``. No load-balance loss.
4. Post-imputation (stage 2, after the MoE of each layer in ``impute_layers``): imputed tokens
   attend (queries) to the MoE outputs of the sample's real tokens (keys / values; imputed tokens
   are never keys; optional ``topk_keys`` sparsity), residual + LN; only imputed rows change.
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

Paper defaults: D 128, S 48 tokens per modality, 4 (MIMIC) to 8 experts, top-2, 4 heads, dropout
0.1-0.4, lr 3e-4, batch 64-256, 30 epochs. Constructor defaults are small for CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from clinical_moe.fusion.backbone import GroupedSelfAttention, safe_key_mask
from clinical_moe.fusion.base import FusionHead, zero_loss
from clinical_moe.fusion.moe import Experts, Router, topk_gates
from clinical_moe.registry import HEADS
from clinical_moe.types import FusionOutput

TASKS = ("binary", "multiclass", "multilabel")
ROUTER_TRAINING = ("confidence", "none")


def true_class_prob(
    logits: torch.Tensor, y: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """TCP of an auxiliary classifier and its training loss.

    Args:
        logits: ``(N, k, C)`` auxiliary logits of each picked expert's output.
        y: Per-token labels: ``(N,)`` float (binary), ``(N,)`` long (multiclass) or ``(N, C)``
            float (multilabel).
        task: One of :data:`TASKS`.

    Returns:
        ``tcp (N, k)`` (in the graph; the caller detaches it) and the scalar classifier loss.
    """
    k = logits.shape[1]
    if task == "multiclass":
        yk = y.unsqueeze(1).expand(-1, k)  # (N, k)
        logp = F.log_softmax(logits, -1)  # (N, k, C)
        tcp = logp.gather(-1, yk.unsqueeze(-1)).squeeze(-1).exp()  # (N, k)
        return tcp, F.nll_loss(logp.reshape(-1, logits.shape[-1]), yk.reshape(-1))  # (N*k, C)
    yk = y.reshape(y.shape[0], 1, -1).expand_as(logits).to(logits.dtype)  # (N, k, C)
    p = torch.sigmoid(logits)
    tcp = torch.where(yk > 0.5, p, 1.0 - p).mean(-1)  # (N, k): mean over labels
    return tcp, F.binary_cross_entropy_with_logits(logits, yk)


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
        dropout: Dropout on attention probabilities and the residual branch.
        topk_keys: Keep only the ``topk_keys`` best-scoring real keys per query (None = all).
    """

    def __init__(
        self, d_model: int, num_heads: int, dropout: float = 0.0, topk_keys: int | None = None
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.num_heads, self.topk_keys = num_heads, topk_keys
        self.norm_q, self.norm_kv = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.kv = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model)
        self.out, self.norm_out = nn.Linear(d_model, d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, src: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``LN(h + CA(q=h, kv=src[key_mask]))`` for every token: ``(B, T, D)``."""
        B, T, D = h.shape
        H = self.num_heads
        q = self.q(self.norm_q(h)).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, dh)
        kv = self.kv(self.norm_kv(src)).view(B, T, 2, H, D // H)  # (B, T, 2, H, dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, T, dh)
        s = q @ k.transpose(-1, -2) * (D // H) ** -0.5  # (B, H, Tq, Tk)
        keep = safe_key_mask(key_mask)[:, None, None, :]  # (B, 1, 1, Tk)
        neg = torch.finfo(s.dtype).min
        if self.topk_keys is not None and self.topk_keys < T:
            kth = (
                s.masked_fill(~keep, neg).topk(self.topk_keys, -1).values[..., -1:]
            )  # (B, H, T, 1)
            keep = keep & (s >= kth)
        p = self.drop(torch.softmax(s.masked_fill(~keep, neg), -1))  # (B, H, Tq, Tk)
        o = (p @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.norm_out(h + self.drop(self.out(o)))


@HEADS.register("conf_smoe")
class ConfSMoE(FusionHead):
    """Confidence-guided sparse MoE with pre- and post-imputation of missing modalities.

    Args:
        num_layers: Transformer layers, each with a confidence-gated MoE FFN.
        num_heads: Attention heads (paper 4).
        num_experts: Experts per layer (paper 4 on MIMIC to 8).
        top_k: Experts per token (paper 2).
        hidden: Expert hidden width.
        dropout: Dropout (paper 0.1-0.4).
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
        conf_weight: Weight of ``L_conf``.
        cls_weight: Weight of the auxiliary classifier's loss.
        router_weight: Weight of the router's confidence-prediction loss.
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
        gate: str = "softmax",
        noisy: bool = True,
        normalize: bool = False,
        task: str | None = None,
        router_training: str = "confidence",
        impute_layers: Sequence[int] | None = None,
        topk_keys: int | None = None,
        momentum: float = 0.01,
        pool_size: int = 0,
        conf_weight: float = 1.0,
        cls_weight: float = 1.0,
        router_weight: float = 1.0,
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
        seg = torch.cat(
            [torch.full((self.num_tokens[m],), i) for i, m in enumerate(self.modalities)]
        )
        T = seg.numel()
        self.register_buffer("seg", seg.long(), persistent=False)  # (T,) modality id per position
        self.register_buffer("fill", torch.zeros(T, d_model))  # stage-1 running mean per position
        self.register_buffer("fill_count", torch.zeros(T, dtype=torch.long))

        self.pos_embed = nn.Parameter(torch.randn(T, d_model) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities), d_model) * 0.02)
        self.norm1 = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.attn = nn.ModuleList(
            GroupedSelfAttention(1, d_model, num_heads, dropout) for _ in range(num_layers)
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
                str(i): PostImputation(d_model, num_heads, dropout, topk_keys)
                for i in sorted(set(impute))
            }
        )
        self.drop = nn.Dropout(dropout)
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

    def _layer_losses(self, moe: ConfidenceMoE, info, y_tok, task) -> dict[str, torch.Tensor]:
        conf = info["conf"]  # (N, k)
        out = {}
        if y_tok is not None:
            tcp, cls_loss = true_class_prob(moe.aux_cls(info["eo"]), y_tok, task)  # (N, k)
            out["conf"] = F.mse_loss(conf, tcp.detach())
            out["cls"] = cls_loss
        if self.router_training == "confidence":
            s = info["scores"].gather(1, info["idx"])  # (N, k) selection scores of the picked
            out["router"] = F.binary_cross_entropy_with_logits(s, conf.detach())
        return out

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
        h = torch.where(real.unsqueeze(-1), x, fill.expand(B, T, D))  # (B, T, D)
        h = h + self.pos_embed + self.type_embed[self.seg]

        task = None
        y_tok = None
        if labels is not None:
            task = self._resolve_task(labels)
            lab = labels.reshape(B, -1) if task != "multiclass" else labels.reshape(B, 1)  # (B, L)
            y_tok = lab.unsqueeze(1).expand(B, T, lab.shape[1]).reshape(B * T, -1)  # (B*T, L)
            if task in ("multiclass", "binary"):
                y_tok = y_tok.squeeze(-1)  # (B*T,)

        parts: dict[str, list[torch.Tensor]] = {"conf": [], "cls": [], "router": []}
        gates: dict[str, torch.Tensor] = {}
        for layer, moe in enumerate(self.moe):
            a = self.attn[layer](self.norm1[layer](h).unsqueeze(0)).squeeze(0)  # (B, T, D)
            h = h + self.drop(a)
            y, info = moe(self.norm2[layer](h))  # (B, T, D)
            h = h + self.drop(y)
            key = str(layer)
            if key in self.impute and (self.training or bool(imputed.any())):
                refined = self.impute[key](h, y, real)  # (B, T, D)
                h = torch.where(imputed.unsqueeze(-1), refined, h)
            for name, val in self._layer_losses(moe, info, y_tok, task).items():
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
        return FusionOutput(logits, aux, gates=gates, extras=extras)
