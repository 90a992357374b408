"""The EHR table store: chartevents and labevents read once, for every stay, per window.

Streaming and parsing ``chartevents`` (430 million rows in MIMIC-IV) is most of the table phase,
and what it yields does not depend on the task or seed: the cleaned events of each ICU stay in its
window, in hours since intime. The store keeps them for every stay of ``icustays`` (not one
task's cohort) beside the decoded files (``<decode_store>/ehr-<digest>/``), so a new task or seed
selects rows instead of reading the tables again. Its horizon is the run's ``data.window_hours``
(the tasks' shared 48 h by default): a store over whole stays held 3.5x the rows of a 48 h pass
and its peak memory grew with them, so another window builds its own store::

    events.parquet       stay_id, hours, var_idx, value: cleaned, repeated values averaged, the
                         GCS total derived, sorted by stay_id, hours, var_idx
    first_hours.parquet  stay_id, hours: the earliest raw row of a mapped itemid (before values are
                         parsed or range-checked): the cohort's "observed in the window" rule
    dropped.parquet      stay_id, hours, variable, reason: each value cleaning dropped
    meta.json            variables, missing sources, and the damage ledger's records

Every step of :func:`~clinical_moe.data.ehr.load_ehr_events` is local to one (stay, hour), so
selecting ``hours < window`` from the store gives exactly, bit for bit, what reading the tables
for that window gives. ``<digest>`` covers the horizon, the variable map, the size and
modification time of ``icustays``, ``chartevents`` and ``labevents``, and
:data:`EHR_STORE_VERSION`: a changed table makes a new store, never a stale one. The store is written under a temporary name and renamed
into place, so concurrent builders (shard jobs) cannot leave half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from hashlib import sha256
from pathlib import Path

import pandas as pd

from clinical_moe.data import damage
from clinical_moe.data.ehr import (
    EhrEvents,
    load_ehr_events,
    load_variables,
    log_dropped,
    variable_names,
)
from clinical_moe.data.tables import find_table

logger = logging.getLogger(__name__)

#: Bump when what the store holds, or how it is computed, changes.
EHR_STORE_VERSION = 1
_TABLES = ("icu/icustays", "icu/chartevents", "hosp/labevents")


def ehr_store_dir(
    store_root: str | Path, mimic_iv: str | Path, variables_file=None, horizon_hours=None
) -> Path:
    """``<store_root>/ehr-<digest>`` for these tables, this variable map and horizon."""
    var_map = load_variables(variables_file)
    h = sha256(f"ehr-store-v{EHR_STORE_VERSION}:horizon={horizon_hours}".encode())
    h.update(var_map.to_csv(index=False).encode())
    for name in _TABLES:
        path = find_table(mimic_iv, name, required=False)
        if path is None:
            h.update(f"{name}:absent".encode())
            continue
        st = path.stat()
        h.update(f"{name}:{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(store_root) / f"ehr-{h.hexdigest()[:12]}"


def _all_stays(mimic_iv: Path) -> pd.DataFrame:
    """Every usable ICU stay (the cohort's first two rules, none of the task's)."""
    from clinical_moe.data.cohort import _STAY_COLS
    from clinical_moe.data.tables import read_table

    with damage.isolated():  # the cohort reads icustays again and records its damage itself
        stays = read_table(mimic_iv, "icu/icustays", _STAY_COLS)
    stays = stays[~stays["stay_id"].duplicated()]
    stays = stays[stays["outtime"] > stays["intime"]]
    return stays[["subject_id", "stay_id", "intime", "outtime"]].reset_index(drop=True)


def ensure_ehr_store(
    mimic_iv: str | Path, dest: str | Path, variables_file=None, horizon_hours=None
) -> Path:
    """:func:`build_ehr_store` in a child process when the store is absent.

    The pass over the event tables is the memory peak of a build; in a child, its memory is
    returned when the child exits instead of staying in this process (which goes on to plan
    and fork decode workers). The child's warnings are silenced: this process replays the
    store's damage records (:func:`windowed_events`), so each is reported once. Errors (a
    damaged required table) are raised here, as from a direct call.
    """
    dest = Path(dest)
    if (dest / "meta.json").is_file():
        return dest
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_build_quietly, mimic_iv, dest, variables_file, horizon_hours).result()


def _build_quietly(mimic_iv, dest, variables_file, horizon_hours) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("clinical_moe.data.damage").setLevel(logging.ERROR)
        return build_ehr_store(mimic_iv, dest, variables_file, horizon_hours)


def build_ehr_store(
    mimic_iv: str | Path, dest: str | Path, variables_file=None, horizon_hours=None
) -> Path:
    """Read the event tables once for every stay into ``dest`` (kept as it is when present).

    Args:
        mimic_iv: The MIMIC-IV root.
        dest: The store folder (:func:`ehr_store_dir`).
        variables_file: The variable map (default the packaged one).
        horizon_hours: Keep events in ``[0, horizon)`` hours since intime; None: whole stays.
    """
    dest = Path(dest)
    if (dest / "meta.json").is_file():
        return dest
    mimic_iv = Path(mimic_iv)
    var_map = load_variables(variables_file)
    logger.info("EHR table store: reading the event tables once for every stay -> %s", dest)
    trace: dict = {}
    with damage.isolated() as log:
        stays = _all_stays(mimic_iv)
        events = load_ehr_events(mimic_iv, stays, var_map, horizon_hours, trace=trace)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    events.events[["stay_id", "hours", "var_idx", "value"]].to_parquet(
        tmp / "events.parquet", index=False
    )
    first = trace.get("first") or [pd.Series([], dtype="float64", name="hours")]
    first = pd.concat(first).groupby(level=0).min().rename_axis("stay_id").rename("hours")
    first.reset_index().astype({"stay_id": "int64"}).to_parquet(
        tmp / "first_hours.parquet", index=False
    )
    dropped = trace.get("dropped") or []
    dropped = (
        pd.concat(dropped, ignore_index=True)
        if dropped
        else pd.DataFrame({"stay_id": [], "hours": [], "variable": [], "reason": []})
    )
    dropped.astype({"stay_id": "int64", "hours": "float64"}).to_parquet(
        tmp / "dropped.parquet", index=False
    )
    meta = {
        "version": EHR_STORE_VERSION,
        "horizon_hours": horizon_hours,
        "variables": list(events.variables),
        "missing_sources": list(events.missing_sources),
        "damage_journal": log.journal,
        "stays": len(stays),
        "rows": len(events.events),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same store first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def windowed_events(
    store: str | Path,
    stays: pd.DataFrame,
    window_hours: float | None,
    variables_file=None,
) -> EhrEvents:
    """What :func:`~clinical_moe.data.ehr.load_ehr_events` gives for ``stays`` and the window.

    The store's damage records are replayed into the current ledger, so the summary reports
    the same missing sources and damaged rows as a pass over the tables.
    """
    store = Path(store)
    meta = json.loads((store / "meta.json").read_text())
    damage.current().replay(meta["damage_journal"])
    names = tuple(meta["variables"])
    ids = pd.Index(stays["stay_id"].dropna().astype("int64").unique())
    filters = [("hours", "<", float(window_hours))] if window_hours is not None else None
    events = pd.read_parquet(store / "events.parquet", filters=filters)
    events = events[events["stay_id"].isin(ids)].reset_index(drop=True)
    events.insert(3, "variable", pd.Categorical.from_codes(events["var_idx"], categories=names))

    var_map = load_variables(variables_file)
    measured = var_map[var_map["source"] != "derived"]
    dropped = {v: {"unparseable": 0, "out_of_range": 0} for v in variable_names(measured)}
    rows = pd.read_parquet(store / "dropped.parquet", filters=filters)
    rows = rows[rows["stay_id"].isin(ids)]
    for (var, reason), n in rows.groupby(["variable", "reason"], sort=False).size().items():
        dropped.setdefault(str(var), {"unparseable": 0, "out_of_range": 0})[reason] += int(n)
    log_dropped(dropped)
    first = pd.read_parquet(store / "first_hours.parquet", filters=filters)
    window = frozenset(int(s) for s in first.loc[first["stay_id"].isin(ids), "stay_id"])
    return EhrEvents(events, names, dropped, tuple(meta["missing_sources"]), window)
