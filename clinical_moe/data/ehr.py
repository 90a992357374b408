"""EHR time series from MIMIC-IV ``icu/chartevents`` and ``hosp/labevents``.

The clinical variables (the 17 of mimic3-benchmarks plus a few labs) are mapped by itemid from a
data file, ``resources/variables.csv``, that users can copy and extend (:func:`load_variables`,
:mod:`clinical_moe.data.ehr_variables`, which also holds the value cleaning).
Events are streamed in chunks and filtered to the cohort's stays and the mapped itemids before
anything else, so the tens-of-GB chartevents is never loaded whole. Lab rows are assigned to stays
by subject_id and charttime inside the stay (their hadm_id is often null), not by hadm_id.

Cleaning, per variable: text values (GCS, capillary refill) become numbers, units are converted
(F -> C, inch -> cm, lb -> kg, FiO2 percent -> fraction), impossible values (outside
``valid_low``/``valid_high``) and unparseable ones are dropped and counted in
:attr:`EhrEvents.dropped`, and the GCS total is the sum of the three components charted at the same
time. The result is an irregular, long-format event table (hours since ICU intime) that
:func:`to_arrays` / :func:`time_series` turn into the raw ``ehr`` input schema of ``types.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data import damage
from clinical_moe.data.ehr_variables import (
    DEFAULT_VARIABLES_FILE,
    SOURCES,
    TEXT_VALUES,
    clean_events,
    gcs_total,
    load_variables,
    variable_names,
)
from clinical_moe.data.tables import TableError, find_table, iter_table, parse_times

__all__ = [
    "ADMISSION_TYPES",
    "DEFAULT_VARIABLES_FILE",
    "TEXT_VALUES",
    "EhrEvents",
    "EhrNormalizer",
    "EhrTimeSeries",
    "load_ehr_events",
    "load_variables",
    "observed_stays",
    "static_features",
    "time_series",
    "to_arrays",
    "variable_names",
]

logger = logging.getLogger(__name__)


@dataclass
class EhrEvents:
    """Cleaned, windowed EHR events of a cohort, in long format.

    Attributes:
        events: One row per (stay, time, variable) with columns ``stay_id`` (int64), ``hours``
            (float64, hours since ICU intime), ``var_idx`` (int64, column in ``variables``),
            ``variable`` (categorical over ``variables``) and ``value`` (float64, in ``to_unit``).
            Repeated measurements of a variable at the same time are averaged. Sorted by stay_id,
            hours, var_idx.
        variables: Variable names; ``var_idx`` indexes this tuple.
        dropped: Per variable, counts of dropped values by reason (``unparseable``,
            ``out_of_range``), for the preprocessing summary.
        missing_sources: Event tables that were absent (e.g. ``("chartevents",)``).
        window_stays: Stays with at least one row of a mapped itemid in the window, before
            values are parsed or range-checked: what :func:`observed_stays` returns, so that
            cohort building need not stream the event tables a second time.
    """

    events: pd.DataFrame
    variables: tuple[str, ...]
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_sources: tuple[str, ...] = ()
    window_stays: frozenset[int] = frozenset()


@dataclass
class EhrTimeSeries:
    """One stay's irregular multivariate series in the raw ``ehr`` input schema.

    Attributes:
        stay_id: The ICU stay.
        times: float32 (L,), hours since intime, strictly increasing; L = the number of distinct
            observation times (union over variables).
        values: float32 (L, V); 0.0 where not observed.
        obs_mask: bool (L, V); True = observed.
        variables: The V variable names.
    """

    stay_id: int
    times: np.ndarray
    values: np.ndarray
    obs_mask: np.ndarray
    variables: tuple[str, ...]


def _windowed_chunks(
    root,
    source: str,
    stays: pd.DataFrame,
    itemids: Iterable[int],
    columns: list[str],
    window_start_hours: float,
    window_hours: float | None,
    chunksize: int,
) -> Iterator[pd.DataFrame]:
    """Yield chunks of ``source`` filtered to ``itemids`` and to the stays' time windows.

    chartevents is matched on stay_id; labevents on subject_id plus charttime inside the window,
    because its hadm_id is often null. Each yielded chunk has ``stay_id`` and ``hours``.
    """
    missing = [c for c in ("subject_id", "stay_id", "intime", "outtime") if c not in stays.columns]
    if missing:
        raise ValueError(f"stays lack column(s) {missing}; pass one row per stay (build_cohort)")
    table = SOURCES[source]
    key = "stay_id" if source == "chartevents" else "subject_id"
    itemids = pd.array(sorted(set(itemids)), dtype="Int64")
    keys = pd.array(stays[key].dropna().unique(), dtype="Int64")
    read_cols = list(dict.fromkeys([key, "itemid", "charttime", *columns]))
    win_cols = (
        ["stay_id", "intime", "outtime"]
        if key == "stay_id"
        else ["subject_id", "stay_id", "intime", "outtime"]
    )
    windows = stays[win_cols]
    for chunk in iter_table(root, table, read_cols, chunksize=chunksize):
        chunk = chunk[chunk["itemid"].isin(itemids) & chunk[key].isin(keys)]
        if chunk.empty:
            continue
        chunk = parse_times(chunk.copy(), table).merge(windows, on=key)
        hours = (chunk["charttime"] - chunk["intime"]).dt.total_seconds() / 3600.0
        keep = (hours >= window_start_hours) & (chunk["charttime"] <= chunk["outtime"])
        if window_hours is not None:
            keep &= hours < window_hours
        chunk = chunk.assign(hours=hours)[keep.fillna(False)]
        if not chunk.empty:
            yield chunk


def load_ehr_events(
    mimic_iv_root: str | Path,
    stays: pd.DataFrame,
    variables: pd.DataFrame | str | Path | None = None,
    window_hours: float | None = 48.0,
    window_start_hours: float = 0.0,
    chunksize: int = 1_000_000,
    trace: dict | None = None,
) -> EhrEvents:
    """Load, clean and window the EHR events of ``stays``, streaming the event tables in chunks.

    Args:
        mimic_iv_root: MIMIC-IV root holding ``hosp/`` and ``icu/``.
        stays: One row per stay with ``subject_id``, ``stay_id``, ``intime``, ``outtime`` (e.g. the
            output of :func:`clinical_moe.data.cohort.build_cohort`).
        variables: A variable map (DataFrame from :func:`load_variables`) or the path of a user
            variables file; default the packaged one.
        window_hours: Keep events with ``window_start_hours <= hours < window_hours`` (hours since
            intime) and charttime <= outtime; None keeps the whole stay.
        window_start_hours: Start of the window (negative values reach before ICU admission).
        chunksize: Rows per chunk when streaming chartevents / labevents.
        trace: When given (the EHR table store, :mod:`~clinical_moe.data.ehr_store`), receives
            ``dropped_rows`` (a DataFrame of the dropped values' stay, hours, variable, reason)
            and ``first_hours`` (per stay, the earliest raw row of a mapped itemid), so that the
            same counts and the observation rule can be computed later for any shorter window.

    Returns:
        :class:`EhrEvents`. If chartevents (or labevents) is absent, damaged, empty or
        header-only, a warning names the file and says vitals (labs) are unavailable, the table is
        listed in ``missing_sources`` (and in the :mod:`~clinical_moe.data.damage` ledger), and the
        other table's events are still returned. Damaged rows are dropped and counted there.
    """
    var_map = variables if isinstance(variables, pd.DataFrame) else load_variables(variables)
    names = variable_names(var_map)
    index_of = {n: i for i, n in enumerate(names)}
    measured = var_map[var_map["source"] != "derived"]
    dropped = {v: {"unparseable": 0, "out_of_range": 0} for v in variable_names(measured)}
    missing, parts, seen = [], [], set()
    for source in SOURCES:
        items = measured.loc[measured["source"] == source, "itemid"]
        if items.empty:
            continue
        what = "vitals (chartevents variables)" if source == "chartevents" else "labs"
        lost = f"{what} are unavailable; stays keep the events of the other tables"
        if find_table(mimic_iv_root, SOURCES[source], required=False) is None:
            missing.append(source)
            damage.current().missing_source(
                SOURCES[source], None, "absent", f"not found under {mimic_iv_root}", lost
            )
            continue
        cols = ["stay_id", "itemid", "hours", "value", "valuenum"]
        source_parts, source_seen, source_first, source_dropped = [], set(), [], []
        try:
            for chunk in _windowed_chunks(
                mimic_iv_root,
                source,
                stays,
                items,
                ["value", "valuenum"],
                window_start_hours,
                window_hours,
                chunksize,
            ):
                source_seen.update(chunk["stay_id"].unique().tolist())
                if trace is not None:
                    source_first.append(chunk.groupby("stay_id")["hours"].min())
                cleaned = clean_events(
                    chunk[cols], measured, dropped, source_dropped if trace is not None else None
                )
                source_parts.append(_numeric_events(cleaned, index_of))
        except TableError as err:  # an optional table: damaged = absent, for every stay alike
            missing.append(source)
            damage.current().missing_source(SOURCES[source], err.path, err.reason, err.detail, lost)
            source_parts, source_seen, source_first = [], set(), []  # (dropped counts stay)
        parts += source_parts
        seen |= source_seen
        if trace is not None:
            trace.setdefault("first", []).extend(source_first)
            trace.setdefault("dropped", []).extend(source_dropped)
    # Numbers only from here on (32 bytes a row): per-row strings made this table several
    # times its size, and the copies below multiplied that (the 50k-patient memory peak).
    events = pd.concat(parts, ignore_index=True) if parts else _numeric_events(None, index_of)
    del parts
    events = _aggregate(events, names, var_map, index_of)
    events.insert(3, "variable", pd.Categorical.from_codes(events["var_idx"], categories=names))
    log_dropped(dropped)
    window = frozenset(int(x) for x in seen)
    return EhrEvents(events, tuple(names), dropped, tuple(missing), window)


def log_dropped(dropped: dict[str, dict[str, int]]) -> None:
    """One log line per variable that lost values to cleaning (counts only, no values)."""
    for var, counts in dropped.items():
        if any(counts.values()):
            logger.info(
                "EHR variable %r: dropped %d unparseable and %d out-of-range values",
                var,
                counts["unparseable"],
                counts["out_of_range"],
            )


def _aggregate(
    events: pd.DataFrame, names, var_map: pd.DataFrame, index_of, rows_per_part: int = 1_000_000
) -> pd.DataFrame:
    """Average repeats, derive the GCS total, sort: per block of stays, to bound the memory.

    Every step is local to one stay, so blocks of consecutive stay ids, each sorted, concatenate
    into exactly the table one pass over all rows gives (the groupby and pivot of one pass held
    several copies of a whole-cohort table at once: the peak of a 50k-patient build).
    """
    stays = np.unique(events["stay_id"].to_numpy())
    n_parts = max(1, min(len(stays), len(events) // rows_per_part))
    if n_parts == 1:
        return _aggregate_part(events, names, var_map, index_of)
    edges = stays[np.linspace(0, len(stays), n_parts + 1).astype(int)[1:-1]]
    block = np.searchsorted(edges, events["stay_id"].to_numpy(), side="right")  # (rows,)
    out = [_aggregate_part(events[block == b], names, var_map, index_of) for b in range(n_parts)]
    return pd.concat(out, ignore_index=True)


def _aggregate_part(events: pd.DataFrame, names, var_map: pd.DataFrame, index_of) -> pd.DataFrame:
    events = events.groupby(["stay_id", "hours", "var_idx"], as_index=False, sort=False)[
        "value"
    ].mean()
    derived = var_map[var_map["kind"] == "gcs_total"]
    if not derived.empty:
        total = _gcs_total_of(events, names, var_map, str(derived["variable"].iloc[0]))
        events = pd.concat([events, _numeric_events(total, index_of)], ignore_index=True)
    return events.sort_values(["stay_id", "hours", "var_idx"], ignore_index=True)


def _numeric_events(part: pd.DataFrame | None, index_of: dict[str, int]) -> pd.DataFrame:
    """``stay_id, hours, var_idx, value`` of cleaned events, variable names turned into indices."""
    if part is None or part.empty:  # (gcs_total gives an empty frame of other columns)
        part = pd.DataFrame({"stay_id": [], "hours": [], "variable": [], "value": []})
    return pd.DataFrame(
        {
            "stay_id": part["stay_id"].to_numpy(dtype="int64"),
            "hours": part["hours"].to_numpy(dtype="float64"),
            "var_idx": part["variable"].map(index_of).to_numpy(dtype="int64"),
            "value": part["value"].to_numpy(dtype="float64"),
        }
    )


def _gcs_total_of(
    events: pd.DataFrame, names: Sequence[str], var_map: pd.DataFrame, total_name: str
) -> pd.DataFrame:
    """:func:`gcs_total` over the GCS component rows of numeric ``events`` only."""
    kind_of = dict(zip(var_map["variable"], var_map["kind"]))
    kinds = np.array([kind_of.get(n, "") for n in names], dtype=object)  # one str per variable
    parts_idx = [i for i, k in enumerate(kinds) if k.startswith("gcs_")]  # gcs_total is derived
    rows = events[events["var_idx"].isin(parts_idx)]
    rows = rows.assign(kind=kinds[rows["var_idx"].to_numpy()])
    return gcs_total(rows, total_name)


def observed_stays(
    mimic_iv_root: str | Path,
    stays: pd.DataFrame,
    hours: float = 48.0,
    variables: pd.DataFrame | str | Path | None = None,
    chunksize: int = 1_000_000,
) -> set[int]:
    """Stay ids with at least one mapped event in ``[intime, intime + hours)``.

    A cheap check for cohort building: reads only ids, itemid and charttime in chunks, and counts
    any charted row of a mapped itemid (values are not parsed or range-checked).
    """
    var_map = variables if isinstance(variables, pd.DataFrame) else load_variables(variables)
    found: set[int] = set()
    for source, table in SOURCES.items():
        items = var_map.loc[var_map["source"] == source, "itemid"]
        if items.empty or find_table(mimic_iv_root, table, required=False) is None:
            continue
        part: set[int] = set()
        try:
            for chunk in _windowed_chunks(
                mimic_iv_root, source, stays, items, [], 0.0, hours, chunksize
            ):
                part.update(int(s) for s in chunk["stay_id"].unique())
        except TableError as err:  # damaged = absent, as in load_ehr_events
            damage.current().missing_source(table, err.path, err.reason, err.detail)
            continue
        found |= part
    return found


def to_arrays(
    stay_events: pd.DataFrame, variables: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn one stay's long-format events into ``(times (L,), values (L, V), obs_mask (L, V))``.

    Args:
        stay_events: Rows with ``hours``, ``value`` and either ``var_idx`` or ``variable``; at
            most one row per (hours, variable) (as in :attr:`EhrEvents.events`).
        variables: The V variable names (column order).

    Returns:
        float32 times (sorted distinct hours), float32 values (0.0 where unobserved) and a bool
        mask. A stay without events gives shapes (0,), (0, V), (0, V).
    """
    n_vars = len(variables)
    if "var_idx" in stay_events.columns:
        idx = stay_events["var_idx"].to_numpy(dtype="int64")
    else:
        lookup = {n: i for i, n in enumerate(variables)}
        unknown = sorted(set(stay_events["variable"]) - set(lookup))
        if unknown:
            raise ValueError(f"events name variables {unknown} not in {list(variables)}")
        idx = stay_events["variable"].map(lookup).to_numpy(dtype="int64")
    _check_var_idx(idx, n_vars)
    hours = stay_events["hours"].to_numpy(dtype="float64")
    return _dense(hours, idx, stay_events["value"].to_numpy(dtype="float32"), n_vars)


def _check_var_idx(idx: np.ndarray, n_vars: int) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n_vars):
        raise ValueError(f"var_idx out of range for {n_vars} variables")


