"""Per-stay ranking figures: do the modalities that carry a stay's risk factor rank first?

All functions take ``(N, M)`` arrays of per-modality values (attributions or true effects) and a
``(N, M)`` presence mask, and return one value per stay; absent modalities never take part.
"""

from __future__ import annotations

import math

import numpy as np


def carriers_on_top(values: np.ndarray, has: np.ndarray, idx: list[int]) -> np.ndarray:
    """Per stay: 1.0 if every carrier outranks every other present modality, else 0.0.

    Ties count as a miss; NaN when a present modality has a NaN value. ``values`` and ``has``
    are ``(N, M)``; a stay with no other present modality scores 1.
    """
    v = np.where(has, values, np.nan)  # (N, M)
    others = has.copy()
    others[:, idx] = False
    low = np.min(v[:, idx], axis=1)  # (N,) weakest carrier
    high = np.max(np.where(others, v, -np.inf), axis=1)  # (N,) strongest other
    out = (low > high).astype(float)
    out[~np.isfinite(np.where(has, values, 0.0)).all(1)] = np.nan
    return out


def carrier_share(values: np.ndarray, has: np.ndarray, idx: list[int]) -> np.ndarray:
    """Per stay: the carriers' share of the total |value| over present modalities (NaN if 0)."""
    a = np.abs(np.where(has, values, 0.0))  # (N, M)
    total = a.sum(1)
    return np.divide(a[:, idx].sum(1), total, out=np.full(len(a), np.nan), where=total > 0)


def chance_top(k: np.ndarray, c: int) -> np.ndarray:
    """Probability that ``c`` given modalities rank first among ``k`` at random: 1 / C(k, c)."""
    return np.array([1.0 / math.comb(int(n), c) for n in k])
