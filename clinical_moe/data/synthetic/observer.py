"""What an observer of a synthetic stay sees, and its ceiling under any shown mask.

:func:`evidence_from_truth` turns the ``truth/stays`` (and, when there is one, ``truth/studies``)
table into the :class:`~clinical_moe.data.synthetic.ceiling.Evidence` the posterior needs;
:func:`ceiling_risk` computes the ceiling for a shown mask and the mechanism that made it
(natural, fixed pattern, MCAR with the at-least-one rescue, MAR, MNAR on the label);
:func:`add_observed_risk` writes the natural-missingness ceiling as ``observed_risk``.

Stand-in draws (see :mod:`.ceiling`): a corpus written now records every channel in
``truth/studies``. Without that table (``sample_truth``) the per-study CXR findings, devices and
ECG heart rate are drawn; a table from before the reports' facts were recorded (no ``band``
column) has the note bands and mentions drawn. The draws use random numbers keyed by stay /
study id (``missingness.stay_uniforms``), so the result is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from clinical_moe.data.synthetic import ceiling as cl

__all__ = ["add_observed_risk", "ceiling_risk", "evidence_from_truth", "truth_with_ceiling"]

K_MAX = 3  # CXR studies per stay in the window (1 + min(2, Poisson))
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (vectorised, wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def stay_uniforms(ids: np.ndarray, _seed: int, cols: int, stream: str) -> np.ndarray:
    """Uniforms ``[N, cols]`` keyed by (stream, id, column): a pure function of the stay.

    (The same idea as ``missingness.stay_uniforms``; kept here so that writing a corpus does not
    import torch.)
    """
    key = np.uint64(sum(ord(ch) * 131**k for k, ch in enumerate(stream)) % 2**61)
    rows = _splitmix(np.asarray(ids).astype(np.int64).astype(np.uint64) ^ _splitmix(key))
    c = _splitmix(np.arange(1, cols + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03))
    with np.errstate(over="ignore"):
        h = _splitmix(rows[:, None] ^ c[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _stand_in_studies(stays: pd.DataFrame, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-stay CXR findings / devices and ECG heart rate drawn from ``plan_findings`` etc."""
    n = len(ids)
    u = stay_uniforms(ids, 0, 4 * K_MAX + 1, "ceiling_studies").reshape(n, -1)  # (N, 4K+1)
    pulm = stays["pulmonary"].to_numpy() > 0
    sev = stays["severity"].to_numpy(float)
    n_cxr = stays["n_cxr"].to_numpy(int)
    findings, devices = np.zeros((n, 4), int), np.zeros((n, 2), int)
    ops, efs = np.zeros((n, K_MAX), bool), np.zeros((n, K_MAX), bool)
    for k in range(K_MAX):
        a, b, c, d = (u[:, 4 * k + j] for j in range(4))
        op = pulm & (a < 0.85)
        ef = (pulm & (b < 0.55)) | (c < 0.03)
        op = op | (pulm & ~ef)
        dev = (sev > 1.0) & (d < 0.75)
        on = k < n_cxr
        ops[:, k], efs[:, k] = op & on, ef & on
        t = np.select([op & ef, op, ef], [0, 1, 2], 3)
        findings[np.arange(n)[on], t[on]] += 1
        devices[np.arange(n)[on], np.where(dev, 0, 1)[on]] += 1
    hr = cl.HR_MEAN[0] + cl.HR_MEAN[1] * sev + cl.HR_MEAN[2] * stays["infection"].to_numpy(float)
    hr = np.clip(hr + cl.HR_SD * norm.ppf(np.clip(u[:, -1], 1e-12, 1 - 1e-12)), 40, 170)
    hr = np.where(stays["n_ecg"].to_numpy(int) > 0, hr, np.nan)
    return {"findings": findings, "devices": devices, "hr": hr, "ops": ops, "efs": efs}


