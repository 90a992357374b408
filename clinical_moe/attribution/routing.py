"""Routing analysis of MoE heads: which experts the tokens of each modality and pattern go to.

Reads the routing tensors every MoE head puts in ``FusionOutput.gates`` (eval mode, the stays as
they are):

- ``"layer{i}/router_probs"`` ``(B, T, E)``: router probabilities per token (all zero for tokens
  that were not routed, e.g. padding);
- ``"layer{i}/topk"`` or ``"layer{i}/topk_idx"`` ``(B, T, k)``: the experts each token was sent to
  (``-1`` = not routed); without it the top-1 expert (argmax) stands in;
- ``"token_modality"`` ``(T,)``: modality of each token position. When a head does not give it
  (ConfSMoE) and ``T`` equals the total number of encoder tokens, the positions are taken to be the
  modalities' tokens concatenated in modality order, which is how such heads lay them out.

Each routed token gets a *status*: ``observed`` (a real token of a modality the stay has) or
``filled`` (a position the head filled through its missing-modality path: a learned missing
embedding, a Flex-MoE bank entry, ConfSMoE's imputation). Tables (accumulated over batches, so
memory does not grow with the number of stays):

- ``routing_by_modality``: per (layer, modality, status, expert): mean and std of the router
  probability and the share of top-k assignments. Both sum to 1 over experts within a group.
- ``routing_by_pattern``: the same over the *observed* tokens of the stays of each missingness
  pattern (expert specialisation by pattern).
- ``routing_specialisation``: per layer, the normalised mutual information (scikit-learn's
  arithmetic normalisation) between the top-1 expert of observed tokens and (a) their modality,
  (b) their stay's missingness pattern: 0 = experts ignore it, 1 = the expert determines it; and
  the normalised entropy of the expert load (1 = balanced).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pandas as pd
import torch
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

_LAYER = re.compile(r"^layer(\d+)/router_probs$")
STATUSES = ("observed", "filled")


def pattern_names(present: torch.Tensor, modalities: tuple[str, ...]) -> list[str]:
    """``BoolTensor[B, M]`` -> one label per stay, e.g. ``"ehr+ecg"`` (modality order)."""
    return [
        "+".join(m for m, p in zip(modalities, row) if p) or "none"
        for row in present.cpu().tolist()
    ]


def token_layout(gates: dict, tokens: dict, modalities: tuple[str, ...], T: int):
    """``(modality index (T,), position within the modality (T,))`` of each routed position.

    Returns None when neither ``token_modality`` nor the concatenated layout fits ``T``.
    """
    tm = gates.get("token_modality")
    if tm is None or tm.dim() != 1 or tm.numel() != T:
        counts = [tokens[m].tokens.shape[1] for m in modalities]
        if sum(counts) != T:
            return None
        tm = torch.repeat_interleave(torch.arange(len(modalities)), torch.tensor(counts))
    tm = tm.detach().long().cpu()
    local = torch.zeros(T, dtype=torch.long)
    for m in range(len(modalities)):
        pos = (tm == m).nonzero().flatten()
        local[pos] = torch.arange(pos.numel())
    return tm, local


class _Acc:
    """Sums for one group of tokens: probabilities, squared probabilities, top-k counts."""

    def __init__(self, E: int) -> None:
        self.p, self.p2, self.hits, self.n = np.zeros(E), np.zeros(E), np.zeros(E), 0

    def add(self, probs: np.ndarray, hits: np.ndarray) -> None:
        self.p += probs.sum(0)
        self.p2 += (probs**2).sum(0)
        self.hits += hits.sum(0)
        self.n += probs.shape[0]


class RoutingAnalysis:
    """Accumulates routing statistics over batches; :meth:`tables` gives the DataFrames.

    Args:
        modalities: Modality names, in the model's order.
    """

    def __init__(self, modalities: tuple[str, ...]) -> None:
        self.modalities = tuple(modalities)
        self.by_modality: dict[tuple, _Acc] = {}
        self.by_pattern: dict[tuple, _Acc] = {}
        self.stays_by_pattern: dict[tuple, set] = defaultdict(set)
        self.top1_modality: dict[int, np.ndarray] = {}  # layer -> (M, E) counts
        self.top1_pattern: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        self.num_experts: dict[int, int] = {}

    def update(self, gates: dict, tokens: dict, present: torch.Tensor, ids: list[int]) -> None:
        """Add one batch: its gates, encoder outputs and natural presence ``(B, M)``."""
        patterns = pattern_names(present, self.modalities)
        for key, probs in gates.items():
            match = _LAYER.match(key)
            if match is None or probs.dim() != 3:
                continue
            layer = int(match.group(1))
            self._layer(
                layer, gates, probs.detach().float().cpu(), tokens, present.cpu(), patterns, ids
            )

    def _layer(self, layer, gates, probs, tokens, present, patterns, ids) -> None:
        B, T, E = probs.shape
        if self.num_experts.setdefault(layer, E) != E:
            raise ValueError(
                f"layer {layer}: {E} experts, earlier batches had {self.num_experts[layer]}"
            )
        idx = gates.get(f"layer{layer}/topk", gates.get(f"layer{layer}/topk_idx"))
        routed = probs.sum(-1) > 0  # (B, T)
        if idx is not None and idx.dim() == 3 and tuple(idx.shape[:2]) == (B, T):
            idx = idx.detach().long().cpu()  # (B, T, k)
            routed &= (idx >= 0).any(-1)
        else:
            idx = probs.argmax(-1, keepdim=True)  # (B, T, 1)
        hits = torch.zeros(B, T, E).scatter_add(
            2, idx.clamp(0, E - 1), (idx >= 0).float()
        )  # (B, T, E) top-k counts
        top1 = probs.argmax(-1)  # (B, T)
        layout = token_layout(gates, tokens, self.modalities, T)
        if layout is None:
            tm = torch.full((T,), -1, dtype=torch.long)
            observed = routed.clone()
        else:
            tm, local = layout
            observed = torch.zeros(B, T, dtype=torch.bool)
            for m, name in enumerate(self.modalities):
                pos = (tm == m).nonzero().flatten()
                mask = tokens[name].mask.cpu()  # (B, T_m)
                ok = pos[local[pos] < mask.shape[1]]
                observed[:, ok] = mask[:, local[ok]] & present[:, m : m + 1]
        observed &= routed
        mod_names = [*self.modalities, "all"]  # index -1 (no known layout) -> "all"
        for b in range(B):
            for m in tm.unique().tolist():
                cols = (tm == m) & routed[b]
                for status, sel in (
                    ("observed", cols & observed[b]),
                    ("filled", cols & ~observed[b]),
                ):
                    if not bool(sel.any()):
                        continue
                    key = (layer, mod_names[m], status)
                    self.by_modality.setdefault(key, _Acc(E)).add(
                        probs[b, sel].numpy(), hits[b, sel].numpy()
                    )
            sel = observed[b]
            if not bool(sel.any()):
                continue
            key = (layer, patterns[b])
            self.by_pattern.setdefault(key, _Acc(E)).add(
                probs[b, sel].numpy(), hits[b, sel].numpy()
            )
            self.stays_by_pattern[key].add(ids[b])
            counts = self.top1_pattern[layer].setdefault(patterns[b], np.zeros(E))
            counts += np.bincount(top1[b, sel].numpy(), minlength=E)
            if layout is not None:
                cm = self.top1_modality.setdefault(layer, np.zeros((len(self.modalities), E)))
                np.add.at(cm, (tm[sel].numpy(), top1[b, sel].numpy()), 1)

    # ---------------------------------------------------------------------------- tables
    @staticmethod
    def _rows(groups: dict, names: tuple[str, ...]) -> list[dict]:
        rows = []
        for key, acc in sorted(groups.items()):
            mean = acc.p / acc.n
            std = np.sqrt(np.maximum(acc.p2 / acc.n - mean**2, 0.0))
            share = acc.hits / max(acc.hits.sum(), 1.0)
            for e in range(len(mean)):
                rows.append(
                    {
                        **dict(zip(names, key)),
                        "expert": e,
                        "mean_prob": mean[e],
                        "std_prob": std[e],
                        "topk_share": share[e],
                        "n_tokens": acc.n,
                    }
                )
        return rows

    def tables(self) -> dict[str, pd.DataFrame]:
        """``routing_by_modality``, ``routing_by_pattern``, ``routing_specialisation`` (empty
        DataFrames for heads without routing)."""
        by_mod = pd.DataFrame(
            self._rows(self.by_modality, ("layer", "modality", "status")),
            columns=[
                "layer",
                "modality",
                "status",
                "expert",
                "mean_prob",
                "std_prob",
                "topk_share",
                "n_tokens",
            ],
        )
        by_pat = pd.DataFrame(
            self._rows(self.by_pattern, ("layer", "pattern")),
            columns=[
                "layer",
                "pattern",
                "expert",
                "mean_prob",
                "std_prob",
                "topk_share",
                "n_tokens",
            ],
        )
        by_pat["n_stays"] = [
            len(self.stays_by_pattern[(r.layer, r.pattern)]) for r in by_pat.itertuples()
        ]
        spec = []
        for layer, E in sorted(self.num_experts.items()):
            load = by_mod[(by_mod.layer == layer) & (by_mod.status == "observed")]
            load = load.assign(h=load.topk_share * load.n_tokens).groupby("expert").h.sum()
            pat = (
                np.array(list(self.top1_pattern[layer].values()))
                if self.top1_pattern[layer]
                else np.zeros((0, E))
            )
            spec.append(
                {
                    "layer": layer,
                    "num_experts": E,
                    "nmi_modality": _nmi(self.top1_modality.get(layer)),
                    "nmi_pattern": _nmi(pat),
                    "load_entropy": float(entropy(load.to_numpy()) / np.log(E))
                    if E > 1 and load.sum() > 0
                    else float("nan"),
                    "n_tokens": int(pat.sum()),
                }
            )
        cols = ["layer", "num_experts", "nmi_modality", "nmi_pattern", "load_entropy", "n_tokens"]
        return {
            "routing_by_modality": by_mod,
            "routing_by_pattern": by_pat,
            "routing_specialisation": pd.DataFrame(spec, columns=cols),
        }


def _nmi(contingency: np.ndarray | None) -> float:
    """Normalised mutual information of a contingency table (arithmetic-mean normalisation)."""
    if contingency is None or contingency.sum() == 0:
        return float("nan")
    c = contingency[contingency.sum(1) > 0][:, contingency.sum(0) > 0]
    h_rows, h_cols = entropy(c.sum(1)), entropy(c.sum(0))
    if h_rows == 0 or h_cols == 0:
        return 0.0 if h_rows != h_cols else 1.0
    return float(mutual_info_score(None, None, contingency=c) / ((h_rows + h_cols) / 2))
