"""The ledger of data damage met during one preprocessing pass, for ``summary.json``.

Every table read goes through :mod:`clinical_moe.data.tables`, which reports here:

* an **optional source** (chartevents, labevents, notes, CXR metadata, ECG record list, ...) that
  is absent, damaged, empty or header-only: :meth:`DamageLog.missing_source` warns once, naming the
  file and the cause, and lists it under ``missing_sources``; the run goes on without it;
* **row-level damage** (a blank or non-numeric id, an unparseable time, an undecodable byte, a
  line with too many fields, an impossible value): :meth:`DamageLog.rows` counts it by table and
  reason under ``damaged_rows`` (the row is dropped, or repaired where the reason says so);
* a **modality empty for every stay**: :meth:`DamageLog.empty_modality` warns with the reason.

A pass calls :func:`start` first and merges :meth:`DamageLog.summary` into its summary. Outside a
pass the module keeps a default ledger, so library calls (tests, notebooks) still count and warn.
No message quotes a cell value: only file names, columns, row numbers and counts.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

logger = logging.getLogger(__name__)

#: Row reasons whose rows are kept (the value is repaired or set missing), not dropped.
REPAIRED_REASONS = ("undecodable_bytes", "unknown_gender")


class DamageLog:
    """Counts of damaged sources and rows, by table and reason (see the module docstring)."""

    def __init__(self) -> None:
        self.missing: dict[str, dict[str, str | None]] = {}
        self.row_counts: dict[str, Counter] = {}
        self.empty: dict[str, str] = {}
        # every record, in order, as JSON-able [method, args]: a store that read the tables once
        # replays its records into later passes (issue 13), so they report the same damage
        self.journal: list[list] = []

    def replay(self, journal: list[list]) -> None:
        """Record again (warnings included) what another ledger's :attr:`journal` holds."""
        for name, args in journal:
            if name in ("missing_source", "rows"):
                getattr(self, name)(*args)

    def missing_source(
        self,
        table: str,
        path: str | PathLike[str] | None,
        reason: str,
        detail: str,
        consequence: str = "",
    ) -> None:
        """Record (and warn about) an optional source the run goes on without.

        Args:
            table: The table's name, e.g. ``"icu/chartevents"``.
            path: The file at fault, or None when it is absent.
            reason: Short code (``absent``, ``empty``, ``truncated``, ``corrupt``, ...).
            detail: One line on the cause, without patient values.
            consequence: What the run loses, e.g. ``"vitals are unavailable"``.
        """
        self.journal.append(
            [
                "missing_source",
                [table, None if path is None else str(path), reason, detail, consequence],
            ]
        )
        self.missing.setdefault(
            table, {"file": None if path is None else str(path), "reason": reason}
        )
        where = str(path) if path is not None else table
        msg = (
            f"optional table {table} ({where}) is unusable [{reason}]: {detail}; treated as absent"
        )
        if consequence:
            msg += f": {consequence}"
        warnings.warn(msg, stacklevel=3)
        logger.warning(msg)

    def rows(self, table: str, reason: str, count: int, path: str | None = None) -> None:
        """Count ``count`` damaged rows of ``table`` under ``reason`` (no-op for 0)."""
        if count <= 0:
            return
        self.journal.append(["rows", [table, reason, int(count), path]])
        self.row_counts.setdefault(table, Counter())[reason] += int(count)
        fate = "repaired" if reason in REPAIRED_REASONS else "dropped"
        logger.warning(
            "%s: %d row(s) %s (%s)%s", table, count, fate, reason, f" in {path}" if path else ""
        )

    def empty_modality(self, modality: str, reason: str) -> None:
        """Warn that ``modality`` is missing for every stay, and why."""
        self.empty[modality] = reason
        msg = f"modality {modality!r} is empty for every stay: {reason}"
        warnings.warn(msg, stacklevel=3)
        logger.warning(msg)

    def sources_of(self, prefixes: tuple[str, ...]) -> list[str]:
        """Missing sources whose table name starts with one of ``prefixes``, with reasons."""
        return [f"{t} [{v['reason']}]" for t, v in self.missing.items() if t.startswith(prefixes)]

    def finish(self, plan, modalities) -> dict:
        """Warn for each modality no stay of ``plan`` has, then return :meth:`summary`.

        Args:
            plan: A :class:`~clinical_moe.data.plan.StayPlan` (its ``stays`` and per-modality
                dicts ``ehr`` / ``cxr`` / ``ecg`` / ``notes``).
            modalities: The run's modalities.
        """
        if len(plan.stays):
            for m in modalities:
                if getattr(plan, m, None) is None or len(getattr(plan, m)):
                    continue
                lost = self.sources_of(_SOURCES_OF.get(m, (m,)))
                reason = (
                    "unusable source(s): " + ", ".join(lost)
                    if lost
                    else f"no stay has a usable {m} record in its window (or the release "
                    "folder is absent)"
                )
                self.empty_modality(m, reason)
        return self.summary()

    def summary(self) -> dict:
        """``missing_sources``, ``damaged_rows`` and ``empty_modalities`` for ``summary.json``."""
        return {
            "missing_sources": {t: dict(v) for t, v in sorted(self.missing.items())},
            "damaged_rows": {
                t: dict(sorted(c.items())) for t, c in sorted(self.row_counts.items())
            },
            "empty_modalities": dict(self.empty),
        }


#: Table-name prefixes feeding each modality, to name the cause of an empty modality.
_SOURCES_OF = {
    "ehr": ("icu/chartevents", "hosp/labevents"),
    "cxr": ("mimic-cxr",),
    "ecg": ("mimic-iv-ecg",),
    "notes": ("note/",),
}

_current = DamageLog()


def start() -> DamageLog:
    """Begin a new ledger (one per preprocessing pass) and return it."""
    global _current
    _current = DamageLog()
    return _current


def current() -> DamageLog:
    """The ledger in use."""
    return _current


@contextmanager
def isolated() -> Iterator[DamageLog]:
    """A fresh ledger for the block, the previous one restored after it (nothing merged)."""
    global _current
    previous, _current = _current, DamageLog()
    try:
        yield _current
    finally:
        _current = previous
