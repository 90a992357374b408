"""The ideal observer's attributions: the modality game played by the Bayes-optimal model.

The heads' modality Shapley values (:mod:`.shapley`) explain the game
``v_b(S) = log-odds when the model sees only the modalities in S`` against
``v_b({}) = logit(prevalence)``. The synthetic corpus lets us play the *same* game with the
model that decodes every shown modality perfectly: ``v*_b(S) = logit P(y = 1 | what the
modalities in S reveal, S shown)``, in closed form from the generative story
(:func:`clinical_moe.data.synthetic.ceiling.posterior_risk`; what each modality reveals is
documented there), and ``v*({})`` is the cohort's prevalence, the heads' own baseline.

What "not in S" says is the one choice, and it must be the heads' own. A head shows a removed
modality through its missing path, and that path learned from every training row where the
modality was missing: the naturally absent ones (informative in MIMIC: an ECG is ordered for a
reason) and the ones train-time modality dropout hid (``train.modality_dropout`` = r, each
present modality dropped w.p. r, at least one kept). So the Bayes-optimal model of the *head's*
training distribution, scored on the coalition S, is the ceiling under exactly that mechanism:
natural presence, then MCAR(r) with the at-least-one rescue (``dropout=r`` here; the ceiling's
``mcar`` transition). Scoring a head trained with r = 0.3 against an observer for whom a hidden
modality says nothing made every head's EHR-only value look 0.3 log-odds too low (issue 12):
the head had correctly learned that a missing ECG is usually a natural absence.
``dropout=0`` keeps the presence-blind game (a hidden modality may or may not exist, its
absence says nothing), the only defined one for a head never trained with hidden modalities.

From the ``2^M`` values per stay this module returns, per present modality,

- ``observer_shapley_<m>``: the exact Shapley value of ``v*`` (log-odds);
- ``observer_ablation_<m>``: ``risk*(present) - risk*(present \\ {m})`` (the heads' modality
  ablation, in risk; NaN where m is absent or the only modality);

``observer_interaction_cxr_ehr``: the Shapley interaction index of CXR and EHR (Grabisch &
Roubens 1999), which is large and positive where the pulmonary x infection term fires; and
``observer_coalition_<S>`` (e.g. ``observer_coalition_ehr+ecg``): ``v*(S)`` itself, NaN where the
stay lacks a modality of S, beside the heads' ``coalition_<S>`` columns of ``per_stay``
(:mod:`.agreement` compares them).

Why this and not a linear split of the outcome logit (:func:`.faithfulness.true_effects`): the
baseline is the log-odds of the *mean* risk, about 1.1 above the mean log-odds in this corpus
(severity is a strong continuous factor and the sigmoid is convex at low risk), so an EHR that
reveals an ordinary severity *lowers* the observer's log-odds by about one unit on most stays;
and an ECG that reveals "no cardiac disease" lowers it by about half a unit. A linear split
centred on the factors' means misses both, which is why it scored the pulmonary-only group's
CXR top-1 at 0.3 against itself.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from clinical_moe.attribution.game import coalition_code, coalition_name

#: Columns of ``truth/stays.csv.gz`` the observer needs besides the factors.
NEEDS = ("age", "in_ihm48", "n_cxr", "n_notes", "has_ehr", "has_cxr", "has_ecg", "has_notes")


def coalition_values(
    ev, has: np.ndarray, modalities: tuple[str, ...], dropout: float = 0.0
) -> dict[tuple, np.ndarray]:
    """``v*(S)`` (log-odds) for every coalition ``S`` (a 0/1 tuple over ``modalities``).

    Args:
        ev: :class:`~clinical_moe.data.synthetic.ceiling.Evidence` of the stays.
        has: ``bool[N, M]`` presence of the stays in model order.
        modalities: Model modalities (a subset of the ceiling's).
        dropout: The head's train-time modality dropout rate r: a hidden modality is then
            naturally absent or dropped w.p. r (at least one kept), as in its training. 0: a
            hidden modality says nothing (see the module docstring).

    Returns:
        ``{bits: float64[N]}``; ``v*(S)`` equals ``v*(S ∩ present)`` by construction. The empty
        coalition is the cohort's prior risk under either game (no row is ever shown nothing).
    """
    from clinical_moe.data.synthetic import ceiling as cl

    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    cols = [cl.MODALITIES.index(m) for m in modalities]
    visible = np.zeros(4, bool)
    visible[cols] = True
    out = {}
    for bits in itertools.product((0, 1), repeat=len(modalities)):
        shown = np.zeros((len(has), 4), bool)
        shown[:, cols] = has & np.array(bits, bool)[None, :]  # (N, 4)
        # hidden = dropped for sure: its absence says nothing
        t = cl.transition(shown, ev.natural[:, 0], 1.0 - shown.astype(float), False, visible)
        if dropout > 0:  # the head's training: natural presence, then MCAR(r) with rescue
            rates = np.broadcast_to(np.where(visible, dropout, 0.0), (len(has), 4))
            mech = cl.transition(shown, ev.natural[:, 0], rates, True, visible)  # (N, 8)
            t = np.where(shown.any(1, keepdims=True), mech, t)  # nothing shown: the prior
        risk = np.clip(cl.posterior_risk(ev, shown, t), 1e-12, 1 - 1e-12)
        out[bits] = logit(risk)
    return out


def shapley_from_values(values: dict[tuple, np.ndarray], num: int) -> np.ndarray:
    """Exact Shapley values ``(N, M)`` of a game given as ``{bits: v[N]}`` over ``num`` players."""
    n = len(next(iter(values.values())))
    phi = np.zeros((n, num))
    for m in range(num):
        for bits in values:
            if bits[m]:
                continue
            k = sum(bits)
            w = math.factorial(k) * math.factorial(num - k - 1) / math.factorial(num)
            with_m = bits[:m] + (1,) + bits[m + 1 :]
            phi[:, m] += w * (values[with_m] - values[bits])
    return phi


def interaction_index(values: dict[tuple, np.ndarray], i: int, j: int, num: int) -> np.ndarray:
    """Shapley interaction index of players ``i`` and ``j`` (Grabisch & Roubens 1999), ``[N]``."""
    n = len(next(iter(values.values())))
    out = np.zeros(n)
    for bits in values:
        if bits[i] or bits[j]:
            continue
        k = sum(bits)
        w = math.factorial(k) * math.factorial(num - k - 2) / math.factorial(num - 1)

        def put(b, x, v):
            return b[:x] + (v,) + b[x + 1 :]

        bi, bj = put(bits, i, 1), put(bits, j, 1)
        bij = put(bi, j, 1)
        out += w * (values[bij] - values[bi] - values[bj] + values[bits])
    return out


def observer_attributions(
    truth_dir: str | Path,
    present: pd.DataFrame,
    modalities: tuple[str, ...],
    dropout: float = 0.0,
) -> tuple[pd.DataFrame | None, str]:
    """The ideal observer's attributions of the stays in ``present`` (see the module docstring).

    Args:
        truth_dir: The corpus's ``truth/`` folder (``stays.csv.gz``, optional ``studies.csv.gz``).
        present: ``stay_id`` + ``has_<m>`` (model order) of the attributed stays.
        modalities: Model modalities.
        dropout: The attributed head's ``train.modality_dropout`` (see :func:`coalition_values`).

    Returns:
        ``(table or None, reason)``: ``stay_id``, ``observer_shapley_<m>``,
        ``observer_ablation_<m>``, ``observer_interaction_cxr_ehr`` (NaN without both), and
        ``observer_log_odds``; None with the reason when the truth cannot support it.
    """
    from clinical_moe.data.synthetic import ceiling as cl
    from clinical_moe.data.synthetic.observer import evidence_from_truth

    if not set(modalities) <= set(cl.MODALITIES):
        return None, f"the observer knows {cl.MODALITIES}, not {modalities}"
    truth_dir = Path(truth_dir)
    stays = pd.read_csv(truth_dir / "stays.csv.gz")
    missing = [c for c in NEEDS if c not in stays]
    if missing:
        return None, f"truth/stays.csv.gz lacks {missing}"
    p = present.drop_duplicates("stay_id")
    p = p[p["stay_id"].isin(stays["stay_id"])].reset_index(drop=True)
    if not len(p):
        return None, "no attributed stay is in the truth"
    rows = stays.drop_duplicates("stay_id").set_index("stay_id").loc[p["stay_id"]].reset_index()
    studies = None
    if (truth_dir / "studies.csv.gz").is_file():
        studies = pd.read_csv(truth_dir / "studies.csv.gz")
        studies = studies[studies["stay_id"].isin(p["stay_id"])]
    has = p[[f"has_{m}" for m in modalities]].to_numpy(bool)  # (N, M)
    ev = evidence_from_truth(rows, studies).with_natural(has, modalities)
    values = coalition_values(ev, has, modalities, dropout)
    num = len(modalities)
    phi = np.where(has, shapley_from_values(values, num), 0.0)  # (N, M)
    full = values[(1,) * num]
    out = {"stay_id": p["stay_id"].to_numpy()}
    for j, m in enumerate(modalities):
        drop = tuple(0 if k == j else 1 for k in range(num))
        abl = expit(full) - expit(values[drop])
        abl = np.where(has[:, j] & (has.sum(1) > 1), abl, np.nan)
        out[f"observer_shapley_{m}"] = phi[:, j]
        out[f"observer_ablation_{m}"] = abl
    inter = np.full(len(p), np.nan)
    if {"cxr", "ehr"} <= set(modalities) and num >= 2:
        i, j = modalities.index("cxr"), modalities.index("ehr")
        both = has[:, i] & has[:, j]
        inter = np.where(both, interaction_index(values, i, j, num), np.nan)
    out["observer_interaction_cxr_ehr"] = inter
    out["observer_log_odds"] = full
    # v*(S) where the stay has S, named and ordered as the heads' coalition_<S> columns
    for bits in sorted(values, key=coalition_code):
        if any(bits):
            within = (has | ~np.array(bits, bool)[None, :]).all(1)
            name = coalition_name(coalition_code(bits), modalities)
            out[f"observer_coalition_{name}"] = np.where(within, values[bits], np.nan)
    return pd.DataFrame(out), ""