def _type_counts(op: np.ndarray, ef: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Studies (or chest reports) of each stay per (opacity, effusion) type of
    ``FINDING_TYPES``, ``int[n, 4]``, from one flag pair per study and its stay row."""
    out = np.zeros((n, 4), int)
    np.add.at(out, (rows, np.select([op & ef, op, ef], [0, 1, 2], 3)), 1)
    return out


def _recorded_studies(stays: pd.DataFrame, studies: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-stay CXR findings / devices and ECG heart rate read from ``truth/studies``."""
    n = len(stays)
    pos = pd.Series(np.arange(n), index=stays["stay_id"].to_numpy(np.int64))
    win = studies[studies["in_window"].astype(str).str.lower().isin(["true", "1"])]
    cxr = win[win["modality"] == "cxr"].drop_duplicates("study_id").sort_values("study_id")
    cxr = cxr[cxr["stay_id"].notna()]
    row = pos.reindex(cxr["stay_id"].astype("int64").to_numpy()).to_numpy()
    ok = np.isfinite(row)
    row = row[ok].astype(int)
    b = lambda c: cxr[c].astype(str).str.lower().isin(["true", "1"]).to_numpy()[ok]  # noqa: E731
    op, ef, dev = b("opacity"), b("effusion"), b("devices")
    findings, devices = _type_counts(op, ef, row, n), np.zeros((n, 2), int)
    np.add.at(devices, (row, np.where(dev, 0, 1)), 1)
    rank = pd.Series(row).groupby(row).cumcount().to_numpy()
    ops, efs = np.zeros((n, K_MAX), bool), np.zeros((n, K_MAX), bool)
    keep = rank < K_MAX
    ops[row[keep], rank[keep]], efs[row[keep], rank[keep]] = op[keep], ef[keep]
    ecg = win[(win["modality"] == "ecg") & win["stay_id"].notna()]
    first = ecg.groupby(ecg["stay_id"].astype("int64"))["hr"].first()
    hr = first.reindex(stays["stay_id"].to_numpy(np.int64)).to_numpy(float)
    return {"findings": findings, "devices": devices, "hr": hr, "ops": ops, "efs": efs}


def _stand_in_notes(stays: pd.DataFrame, ids: np.ndarray, per: dict) -> tuple[np.ndarray, ...]:
    """Note bands ``[N, 3]`` and chest-report mentions ``[N, 4]`` drawn from the note generator.

    For corpora written before the reports' facts were recorded, and for :func:`sample_truth`.
    """
    n = len(ids)
    sev = stays["severity"].to_numpy(float)
    n_notes = stays["n_notes"].to_numpy(int)
    kn = max(1, int(n_notes.max(initial=0)))
    z = norm.ppf(np.clip(stay_uniforms(ids, 0, kn, "ceiling_bands"), 1e-12, 1 - 1e-12))
    noisy = sev[:, None] + cl.BAND_SD * z  # (N, kn)
    band = np.where(noisy > cl.BAND_EDGES[1], 2, np.where(noisy > cl.BAND_EDGES[0], 1, 0))
    on = np.arange(kn)[None, :] < n_notes[:, None]
    bands = np.stack([((band == b) & on).sum(1) for b in range(3)], 1)
    um = stay_uniforms(ids, 0, 2 * K_MAX, "ceiling_mentions").reshape(n, K_MAX, 2)
    mo = per["ops"] & (um[..., 0] < cl.MENTION_P["opacity"])
    me = per["efs"] & (um[..., 1] < cl.MENTION_P["effusion"])
    rep = np.arange(K_MAX)[None, :] < np.minimum(stays["n_cxr"].to_numpy(int), K_MAX)[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], rep.shape)
    return bands, _type_counts(mo[rep], me[rep], rows[rep], n)


def _recorded_notes(stays: pd.DataFrame, studies: pd.DataFrame) -> tuple[np.ndarray, ...] | None:
    """Note bands ``[N, 3]`` and chest-report mentions ``[N, 4]`` read from ``truth/studies``.

    The in-window radiology reports of each stay, exactly as written. None when the table
    predates the ``band`` column (the caller then draws stand-ins).
    """
    if "band" not in studies:
        return None
    n = len(stays)
    pos = pd.Series(np.arange(n), index=stays["stay_id"].to_numpy(np.int64))
    win = studies[studies["in_window"].astype(str).str.lower().isin(["true", "1"])]
    notes = win[(win["modality"] == "notes") & win["stay_id"].notna() & win["band"].notna()]
    row = pos.reindex(notes["stay_id"].astype("int64").to_numpy()).to_numpy()
    ok = np.isfinite(row)
    notes, row = notes[ok], row[ok].astype(int)
    bands = np.zeros((n, 3), int)
    np.add.at(bands, (row, notes["band"].astype(int).to_numpy()), 1)
    chest = notes["mentions_opacity"].notna().to_numpy()
    b = lambda c: notes[c].astype(str).str.lower().isin(["true", "1"]).to_numpy()[chest]  # noqa: E731
    return bands, _type_counts(b("mentions_opacity"), b("mentions_effusion"), row[chest], n)


