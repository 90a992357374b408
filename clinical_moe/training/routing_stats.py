"""Routing statistics of MoE heads, accumulated over an epoch from ``FusionOutput.gates``.

Heads name their routing tensors differently, so this reads what is there and skips the rest:

- ``"layer{i}/router_probs"``: ``(B, T, E)`` router probabilities per token;
- ``"layer{i}/topk"`` or ``"layer{i}/topk_idx"``: ``(B, T, k)`` chosen experts, ``-1`` at tokens
  that were not routed (padding); without it the argmax of the probabilities is used, over tokens
  whose probabilities are not all zero;
- ``"token_modality"``: ``(T,)`` modality index of each token (enables per-modality fractions);
- ``"interaction_weights"``: ``(B, K)`` (I2MoE): mean weight per interaction expert.

Statistics, per MoE layer: ``load_entropy`` (entropy of the fraction of routed assignments per
expert, divided by ``log E``: 1 = perfectly balanced, 0 = one expert takes everything),
``router_entropy`` (mean per-token entropy of the router's probabilities, also / ``log E``) and
``<modality>/expert<e>`` (fraction of that modality's assignments sent to expert e).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

_LAYER = re.compile(r"^layer(\d+)/router_probs$")


class RoutingStats:
    """Accumulates expert assignment counts over batches; :meth:`compute` gives flat metrics.

    Args:
        modalities: Modality names, indexed by ``gates["token_modality"]``.
    """

    def __init__(self, modalities: Sequence[str]) -> None:
        self.modalities = tuple(modalities)
        self.counts: dict[int, torch.Tensor] = {}  # layer -> (M or 1, E) assignment counts
        self.ent_sum: dict[int, float] = {}
        self.ent_n: dict[int, int] = {}
        self.weights_sum: torch.Tensor | None = None
        self.weights_n = 0

    def update(self, gates: Mapping[str, torch.Tensor]) -> None:
        """Add one batch's gates (any head; unknown keys are ignored)."""
        for key, probs in gates.items():
            match = _LAYER.match(key)
            if match is None or probs.dim() != 3:
                continue
            layer = int(match.group(1))
            probs = probs.detach().float().cpu()  # (B, T, E)
            B, T, E = probs.shape
            idx = gates.get(f"layer{layer}/topk", gates.get(f"layer{layer}/topk_idx"))
            if idx is not None and idx.dim() == 3 and idx.shape[:2] == (B, T):
                idx = idx.detach().long().cpu()  # (B, T, k)
                routed = (idx >= 0).any(-1)  # (B, T)
            else:
                routed = probs.sum(-1) > 0  # (B, T)
                idx = probs.argmax(-1, keepdim=True)  # (B, T, 1)
            tm = gates.get("token_modality")
            per_mod = tm is not None and tm.dim() == 1 and tm.numel() == T and self.modalities
            rows = len(self.modalities) if per_mod else 1
            counts = self.counts.setdefault(layer, torch.zeros(rows, E))
            if counts.shape != (rows, E):
                continue  # inconsistent shapes across batches: keep the first layout
            tok_mod = (
                tm.detach().long().cpu().view(1, T).expand(B, T)
                if per_mod
                else torch.zeros(B, T, dtype=torch.long)
            )  # (B, T)
            valid = (idx >= 0) & (idx < E) & routed.unsqueeze(-1)  # (B, T, k)
            flat = (tok_mod.unsqueeze(-1) * E + idx.clamp(0, E - 1))[valid]  # (N,)
            counts += torch.bincount(flat, minlength=rows * E).view(rows, E).float()
            p = probs[routed]  # (N, E)
            if p.numel():
                ent = -(p.clamp_min(1e-12).log() * p).sum(-1)  # (N,)
                self.ent_sum[layer] = self.ent_sum.get(layer, 0.0) + float(ent.sum())
                self.ent_n[layer] = self.ent_n.get(layer, 0) + p.shape[0]
        w = gates.get("interaction_weights")
        if w is not None and w.dim() == 2:
            w = w.detach().float().cpu()  # (B, K)
            if self.weights_sum is None or self.weights_sum.shape[0] != w.shape[1]:
                self.weights_sum, self.weights_n = torch.zeros(w.shape[1]), 0
            self.weights_sum += w.sum(0)
            self.weights_n += w.shape[0]

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Add another accumulator's counts (e.g. another DDP rank's); returns self."""
        for layer, c in other.counts.items():
            mine = self.counts.get(layer)
            self.counts[layer] = c.clone() if mine is None else mine + c
            self.ent_sum[layer] = self.ent_sum.get(layer, 0.0) + other.ent_sum.get(layer, 0.0)
            self.ent_n[layer] = self.ent_n.get(layer, 0) + other.ent_n.get(layer, 0)
        if other.weights_sum is not None:
            base = self.weights_sum if self.weights_sum is not None else 0
            self.weights_sum = other.weights_sum + base
            self.weights_n += other.weights_n
        return self

    def compute(self) -> dict[str, float]:
        """Flat metrics ``{"routing/layer0/load_entropy": ..., ...}`` (empty for dense heads)."""
        out: dict[str, float] = {}
        for layer, counts in sorted(self.counts.items()):
            E = counts.shape[1]
            pre = f"routing/layer{layer}"
            total = counts.sum(0)  # (E,)
            if total.sum() > 0 and E > 1:
                frac = total / total.sum()
                ent = -(frac[frac > 0] * frac[frac > 0].log()).sum()
                out[f"{pre}/load_entropy"] = float(ent) / math.log(E)
            if self.ent_n.get(layer) and E > 1:
                out[f"{pre}/router_entropy"] = self.ent_sum[layer] / self.ent_n[layer] / math.log(E)
            if counts.shape[0] == len(self.modalities) and len(self.modalities) > 0:
                for m, name in enumerate(self.modalities):
                    n = counts[m].sum()
                    if n <= 0:
                        continue
                    for e in range(E):
                        out[f"{pre}/{name}/expert{e}"] = float(counts[m, e] / n)
        if self.weights_sum is not None and self.weights_n:
            mean = self.weights_sum / self.weights_n
            names = [f"U_{m}" for m in self.modalities] + ["synergy", "redundancy"]
            if len(names) != len(mean):
                names = [str(j) for j in range(len(mean))]
            for name, v in zip(names, mean.tolist()):
                out[f"routing/interaction_weights/{name}"] = v
        return out


def routing_stats(
    gates_list: Sequence[Mapping[str, torch.Tensor]], modalities: Sequence[str]
) -> dict:
    """One-shot helper: the statistics of several batches' gates."""
    acc = RoutingStats(modalities)
    for g in gates_list:
        acc.update(g)
    return acc.compute()
