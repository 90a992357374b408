"""MIMIC-IV event tables: icu/chartevents and hosp/labevents, driven by severity and infection.

Vitals, GCS and labs depend on ``severity`` (all of them) and ``infection`` (temperature, WBC,
heart rate) only, never on ``cardiac`` or ``pulmonary``: those stay unique to ECG and CXR.
Trajectories are a per-stay level plus AR(1) noise. A small fraction of impossible values
(heart rate 9999, SpO2 150) is injected for the loader to drop.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from clinical_moe.data.synthetic.plan import DAY, HOUR, ShardPlan
from clinical_moe.data.synthetic.schema import (
    CAP_REFILL,
    COLUMNS,
    GCS_EYE,
    GCS_MOTOR,
    GCS_VERBAL,
    GCS_VERBAL_INTUBATED,
    LAB_ITEMS,
)
from clinical_moe.data.synthetic.timeutil import fmt_datetime

CHART_MAX_DAYS = 7.0  # chart the first week of a stay at most (bounded table size)
UNITS = {
    220045: "bpm",
    220179: "mmHg",
    220180: "mmHg",
    220181: "mmHg",
    220050: "mmHg",
    220051: "mmHg",
    220052: "mmHg",
    220210: "insp/min",
    220277: "%",
    223761: "°F",
    223762: "°C",
    223835: "%",
    220621: "mg/dL",
    220274: "units",
    226730: "cm",
    226707: "Inch",
    226512: "kg",
    226531: "lbs",
    224639: "kg",
}


def _ar1(rng, n: int, sd: float, phi: float = 0.8) -> np.ndarray:
    """AR(1) noise of stationary standard deviation ``sd`` (length n)."""
    e = rng.normal(0.0, sd * np.sqrt(1 - phi**2), n)
    return lfilter([1.0], [1.0, -phi], e)


def _grid(rng, start: int, end: int, every_h: float) -> np.ndarray:
    """Chart times every ``every_h`` hours (jittered, rounded to the minute) in [start, end)."""
    first = start + rng.uniform(0.05, 0.6) * every_h * HOUR
    t = np.arange(first, end, every_h * HOUR)
    t = t + rng.uniform(0, 0.15 * every_h * HOUR, len(t))
    return (t[t < end] // 60 * 60).astype(np.int64)


class _Rows:
    """Column accumulator for one event table (avoids per-row dicts)."""

    def __init__(self):
        self.cols: dict[str, list] = {}

    def add(self, **arrays) -> None:
        n = max(len(v) for v in arrays.values() if isinstance(v, np.ndarray | list))
        for k, v in arrays.items():
            v = v if isinstance(v, np.ndarray | list) else [v] * n
            self.cols.setdefault(k, []).append(np.asarray(v, dtype=object))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({k: np.concatenate(v) if v else [] for k, v in self.cols.items()})


def _num_text(values: np.ndarray, decimals: int) -> list[str]:
    """Text of numeric values as MIMIC writes them in ``value`` (``97``, ``36.8``)."""
    if decimals == 0:
        return [str(int(v)) for v in values]
    return [f"{v:.{decimals}f}" for v in values]


def chartevents_table(
    plan: ShardPlan, rng: np.random.Generator, impossible_rate: float
) -> tuple[pd.DataFrame, int]:
    """icu/chartevents rows of the shard and the number of impossible values injected."""
    rows = _Rows()
    n_bad = 0
    weights = {}
    for stay in plan.stays:
        sid = stay["subject_id"]
        if sid not in weights:  # one body per patient: weight (kg), height (cm)
            weights[sid] = (
                float(np.clip(rng.normal(80, 18), 40, 180)),
                float(np.clip(rng.normal(170, 10), 140, 205)),
            )
        n_bad += _chart_stay(rng, rows, stay, weights[sid], impossible_rate)
    df = rows.frame()
    if len(df) == 0:
        return pd.DataFrame(columns=COLUMNS["chartevents"]), 0
    df = df.sort_values(["stay_id", "charttime", "itemid"], kind="stable")
    df["storetime"] = df["charttime"] + df["store_delay"]
    for c in ("charttime", "storetime"):
        df[c] = fmt_datetime(df[c].tolist())
    df["valuenum"] = df["valuenum"].astype(float)
    return df[COLUMNS["chartevents"]].reset_index(drop=True), n_bad


def _chart_stay(rng, rows: _Rows, stay: dict, body: tuple[float, float], bad_rate: float) -> int:
    sev, inf = stay["severity"], stay["infection"]
    start = stay["intime"]
    end = min(stay["outtime"], start + int(CHART_MAX_DAYS * DAY))
    intubated = sev > 1.0 and rng.random() < 0.8
    caregivers = rng.integers(10000, 99999, 4)
    ident = {
        "subject_id": stay["subject_id"],
        "hadm_id": stay["hadm_id"],
        "stay_id": stay["stay_id"],
    }

    def emit(times, itemid, values, decimals=0, text=None):
        n = len(times)
        if n == 0:
            return
        vals = np.round(np.asarray(values, dtype=float), decimals)
        rows.add(
            **ident,
            caregiver_id=rng.choice(caregivers, n),
            charttime=times,
            store_delay=(rng.integers(1, 90, n) * 60),
            itemid=np.full(n, itemid),
            value=text if text is not None else _num_text(vals, decimals),
            valuenum=vals,
            valueuom=np.full(n, UNITS.get(itemid), dtype=object),
            warning=np.zeros(n, dtype=int),
        )

    t = _grid(rng, start, end, 1.0)
    n = len(t)
    hr = np.clip(80 + 11 * sev + 12 * inf + rng.normal(0, 8) + _ar1(rng, n, 4), 30, 200)
    bad = rng.random(n) < bad_rate
    n_bad = int(bad.sum())
    emit(t, 220045, np.where(bad, 9999, hr))
    sbp = np.clip(122 - 12 * sev + rng.normal(0, 10) + _ar1(rng, n, 6), 60, 220)
    dbp = np.clip(0.55 * sbp + 4 + rng.normal(0, 4, n), 30, 130)
    mbp = (sbp + 2 * dbp) / 3
    art = sev > 0.3 and rng.random() < 0.6
    for itemid, v in zip(
        (220050, 220051, 220052) if art else (220179, 220180, 220181), (sbp, dbp, mbp)
    ):
        emit(t, itemid, v)
    emit(t, 220210, np.clip(17 + 3.5 * sev + 2 * inf + _ar1(rng, n, 2), 6, 50))
    spo2 = np.clip(97 - 1.5 * sev + _ar1(rng, n, 1.2), 70, 100)
    bad = rng.random(n) < bad_rate / 2
    n_bad += int(bad.sum())
    emit(t, 220277, np.where(bad, 150, spo2))

    t4 = _grid(rng, start, end, 4.0)
    n4 = len(t4)
    temp_c = 36.9 + 1.3 * inf + 0.15 * sev + _ar1(rng, n4, 0.25)
    in_f = rng.random(n4) < 0.8
    emit(t4[in_f], 223761, temp_c[in_f] * 9 / 5 + 32, 1)
    emit(t4[~in_f], 223762, temp_c[~in_f], 1)
    deficit = np.clip(np.round(2.4 * max(sev - 0.2, 0) + rng.normal(0, 1, n4)), 0, 12) / 12
    eye = (4 - np.round(3 * deficit)).astype(int)
    verbal = (5 - np.round(4 * deficit)).astype(int)
    motor = (6 - np.round(5 * deficit)).astype(int)
    emit(t4, 220739, eye, text=[GCS_EYE[s] for s in eye])
    vtext = [GCS_VERBAL_INTUBATED if intubated and s == 1 else GCS_VERBAL[s] for s in verbal]
    emit(t4, 223900, verbal, text=vtext)
    emit(t4, 223901, motor, text=[GCS_MOTOR[s] for s in motor])
    if intubated:
        emit(t4, 223835, np.clip(35 + 20 * sev + rng.normal(0, 8, n4), 21, 100))
        t8 = _grid(rng, start, end, 8.0)
        emit(t8, 220274, np.clip(7.38 - 0.05 * sev + rng.normal(0, 0.03, len(t8)), 6.8, 7.7), 2)
    t6 = _grid(rng, start, end, 6.0)
    emit(t6, 220621, np.clip(125 + 20 * sev + 15 * inf + rng.normal(0, 25, len(t6)), 40, 600))

    t0 = np.array([start + int(rng.integers(10, 120)) * 60], dtype=np.int64)
    kg, cm = body
    if rng.random() < 0.6:
        emit(t0, 226512, [kg], 1)
    else:
        emit(t0, 226531, [kg * 2.20462], 1)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            emit(t0, 226730, [cm])
        else:
            emit(t0, 226707, [cm / 2.54])
    if rng.random() < 0.4:
        t24 = _grid(rng, start, end, 24.0)
        emit(t24, 224639, kg + rng.normal(0, 1.5, len(t24)), 1)
    if rng.random() < 0.4:
        t8 = _grid(rng, start, end, 8.0)
        abnormal = (sev + rng.normal(0, 0.7, len(t8))) > 1.0
        emit(t8, 223951, np.full(len(t8), np.nan), text=[CAP_REFILL[int(a)] for a in abnormal])
    return n_bad


def _lab_values(rng, itemid: int, n: int, sev: float, inf: float) -> np.ndarray:
    """Lab values for ``n`` draws of a patient with the given severity / infection."""
    if itemid == 51301:
        return np.clip(8 + 7 * inf + 1.2 * sev + rng.normal(0, 2, n), 0.3, 60)
    if itemid == 50813:
        return np.exp(np.log(1.2) + 0.35 * sev + 0.15 * inf + rng.normal(0, 0.2, n))
    if itemid == 50912:
        return np.exp(0.3 * sev + rng.normal(0, 0.2, n))
    if itemid in (50931, 50809):
        return np.clip(125 + 20 * sev + 15 * inf + rng.normal(0, 25, n), 40, 600)
    if itemid == 50820:
        return np.clip(7.39 - 0.05 * sev + rng.normal(0, 0.03, n), 6.8, 7.7)
    return np.clip(96 - 2 * sev + rng.normal(0, 1.5, n), 60, 100)  # 50817 SpO2


def labevents_table(plan: ShardPlan, rng: np.random.Generator) -> pd.DataFrame:
    """hosp/labevents rows of the shard.

    In-hospital draws every ~12 h of the ICU stay (plus one at admission) carry the hadm_id except
    for ~12 % (ED draws); outpatient draws before the admission have no hadm_id: ~26 % null overall.
    """
    recs: list[tuple] = []
    pidx = {p["subject_id"]: p["patient_index"] for p in plan.patients}
    for stay in plan.stays:
        sev, inf = stay["severity"], stay["infection"]
        start, end = (
            stay["intime"],
            min(stay["outtime"], stay["intime"] + int(CHART_MAX_DAYS * DAY)),
        )
        draws = [stay["intime"] - int(rng.uniform(0.2, 3) * HOUR)]
        draws += [int(x) for x in _grid(rng, start, end, 12.0)]
        n_out = int(rng.integers(1, 4))
        outpatient = [stay["intime"] - int(rng.uniform(5, 400) * DAY) for _ in range(n_out)]
        gas = sev > 0.5 and rng.random() < 0.8
        for k, t in enumerate(draws + outpatient):
            inpatient = k < len(draws)
            items = [51301, 50912, 50931] + (
                [50813, 50820, 50809, 50817] if gas and inpatient else []
            )
            s, i = (sev, inf) if inpatient else (0.0, 0.0)
            hadm = stay["hadm_id"] if inpatient and rng.random() > 0.12 else None
            specimen = int(rng.integers(10_000_000, 99_999_999))
            provider = ("P" + str(int(rng.integers(10000, 99999)))) if rng.random() < 0.6 else None
            priority = "STAT" if inpatient else "ROUTINE"
            for itemid in items:
                _, _, _, unit, lo, hi, dec = LAB_ITEMS[itemid]
                v = round(float(_lab_values(rng, itemid, 1, s, i)[0]), dec)
                text = str(int(v)) if dec == 0 else f"{v:.{dec}f}"
                comments = None
                if rng.random() < 0.005:
                    text, v, comments = "___", np.nan, "___"
                abnormal = lo is not None and not np.isnan(v) and (v < lo or v > hi)
                recs.append(
                    (
                        stay["subject_id"],
                        hadm,
                        specimen,
                        itemid,
                        provider,
                        t // 60 * 60,
                        int(rng.integers(20, 240)) * 60,
                        text,
                        v,
                        unit,
                        lo,
                        hi,
                        "abnormal" if abnormal else None,
                        priority,
                        comments,
                        pidx[stay["subject_id"]],
                    )
                )
    names = [
        "subject_id",
        "hadm_id",
        "specimen_id",
        "itemid",
        "order_provider_id",
        "charttime",
        "store_delay",
        "value",
        "valuenum",
        "valueuom",
        "ref_range_lower",
        "ref_range_upper",
        "flag",
        "priority",
        "comments",
        "pidx",
    ]
    df = pd.DataFrame.from_records(recs, columns=names)
    if len(df) == 0:
        return pd.DataFrame(columns=COLUMNS["labevents"])
    df = df.sort_values(["pidx", "charttime", "itemid"], kind="stable").reset_index(drop=True)
    df["labevent_id"] = df["pidx"].astype(np.int64) * 10_000 + df.groupby("pidx").cumcount() + 1
    df["hadm_id"] = pd.array(df["hadm_id"].tolist(), dtype="Int64")
    df["storetime"] = df["charttime"] + df["store_delay"]
    for c in ("charttime", "storetime"):
        df[c] = fmt_datetime(df[c].tolist())
    for c in ("valuenum", "ref_range_lower", "ref_range_upper"):
        df[c] = df[c].astype(float)
    return df[COLUMNS["labevents"]]
