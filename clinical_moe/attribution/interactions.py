"""I2MoE interaction weights per stay and averaged (Xin et al., ICML 2025).

I2MoE's reweighting model gives each stay a weight per interaction expert
(``FusionOutput.gates["interaction_weights"]``, ``(B, M + 2)``): one *uniqueness* expert ``U_m`` per
modality, a *synergy* expert and a *redundancy* expert; the prediction is the weighted sum of the
experts' logits. With the head's default ``uniqueness_inputs="own"``, ``U_m`` reads modality m
only, so its weight says how much the mixture leans on that modality's own prediction. The head
renormalises over the modalities a stay has: ``U_m`` of an absent modality gets weight exactly 0
and the weights of each stay sum to 1.

Tables:

- ``interactions``: one row per stay (stay id, missingness pattern, one column per expert);
- ``interaction_summary``: mean weights over all stays (``group = "all"``) and per pattern, with
  the number of stays. Means of ``U_m`` are over the stays that have modality m (an absent
  modality's structural zero would otherwise dilute it); synergy and redundancy over all stays.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from clinical_moe.attribution.routing import pattern_names

KEY = "interaction_weights"


def expert_names(head, modalities: tuple[str, ...], num: int) -> list[str]:
    """Names of the interaction weights: the head's own, else ``U_<m>``, synergy, redundancy."""
    names = list(getattr(head, "expert_names", ()) or ())
    if len(names) == num:
        return names
    if num == len(modalities) + 2:
        return [f"U_{m}" for m in modalities] + ["synergy", "redundancy"]
    return [f"w{j}" for j in range(num)]


class InteractionWeights:
    """Collects interaction weights over batches (a no-op for heads that have none).

    Args:
        head: The fusion head (for its expert names).
        modalities: Modality order.
    """

    def __init__(self, head, modalities: tuple[str, ...]) -> None:
        self.head, self.modalities = head, tuple(modalities)
        self.rows: list[dict] = []
        self.names: list[str] | None = None

    def update(self, gates: dict, present: torch.Tensor, ids: list[int]) -> None:
        """Add one batch's ``gates`` with its natural presence ``(B, M)`` and stay ids."""
        w = gates.get(KEY)
        if w is None or w.dim() != 2:
            return
        w = w.detach().float().cpu().numpy()  # (B, K)
        self.names = self.names or expert_names(self.head, self.modalities, w.shape[1])
        for sid, pattern, row in zip(ids, pattern_names(present, self.modalities), w):
            self.rows.append(
                {"stay_id": int(sid), "pattern": pattern, **dict(zip(self.names, row.tolist()))}
            )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``interactions`` and ``interaction_summary`` (empty when the head has no weights)."""
        if not self.rows:
            return {
                "interactions": pd.DataFrame(columns=["stay_id", "pattern"]),
                "interaction_summary": pd.DataFrame(columns=["group", "n_stays"]),
            }
        per = pd.DataFrame(self.rows)
        summary = [_mean_weights(per, self.names, self.modalities, "all")]
        for pattern, part in per.groupby("pattern", sort=True):
            summary.append(_mean_weights(part, self.names, self.modalities, pattern))
        return {"interactions": per, "interaction_summary": pd.DataFrame(summary)}


def _mean_weights(df: pd.DataFrame, names: list[str], modalities, group: str) -> dict:
    out: dict = {"group": group, "n_stays": len(df)}
    has = {f"U_{m}": df["pattern"].str.split("+").apply(lambda p, m=m: m in p) for m in modalities}
    for name in names:
        sel = has.get(name)
        vals = df[name] if sel is None else df.loc[sel, name]
        out[name] = float(vals.mean()) if len(vals) else np.nan
    return out