def _dense(
    hours: np.ndarray, idx: np.ndarray, value: np.ndarray, n_vars: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Long events -> ``times (L,)``, ``values (L, V)``, ``obs_mask (L, V)``, L = distinct hours."""
    times, row = np.unique(hours, return_inverse=True)
    values = np.zeros((times.size, n_vars), dtype=np.float32)
    mask = np.zeros((times.size, n_vars), dtype=bool)
    values[row, idx] = value
    mask[row, idx] = True
    return times.astype(np.float32), values, mask


def time_series(ehr: EhrEvents, stay_ids: Iterable[int] | None = None) -> dict[int, EhrTimeSeries]:
    """Arrays for every stay: ``{stay_id: EhrTimeSeries}``.

    Args:
        ehr: Output of :func:`load_ehr_events`.
        stay_ids: Stays to include (those without events get L = 0); default the stays with events.
    """
    ev, n_vars = ehr.events, len(ehr.variables)
    # Columns as arrays once, then one slice per stay (rows are sorted by stay_id).
    sids = ev["stay_id"].to_numpy(dtype="int64")
    hours = ev["hours"].to_numpy(dtype="float64")
    idx = ev["var_idx"].to_numpy(dtype="int64")
    value = ev["value"].to_numpy(dtype="float32")
    _check_var_idx(idx, n_vars)
    starts = np.flatnonzero(np.r_[True, np.diff(sids) != 0]) if len(ev) else []
    bounds = list(zip(starts, [*list(starts)[1:], len(ev)]))
    out = {}
    for a, b in bounds:
        sid = int(sids[a])
        arrays = _dense(hours[a:b], idx[a:b], value[a:b], n_vars)
        out[sid] = EhrTimeSeries(sid, *arrays, ehr.variables)
    if stay_ids is None:
        return out
    empty = to_arrays(ev.iloc[:0], ehr.variables)
    return {int(s): out.get(int(s), EhrTimeSeries(int(s), *empty, ehr.variables)) for s in stay_ids}


#: MIMIC-IV ``admissions.admission_type`` values: a fixed list keeps the static width stable
#: across splits and releases; anything else goes to ``admission_type=OTHER``.
ADMISSION_TYPES: tuple[str, ...] = (
    "AMBULATORY OBSERVATION",
    "DIRECT EMER.",
    "DIRECT OBSERVATION",
    "ELECTIVE",
    "EU OBSERVATION",
    "EW EMER.",
    "OBSERVATION ADMIT",
    "SURGICAL SAME DAY ADMISSION",
    "URGENT",
)


def static_features(
    cohort_df: pd.DataFrame,
    admissions: pd.DataFrame | None = None,
    admission_types: Sequence[str] = ADMISSION_TYPES,
) -> pd.DataFrame:
    """Static inputs per stay: age, sex and a one-hot admission type.

    Args:
        cohort_df: One row per stay with ``stay_id``, ``anchor_age`` and ``gender`` (as returned
            by ``build_cohort``); ``anchor_year``, ``admittime`` and ``admission_type`` are used
            when present.
        admissions: ``hosp/admissions`` rows, used for ``admission_type`` / ``admittime`` when
            ``cohort_df`` lacks them (joined on hadm_id).
        admission_types: The one-hot categories; others map to ``admission_type=OTHER``.

    Returns:
        float32 DataFrame indexed by stay_id with columns ``age`` (anchor_age shifted to the
        admission year when anchor_year and admittime are known), ``gender_male`` (1/0, NaN if
        unknown) and ``admission_type=<TYPE>`` ... ``admission_type=OTHER``. NaN means unknown;
        :class:`EhrNormalizer` treats it as unobserved.
    """
    missing = [c for c in ("stay_id", "anchor_age", "gender") if c not in cohort_df.columns]
    if missing:
        raise ValueError(f"static_features: cohort_df lacks column(s) {missing}")
    df = cohort_df
    need = [c for c in ("admission_type", "admittime") if c not in df.columns]
    if need and admissions is not None:
        df = df.merge(
            admissions[["hadm_id", *need]].drop_duplicates("hadm_id"), on="hadm_id", how="left"
        )
    age = df["anchor_age"].astype("float64")
    if {"anchor_year", "admittime"} <= set(df.columns):
        shift = df["admittime"].dt.year.astype("float64") - df["anchor_year"].astype("float64")
        age = age + shift.fillna(0.0)
    gender = df["gender"].astype("string").str.upper()
    out = {
        "age": age.to_numpy(),
        "gender_male": np.where(gender.isna(), np.nan, (gender == "M").astype(float)),
    }
    atype = (
        df["admission_type"].astype("string").str.upper()
        if "admission_type" in df.columns
        else pd.Series(pd.NA, index=df.index, dtype="string")
    )
    known = atype.isin(list(admission_types)).fillna(False).to_numpy()
    for t in admission_types:
        out[f"admission_type={t}"] = (atype == t).fillna(False).to_numpy(dtype=float)
    out["admission_type=OTHER"] = (~known).astype(float)
    return pd.DataFrame(out, index=pd.Index(df["stay_id"].astype("int64"), name="stay_id")).astype(
        "float32"
    )


class EhrNormalizer:
    """Per-variable standardisation fitted on the train split only (scikit-learn style).

    Statistics use observed entries only: an entry counts when its mask is True (or, without a
    mask, when it is not NaN). Variables never observed in training get mean 0 and std 1; a std
    below ``min_std`` is replaced by 1 so constant variables do not blow up.

    Attributes:
        mean_: float64 (V,) per-variable mean, set by :meth:`fit`.
        std_: float64 (V,) per-variable standard deviation.
        n_obs_: int64 (V,) number of observed training entries per variable.
    """

    def __init__(self, min_std: float = 1e-6) -> None:
        self.min_std = min_std

    def __repr__(self) -> str:
        return f"EhrNormalizer(min_std={self.min_std})"

    @staticmethod
    def _stack(values, obs_mask) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(values, np.ndarray) and values.ndim == 2:
            x, m = values.astype("float64"), obs_mask
        else:  # a sequence of per-stay (L, V) arrays
            values = list(values)
            x = (
                np.concatenate([np.asarray(v, dtype="float64") for v in values])
                if values
                else (np.zeros((0, 0)))
            )
            m = None if obs_mask is None else np.concatenate(list(obs_mask)) if values else None
        m = ~np.isnan(x) if m is None else np.asarray(m, dtype=bool) & ~np.isnan(x)
        return x, m

    def fit(self, values, obs_mask=None) -> EhrNormalizer:
        """Learn per-variable mean / std from train values: (N, V) or a list of (L, V) arrays."""
        x, m = self._stack(values, obs_mask)
        self.n_obs_ = m.sum(axis=0).astype("int64")
        filled = np.where(m, x, 0.0)
        n = np.maximum(self.n_obs_, 1)
        self.mean_ = filled.sum(axis=0) / n
        var = (np.where(m, x - self.mean_, 0.0) ** 2).sum(axis=0) / n
        std = np.sqrt(var)
        self.std_ = np.where((std < self.min_std) | (self.n_obs_ == 0), 1.0, std)
        return self

    def transform(self, values: np.ndarray, obs_mask: np.ndarray | None = None) -> np.ndarray:
        """Standardise one (L, V) or (N, V) array; unobserved / NaN entries become 0.0."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("EhrNormalizer is not fitted: call fit(train values) first")
        x = np.asarray(values, dtype="float64")
        if x.shape[-1] != self.mean_.shape[0]:
            raise ValueError(f"expected {self.mean_.shape[0]} variables, got {x.shape[-1]}")
        m = ~np.isnan(x) if obs_mask is None else np.asarray(obs_mask, dtype=bool) & ~np.isnan(x)
        return np.where(m, (x - self.mean_) / self.std_, 0.0).astype(np.float32)

    def fit_transform(self, values: np.ndarray, obs_mask: np.ndarray | None = None) -> np.ndarray:
        """:meth:`fit` then :meth:`transform` on one (N, V) array."""
        return self.fit(values, obs_mask).transform(values, obs_mask)