def evidence_from_truth(stays: pd.DataFrame, studies: pd.DataFrame | None = None) -> cl.Evidence:
    """What each modality of each stay reveals (see :mod:`.ceiling`), from the truth tables.

    Args:
        stays: ``truth/stays`` rows.
        studies: ``truth/studies`` rows; None draws the per-study channels as stand-ins.
    """
    ids = stays["stay_id"].to_numpy(np.int64)
    sev = stays["severity"].to_numpy(float)
    if studies is None or not len(studies):
        per, stand = _stand_in_studies(stays, ids), ("cxr findings", "ecg heart rate")
    else:
        per, stand = _recorded_studies(stays, studies), ()
    notes = None if studies is None or not len(studies) else _recorded_notes(stays, studies)
    if notes is None:
        notes, stand = _stand_in_notes(stays, ids, per), ("note bands", "note mentions", *stand)
    bands, mentions = notes
    n_cxr = stays["n_cxr"].to_numpy(int)
    natural = np.stack([stays[f"has_{m}"].to_numpy(int) > 0 for m in cl.MODALITIES], 1)  # (N, 4)
    return cl.Evidence(
        stay_id=ids,
        age=stays["age"].to_numpy(float),
        severity=sev,
        infection=stays["infection"].to_numpy(float),
        cardiac=stays["cardiac"].to_numpy(float),
        in_ihm48=stays["in_ihm48"].to_numpy(int) > 0,
        natural=natural,
        n_cxr=n_cxr,
        findings=per["findings"],
        devices=per["devices"],
        hr=per["hr"],
        bands=bands,
        mentions=mentions,
        stand_ins=tuple(stand),
    )


def _full(ev: cl.Evidence, shown, modalities) -> tuple[np.ndarray, np.ndarray]:
    """Shown mask in :data:`ceiling.MODALITIES` order and the visible modalities."""
    unknown = [m for m in modalities if m not in cl.MODALITIES]
    if unknown:
        raise ValueError(f"the ceiling knows {cl.MODALITIES}, not {unknown}")
    full = np.zeros((len(ev), 4), bool)
    visible = np.zeros(4, bool)
    for j, m in enumerate(modalities):
        full[:, cl.MODALITIES.index(m)] = np.asarray(shown, dtype=bool)[:, j]
        visible[cl.MODALITIES.index(m)] = True
    return full, visible


def _spread(rates: np.ndarray, modalities) -> np.ndarray:
    """``[N, M]`` rates in model order -> ``[N, 4]`` in :data:`ceiling.MODALITIES` order."""
    out = np.zeros((len(rates), 4))
    for j, m in enumerate(modalities):
        out[:, cl.MODALITIES.index(m)] = rates[:, j]
    return out


def _all_rows_probs(present, score, rate, strength) -> np.ndarray:
    """``calibrated_probabilities`` extended to rows where a modality is absent (``[N, M]``).

    The ceiling needs the drop probability a modality *would* have had, were it present.
    """
    from clinical_moe.missingness import _rates, _standardise, calibrated_probabilities

    present = np.asarray(present, bool)
    probs = calibrated_probabilities(present, score, rate, strength)
    score = np.asarray(score, float)
    score = np.repeat(score[:, None], present.shape[1], 1) if score.ndim == 1 else score
    out = np.zeros_like(probs)
    rates = _rates(rate, present.shape[1])
    for j in range(present.shape[1]):
        rows = present[:, j]
        if rates[j] >= 1.0 or not rows.any():
            out[:, j] = rates[j]
            continue
        lin = strength * _standardise(score[:, j], rows)
        i0 = int(np.flatnonzero(rows)[0])
        p0 = float(np.clip(probs[i0, j], 1e-300, 1 - 1e-16))
        a = math.log(p0 / (1 - p0)) - lin[i0]
        out[:, j] = 0.0 if rates[j] <= 0.0 else 1 / (1 + np.exp(-(a + lin)))
    return out


