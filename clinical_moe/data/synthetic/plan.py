"""Plan one shard of patients: ids, admissions, ICU stays, latents, outcomes and study times.

The plan is everything the renderers need and nothing they draw themselves: it is cheap (no images,
no signals), so :func:`clinical_moe.data.synthetic.sample_truth` can plan 50,000 patients in
seconds and get exactly the latents and labels that :func:`generate_corpus` would write.

Times are int64 seconds since 1970-01-01 (dates are shifted into 2100-2210, as in MIMIC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clinical_moe.data.synthetic import latents as lt
from clinical_moe.data.synthetic.config import SynthConfig

HOUR = 3600
DAY = 86400
YEAR_2100 = int(np.datetime64("2100-01-01T00:00:00", "s").astype(np.int64))

CAREUNITS = [
    "Medical Intensive Care Unit (MICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Medical/Surgical Intensive Care Unit (MICU/SICU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Coronary Care Unit (CCU)",
    "Trauma SICU (TSICU)",
    "Neuro Surgical Intensive Care Unit (Neuro SICU)",
]
CAREUNIT_P = [0.30, 0.14, 0.20, 0.14, 0.10, 0.08, 0.04]
ANCHOR_YEAR_GROUPS = ["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022"]

# Rates of the structures the root cohort must exclude.
CHILD_RATE = 0.02  # anchor_age < 18
TRANSFER_RATE = 0.06  # first_careunit != last_careunit
MULTI_ICU_RATE = 0.07  # admissions with two ICU stays
OUTSIDE_STUDY_RATE = 0.2  # chance of one extra CXR / ECG / report outside the pairing window


def id_stride(n_patients: int) -> int:
    """Spacing of per-patient id blocks, so that ids spread over the 8-digit MIMIC ranges."""
    return max(64, 8_000_000 // max(1, n_patients))


@dataclass
class ShardPlan:
    """Rows planned for one shard (plain dicts; renderers turn them into MIMIC tables)."""

    shard_index: int
    patients: list[dict] = field(default_factory=list)
    admissions: list[dict] = field(default_factory=list)
    stays: list[dict] = field(default_factory=list)
    # One row per study / report: kind in {"cxr", "ecg", "rr"}.
    events: list[dict] = field(default_factory=list)


def shard_rngs(cfg: SynthConfig, shard_index: int) -> dict[str, np.random.Generator]:
    """Independent random streams of one shard, one per purpose.

    Deriving them from ``SeedSequence(seed, spawn_key=(shard,))`` makes every shard reproducible on
    its own (any worker can make it) and keeps, e.g., image rendering from shifting the latents.
    """
    root = np.random.SeedSequence(cfg.seed, spawn_key=(shard_index,))
    names = ["plan", "ehr", "cxr", "ecg", "notes", "cxr_findings"]
    return {n: np.random.default_rng(s) for n, s in zip(names, root.spawn(len(names)))}


def _pick(rng: np.random.Generator, probs: list[float]) -> int:
    """Index drawn with probabilities ``probs`` (faster than ``rng.choice`` for one draw)."""
    return min(
        int(np.searchsorted(np.cumsum(probs), rng.random() * sum(probs), side="right")),
        len(probs) - 1,
    )


def _minute(t: float) -> int:
    return int(t // 60 * 60)


def _study_offsets(rng, n_in: int, los_h: float, window_h: float) -> list[float]:
    """Hours after intime of ``n_in`` studies inside the pairing window (and the stay)."""
    hi = max(0.5, min(window_h, los_h) - 0.1)
    return sorted(float(x) for x in rng.uniform(0.2, hi, n_in))


def _outside_offset(rng, stay: dict, adm: dict, window_h: float) -> float:
    """Hours after intime of a study outside the pairing window (after it, or before intime)."""
    los_h = (stay["outtime"] - stay["intime"]) / HOUR
    before_h = (stay["intime"] - adm["admittime"]) / HOUR
    if los_h > window_h + 4 and rng.random() < 0.7:
        return float(rng.uniform(window_h + 1, los_h))
    if before_h > 1.5 and rng.random() < 0.5:
        return -float(rng.uniform(0.5, before_h - 0.5))
    after_h = (adm["dischtime"] - stay["intime"]) / HOUR
    if after_h > max(los_h, window_h) + 2:
        return float(rng.uniform(max(los_h, window_h) + 1, after_h))
    return -float(rng.uniform(24, 24 * 30))  # an earlier outpatient / ED study


def plan_shard(cfg: SynthConfig, shard_index: int) -> ShardPlan:
    """Plan patients ``[shard * size, min(n, (shard + 1) * size))`` of the corpus.

    Args:
        cfg: corpus configuration.
        shard_index: which shard.

    Returns:
        The shard's :class:`ShardPlan`.
    """
    rng = shard_rngs(cfg, shard_index)["plan"]
    size = cfg.resolved_shard_size()
    start, stop = shard_index * size, min(cfg.n_patients, (shard_index + 1) * size)
    stride = id_stride(cfg.n_patients)
    plan = ShardPlan(shard_index)
    window_h = cfg.window_hours
    for i in range(start, stop):
        _plan_patient(rng, plan, i, stride, window_h)
    return plan


def _plan_patient(rng, plan: ShardPlan, i: int, stride: int, window_h: float) -> None:
    subject_id = 10_000_000 + i * stride + int(rng.integers(0, stride))
    child = rng.random() < CHILD_RATE
    age = int(rng.integers(1, 18)) if child else int(np.clip(round(rng.normal(64, 16)), 18, 91))
    anchor_year = int(rng.integers(2110, 2200))
    patient = {
        "subject_id": subject_id,
        "gender": "M" if rng.random() < 0.55 else "F",
        "anchor_age": age,
        "anchor_year": anchor_year,
        "anchor_year_group": ANCHOR_YEAR_GROUPS[int(rng.integers(0, len(ANCHOR_YEAR_GROUPS)))],
        "dod": None,
        "patient_index": i,
    }
    n_adm = 1 + _pick(rng, [0.75, 0.18, 0.07])
    year_start = YEAR_2100 + int((anchor_year - 2100) * 365.2425 * DAY)
    t = year_start + rng.uniform(0, 2 * 365 * DAY)
    n_stays = n_events = 0
    for a in range(n_adm):
        f = lt.sample_factors(rng, 1)
        f = {k: v[0] for k, v in f.items()}
        risk = float(lt.true_risk({k: np.asarray(v) for k, v in f.items()}, np.asarray(age)))
        died = bool(rng.random() < risk)
        admittime = _minute(t)
        adm = {
            "subject_id": subject_id,
            "hadm_id": 20_000_000 + i * stride + a,
            "admittime": admittime,
            "age": age,
            "ed": bool(rng.random() < 0.65),
            **{k: float(v) if k == "severity" else int(v) for k, v in f.items()},
            "true_risk": risk,
            "died": died,
            "icd_version": 9 if rng.random() < 0.45 else 10,
        }
        n_icu = 2 if rng.random() < MULTI_ICU_RATE else 1
        los = lt.sample_los_days(rng, {k: np.asarray([v] * n_icu) for k, v in f.items()})
        intime = admittime + int(min(rng.exponential(6 * HOUR), 40 * HOUR)) + int(rng.integers(60))
        stays = []
        for s in range(n_icu):
            outtime = intime + int(los[s] * DAY)
            first = CAREUNITS[_pick(rng, CAREUNIT_P)]
            last = first
            if rng.random() < TRANSFER_RATE:
                last = CAREUNITS[(CAREUNITS.index(first) + int(rng.integers(1, 7))) % 7]
            stays.append(
                {
                    "subject_id": subject_id,
                    "hadm_id": adm["hadm_id"],
                    "stay_id": 30_000_000 + i * stride + n_stays,
                    "first_careunit": first,
                    "last_careunit": last,
                    "intime": intime,
                    "outtime": outtime,
                    "los": (outtime - intime) / DAY,
                    "n_icu_in_admission": n_icu,
                }
            )
            n_stays += 1
            intime = outtime + int(rng.uniform(0.5, 3) * DAY)
        last_out = stays[-1]["outtime"]
        if died and rng.random() < 0.75:
            adm["deathtime"] = last_out - int(rng.integers(0, 1800))
        elif died:
            adm["deathtime"] = last_out + int(rng.uniform(0.5, 4) * DAY)
        else:
            adm["deathtime"] = None
        adm["dischtime"] = (
            _minute(adm["deathtime"]) if died else _minute(last_out + rng.uniform(0.3, 8) * DAY)
        )
        plan.admissions.append(adm)
        for stay in stays:
            stay.update(
                {
                    k: adm[k]
                    for k in (
                        "severity",
                        "cardiac",
                        "pulmonary",
                        "infection",
                        "true_risk",
                        "died",
                        "age",
                    )
                }
            )
            n_events = _plan_events(rng, plan, stay, adm, i, stride, n_events, window_h)
            plan.stays.append(stay)
        if died:
            patient["dod"] = adm["deathtime"]
            break
        t = adm["dischtime"] + rng.uniform(15, 600) * DAY
    if patient["dod"] is None and rng.random() < 0.08:
        patient["dod"] = plan.admissions[-1]["dischtime"] + int(rng.uniform(20, 900) * DAY)
    plan.patients.append(patient)


def _plan_events(rng, plan, stay, adm, i, stride, n_events, window_h) -> int:
    """Plan the CXR studies, ECGs and radiology reports of one stay (MNAR presence)."""
    f = {k: np.asarray(adm[k]) for k in ("severity", "cardiac", "pulmonary", "infection")}
    los_h = stay["los"] * 24
    sev = adm["severity"]
    planned: list[tuple[str, float, bool]] = []  # (kind, hours after intime, in window)
    n_cxr = 0
    if rng.random() < float(lt.presence_probability("cxr", f)):
        n_cxr = 1 + min(2, int(rng.poisson(0.3 + 0.3 * max(sev, 0.0))))
        planned += [("cxr", h, True) for h in _study_offsets(rng, n_cxr, los_h, window_h)]
    if rng.random() < OUTSIDE_STUDY_RATE:
        planned.append(("cxr", _outside_offset(rng, stay, adm, window_h), False))
    if rng.random() < float(lt.presence_probability("ecg", f)):
        n_ecg = 1 + min(2, int(rng.poisson(0.25)))
        planned += [("ecg", h, True) for h in _study_offsets(rng, n_ecg, los_h, window_h)]
    if rng.random() < OUTSIDE_STUDY_RATE:
        planned.append(("ecg", _outside_offset(rng, stay, adm, window_h), False))
    if n_cxr == 0 and rng.random() < float(lt.presence_probability("notes_other", f)):
        planned += [("rr", h, True) for h in _study_offsets(rng, 1, los_h, window_h)]
    if rng.random() < OUTSIDE_STUDY_RATE:
        planned.append(("rr", _outside_offset(rng, stay, adm, window_h), False))
    for kind, hours, in_window in planned:
        if n_events >= stride:  # id block of this patient is full (only for huge corpora)
            break
        base = {"cxr": 50_000_000, "ecg": 40_000_000, "rr": 0}[kind]
        plan.events.append(
            {
                "kind": kind,
                "subject_id": stay["subject_id"],
                "hadm_id": stay["hadm_id"],
                "stay_id": stay["stay_id"],
                "time": stay["intime"] + int(hours * HOUR),
                "in_window": in_window,
                "study_id": base + i * stride + n_events if base else None,
                "severity": sev,
                "pulmonary": adm["pulmonary"],
                "cardiac": adm["cardiac"],
                "infection": adm["infection"],
            }
        )
        n_events += 1
    return n_events
