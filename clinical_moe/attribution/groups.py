"""Groups of stays whose risk the synthetic truth says one modality (or one pair) should explain.

Definitions (``truth/stays.csv.gz`` factors; SYNTHETIC.md):

- ``cardiac_only``: ``cardiac = 1``, ``pulmonary = 0``, ``infection = 0``, ``|severity| <= s``;
  the stay has the ECG and at least one other modality. Expected on top: **ECG**.
- ``pulmonary_only``: ``pulmonary = 1``, ``cardiac = 0``, ``infection = 0``, ``|severity| <= s``;
  the stay has the CXR and at least one other modality. Expected on top: **CXR**.
- ``synergy``: ``pulmonary = 1`` and ``infection = 1`` (the interaction term acts; the other
  factors free); the stay has the CXR and the EHR. Expected on top: **CXR and EHR together**. Its
  ranking figures use the stays with at least three modalities (with only CXR and EHR the pair is
  on top by construction); the I2MoE synergy weight uses all of them.

The severity bound ``s`` keeps the redundant severity signal (EHR, notes) from swamping the
factor. It starts tight (0.5 SD) and is widened per group along :data:`SEVERITY_BOUNDS` until the
group has ``min_n`` stays (default 50) among the attributed ones, so a small split is not left with
a handful of stays and a large one keeps the clean definition; the bound used is reported with
the group. A fixed ``severity_max`` disables the widening.

These factor-only groups do **not** isolate stays driven by one factor: on the 20,000-patient
benchmark the ideal observer (:mod:`.observer`) itself puts the ECG first by |Shapley| on a third
of ``cardiac_only`` and the CXR first on 2% of ``pulmonary_only`` (EHR revealing an ordinary
severity and no infection moves the log-odds more than the factor does; see :mod:`.observer`).
They are kept as secondary figures. The **single-factor groups** of the issue-12 target are:

- ``single_factor_<factor>`` (:data:`SINGLE_FACTORS`): the factor is 1, every other disease factor
  (cardiac, pulmonary, infection) is 0, the carrier is present with at least one other modality,
  and the ideal observer gives the carrier more than :data:`DOMINANCE` (half) of the stay's total
  |Shapley|: the one factor's modality accounts for most of what the stay's modalities reveal
  about its risk, so a faithful attribution must rank it first (the observer does, by
  construction: oracle 1). Severity and age are left free; they enter through the observer.
- ``factor_only_<factor>``: the same without the dominance condition (all one-factor stays); its
  figure is the agreement of the top modality with the observer's (oracle 1, n >= 50).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

SEVERITY_BOUNDS = (0.5, 0.75, 1.0, 1.5, 2.0, math.inf)
MIN_N = 50
GROUP_COLUMNS = ["group", "expected_top", "definition", "severity_max", "n_stays", "warning"]
DISEASE = ("cardiac", "pulmonary", "infection")
#: Single-factor groups of the issue-12 target: factor -> its carrying modality.
SINGLE_FACTORS = {"cardiac": "ecg", "pulmonary": "cxr"}
#: The carrier's least share of the ideal observer's total |Shapley| in a single-factor stay.
DOMINANCE = 0.5


@dataclass(frozen=True)
class GroupSpec:
    """One group of stays (see the module docstring).

    Attributes:
        name: Group name.
        on: Factors that must be 1.
        off: Factors that must be 0.
        carriers: Modalities that must be present and should rank on top.
        bound_severity: Whether ``|severity|`` is bounded.
    """

    name: str
    on: tuple[str, ...]
    off: tuple[str, ...]
    carriers: tuple[str, ...]
    bound_severity: bool

    def describe(self, severity_max: float) -> str:
        """The definition in words, with the severity bound used."""
        parts = [f"{f} = 1" for f in self.on] + [f"{f} = 0" for f in self.off]
        if self.bound_severity and np.isfinite(severity_max):
            parts.append(f"|severity| <= {severity_max:g} SD")
        has = " and ".join(m.upper() for m in self.carriers)
        extra = " + at least one other modality" if len(self.carriers) == 1 else ""
        return f"{', '.join(parts)}; has {has}{extra}"


GROUP_SPECS = (
    GroupSpec("cardiac_only", ("cardiac",), ("pulmonary", "infection"), ("ecg",), True),
    GroupSpec("pulmonary_only", ("pulmonary",), ("cardiac", "infection"), ("cxr",), True),
    GroupSpec("synergy", ("pulmonary", "infection"), (), ("cxr", "ehr"), False),
)


def _members(spec: GroupSpec, x: pd.DataFrame, has: pd.DataFrame, severity_max: float) -> pd.Series:
    """Boolean membership of every stay of ``x`` (indexed by stay id)."""
    sel = pd.Series(True, index=x.index)
    for f in spec.on:
        sel &= x[f] == 1
    for f in spec.off:
        sel &= x[f] == 0
    if spec.bound_severity and np.isfinite(severity_max):
        sel &= x["severity"].abs() <= severity_max
    for m in spec.carriers:
        sel &= has[f"has_{m}"].astype(bool)
    if len(spec.carriers) == 1:
        sel &= has.astype(bool).sum(axis=1) >= 2
    return sel


def assign_groups(
    factors: pd.DataFrame,
    present: pd.DataFrame,
    modalities: tuple[str, ...],
    min_n: int = MIN_N,
    severity_max: float | None = None,
) -> tuple[pd.Series, pd.DataFrame]:
    """The group of every stay and the definitions used.

    Args:
        factors: ``stay_id`` + ``severity``, ``cardiac``, ``pulmonary``, ``infection``.
        present: ``stay_id`` + ``has_<m>`` of the stays to group (e.g. the attributed ones).
        modalities: Modality order; a group whose carriers are not all modelled is skipped.
        min_n: Widen the severity bound until a group has this many stays.
        severity_max: A fixed severity bound (no widening); None = widen from 0.5 SD.

    Returns:
        ``(group per stay_id of present ("other" outside every group), definitions table)``;
        the table has :data:`GROUP_COLUMNS`.
    """
    p = present.drop_duplicates("stay_id").set_index("stay_id")
    x = factors.drop_duplicates("stay_id").set_index("stay_id").reindex(p.index)
    known = x[["severity", "cardiac", "pulmonary", "infection"]].notna().all(axis=1)
    has = p[[f"has_{m}" for m in modalities]]
    group = pd.Series("other", index=p.index, dtype=object)
    rows = []
    for spec in GROUP_SPECS:
        if not set(spec.carriers) <= set(modalities):
            continue
        bounds = (severity_max,) if severity_max is not None else SEVERITY_BOUNDS
        if not spec.bound_severity:
            bounds = (math.inf,)
        for bound in bounds:
            sel = _members(spec, x, has, bound) & known
            if sel.sum() >= min_n:
                break
        group[sel & (group == "other")] = spec.name
        n = int((group == spec.name).sum())
        rows.append(
            {
                "group": spec.name,
                "expected_top": " + ".join(spec.carriers),
                "definition": spec.describe(bound),
                "severity_max": float(bound) if spec.bound_severity else math.nan,
                "n_stays": n,
                "warning": f"small n (< {min_n}): read the CI" if n < min_n else "",
            }
        )
    return group, pd.DataFrame(rows, columns=GROUP_COLUMNS)


def single_factor_groups(
    factors: pd.DataFrame,
    has: np.ndarray,
    observer: np.ndarray,
    modalities: tuple[str, ...],
    dominance: float = DOMINANCE,
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """The single-factor groups of the issue-12 target (see the module docstring).

    Args:
        factors: ``cardiac``, ``pulmonary``, ``infection`` of the stays (rows aligned with
            ``has``).
        has: ``(N, M)`` presence.
        observer: ``(N, M)`` the ideal observer's Shapley values (:mod:`.observer`).
        modalities: Modality order.
        dominance: The carrier's least share of the observer's total |Shapley| (strictly more).

    Returns:
        ``{factor: (factor_only mask, single_factor mask, carrier index)}`` for every factor of
        :data:`SINGLE_FACTORS` whose carrier is modelled; masks are ``bool[N]``.
    """
    out = {}
    a = np.abs(np.where(has, observer, 0.0))  # (N, M)
    total = a.sum(1)
    for factor, carrier in SINGLE_FACTORS.items():
        if carrier not in modalities:
            continue
        c = modalities.index(carrier)
        only = factors[factor].to_numpy() == 1
        for other in DISEASE:
            if other != factor:
                only &= factors[other].to_numpy() == 0
        only &= has[:, c] & (has.sum(1) >= 2)
        share = np.divide(a[:, c], total, out=np.zeros(len(a)), where=total > 0)
        out[factor] = (only, only & (share > dominance), c)
    return out


def describe_single_factor(factor: str, dominated: bool, dominance: float = DOMINANCE) -> str:
    """The definition of a single-factor group in words."""
    off = ", ".join(f"{f} = 0" for f in DISEASE if f != factor)
    carrier = SINGLE_FACTORS[factor].upper()
    text = f"{factor} = 1, {off}; has {carrier} + at least one other modality"
    if dominated:
        text += f"; {carrier} > {dominance:g} of the ideal observer's total |Shapley|"
    return text