def ceiling_risk(
    ev: cl.Evidence,
    shown: np.ndarray,
    mechanism: str = "natural",
    *,
    modalities: Sequence[str] = cl.MODALITIES,
    present: np.ndarray | None = None,
    rate: float | Sequence[float] = 0.0,
    pattern: Sequence[str] | None = None,
    covariate: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    strength: float = 1.0,
) -> tuple[np.ndarray, str]:
    """The ceiling P(y = 1 | what ``shown`` reveals, and the mask) for one simulated mask.

    Args:
        ev: Evidence of the stays (rows aligned with ``shown``).
        shown: ``bool[N, M]`` the mask the model is scored under, columns ``modalities``.
        mechanism: ``natural``, ``pattern``, ``mcar``, ``mar``, ``mnar`` or ``mnar_content``.
        modalities: Column names of ``shown`` (any subset of ``ehr, cxr, ecg, notes``).
        present: ``bool[N, M]`` natural presence the mask was drawn from (default: ``ev``'s).
        rate: Drop rate (float or per modality) of the random mechanisms.
        pattern: The modalities a ``pattern`` keeps.
        covariate: ``[N]`` MAR covariate (as given to the simulator).
        labels: ``[N]`` binary labels (MNAR on the label).
        strength: Logistic slope of MAR / MNAR.

    Returns:
        ``(float64[N] risk, note)``: the note says when the value is approximate or NaN.
    """
    from clinical_moe.missingness import _rates, calibrated_probabilities

    mods = tuple(modalities)
    if present is not None:
        ev = ev.with_natural(present, mods)
    nat = ev.natural[:, [cl.MODALITIES.index(m) for m in mods]]
    full, visible = _full(ev, shown, mods)
    n, ehr_nat = len(ev), ev.natural[:, 0]
    note = "exact"
    if mechanism == "natural":
        t = cl.transition(full, ehr_nat, np.zeros((n, 4)), False, visible)
        return cl.posterior_risk(ev, full, t), note
    if mechanism == "pattern":
        keep = np.array([m in tuple(pattern or ()) for m in cl.MODALITIES])
        t = cl.transition(full, ehr_nat, np.broadcast_to(1.0 - keep, (n, 4)), False, visible)
        return cl.posterior_risk(ev, full, t), note
    if mechanism == "mcar":
        rates = np.broadcast_to(_rates(rate, len(mods)), (n, len(mods)))
        t = cl.transition(full, ehr_nat, _spread(rates, mods), True, visible)
        return cl.posterior_risk(ev, full, t), note
    if mechanism == "mar":
        if covariate is None:
            return np.full(n, np.nan), "no ceiling: MAR needs its covariate"
        q = _spread(_all_rows_probs(nat, covariate, rate, strength), mods)
        t = cl.transition(full, ehr_nat, q, True, visible)
        note = (
            "approximate: drop probabilities treated as known; exact where EHR is shown, "
            "approximate where the covariate comes from hidden EHR"
        )
        return cl.posterior_risk(ev, full, t), note
    if mechanism == "mnar":
        if labels is None or np.ndim(labels) != 1:
            return np.full(n, np.nan), "no ceiling: MNAR on the label needs binary labels"
        y = np.asarray(labels, float)
        ts = []
        for v in (0.0, 1.0):
            # the drop probability each stay would have with label v, same calibration
            probs = calibrated_probabilities(nat, y, rate, strength)
            q = np.zeros_like(probs)
            for j in range(nat.shape[1]):
                rows = nat[:, j]
                vals = y[rows]
                if not rows.any() or probs[rows, j].max() <= 0 or vals.std() == 0:
                    q[:, j] = probs[rows, j].mean() if rows.any() else 0.0
                    continue
                i0 = int(np.flatnonzero(rows)[0])
                p0 = float(np.clip(probs[i0, j], 1e-300, 1 - 1e-16))
                z0 = (y[i0] - vals.mean()) / vals.std()
                a = math.log(p0 / (1 - p0)) - strength * z0
                q[:, j] = 1 / (1 + math.exp(-(a + strength * (v - vals.mean()) / vals.std())))
            ts.append(cl.transition(full, ehr_nat, _spread(q, mods), True, visible))
        return cl.posterior_risk(ev, full, ts[1], ts[0]), "exact (label-dependent drops)"
    if mechanism == "mnar_content":
        return np.full(n, np.nan), "no ceiling: drops depend on content summaries (no closed form)"
    raise ValueError(f"unknown mechanism {mechanism!r}")


def add_observed_risk(stays: pd.DataFrame, studies: pd.DataFrame | None = None) -> pd.DataFrame:
    """``stays`` with ``observed_risk``: the ceiling under natural missingness (see module doc)."""
    out = stays.copy()
    if not len(out):
        out["observed_risk"] = pd.Series(dtype=float)
        return out
    ev = evidence_from_truth(out, studies)
    out["observed_risk"] = ceiling_risk(ev, ev.natural)[0]
    return out


def truth_with_ceiling(root) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``truth/stays`` (+ ``truth/studies``) of a corpus at ``root``, ``observed_risk`` filled in.

    Corpora written before the column existed get it computed on the fly.
    """
    from pathlib import Path

    truth = Path(root) / "truth"
    stays = pd.read_csv(truth / "stays.csv.gz")
    path = truth / "studies.csv.gz"
    studies = pd.read_csv(path, low_memory=False) if path.is_file() else None
    if "observed_risk" not in stays.columns or stays["observed_risk"].isna().all():
        stays = add_observed_risk(stays, studies)
    return stays, studies
