"""Tiny hand-made MIMIC-IV / MIMIC-IV-Note tables with the real column lists, for loader tests.

``MimicFactory.default()`` builds a small scenario whose right answers the tests know:

- 10001: adult, one MICU stay 30001 (72 h), survives; vitals in every awkward form (F, lb, inch,
  FiO2 percent and fraction, GCS text, capillary refill text, an impossible heart rate, events
  before intime and after 48 h) and labs with a null hadm_id; ICD-9 ``0389`` (leading zero).
- 10002: adult, stay 30002 (60 h), dies in hospital (deathtime between admit and discharge).
- 10003: 15 years old (child). 10004: care-unit transfer. 10005: two ICU stays in one admission.
- 10006: stay of 24 h. 10007: 72 h stay without any event in the first 48 h.
- 10008: death known only from ``dod`` (deathtime empty, hospital_expire_flag 0).
- 10009: two admissions 15 days apart, one stay each (labs only in the first; readmission).

``write(root)`` writes ``root/hosp``, ``root/icu`` and ``root/note`` as ``.csv.gz`` or ``.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

_NOTE = "note_id subject_id hadm_id note_type note_seq charttime storetime text"
COLUMNS = {
    name: cols.split()
    for name, cols in {
        "hosp/patients": "subject_id gender anchor_age anchor_year anchor_year_group dod",
        "hosp/admissions": "subject_id hadm_id admittime dischtime deathtime admission_type "
        "admit_provider_id admission_location discharge_location insurance language "
        "marital_status race edregtime edouttime hospital_expire_flag",
        "icu/icustays": "subject_id hadm_id stay_id first_careunit last_careunit intime outtime "
        "los",
        "hosp/labevents": "labevent_id subject_id hadm_id specimen_id itemid order_provider_id "
        "charttime storetime value valuenum valueuom ref_range_lower ref_range_upper flag "
        "priority comments",
        "hosp/d_labitems": "itemid label fluid category",
        "icu/chartevents": "subject_id hadm_id stay_id caregiver_id charttime storetime itemid "
        "value valuenum valueuom warning",
        "icu/d_items": "itemid label abbreviation linksto category unitname param_type "
        "lownormalvalue highnormalvalue",
        "hosp/diagnoses_icd": "subject_id hadm_id seq_num icd_code icd_version",
        "note/radiology": _NOTE,
        "note/discharge": _NOTE,
    }.items()
}

MICU = "Medical Intensive Care Unit (MICU)"
SICU = "Surgical Intensive Care Unit (SICU)"
MARKER = "ZEBRAFINCHMARKER"  # a word that must never reach a log or an error message


def ts(base: str, hours: float) -> str:
    """``base + hours`` as a MIMIC timestamp string."""
    return (pd.Timestamp(base) + pd.Timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class MimicFactory:
    """Rows of each table (dicts); missing columns are written empty."""

    rows: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in COLUMNS})
    intimes: dict[int, str] = field(default_factory=dict)

    def add(self, table: str, **row) -> None:
        self.rows[table].append(row)

    def add_stay(
        self,
        subject: int,
        hadm: int,
        stay: int,
        base: str,
        los_h: float,
        *,
        age: int = 60,
        gender: str = "F",
        first: str = MICU,
        last: str = MICU,
        died: bool = False,
        dod: str | None = None,
        new_patient: bool = True,
        admission_type: str = "EW EMER.",
        n_stays: int = 1,
    ) -> None:
        """A patient (optional), an admission around the stay, and ``n_stays`` ICU stays."""
        if new_patient:
            self.add(
                "hosp/patients",
                subject_id=subject,
                gender=gender,
                anchor_age=age,
                anchor_year=int(base[:4]),
                anchor_year_group="2011 - 2013",
                dod=dod,
            )
        disch = ts(base, los_h * n_stays + 24)
        self.add(
            "hosp/admissions",
            subject_id=subject,
            hadm_id=hadm,
            admittime=ts(base, -6),
            dischtime=disch,
            deathtime=disch if died else None,
            admission_type=admission_type,
            admission_location="EMERGENCY ROOM",
            discharge_location="DIED" if died else "HOME",
            insurance="Medicare",
            language="ENGLISH",
            marital_status="MARRIED",
            race="WHITE",
            hospital_expire_flag=int(died),
        )
        for k in range(n_stays):
            start = ts(base, k * los_h)
            self.add(
                "icu/icustays",
                subject_id=subject,
                hadm_id=hadm,
                stay_id=stay + k,
                first_careunit=first,
                last_careunit=last,
                intime=start,
                outtime=ts(start, los_h),
                los=los_h / 24.0,
            )
            self.intimes[stay + k] = start

    def chart(
        self,
        subject: int,
        hadm: int,
        stay: int,
        hours: float,
        itemid: int,
        value=None,
        valuenum=None,
        uom: str = "",
    ) -> None:
        t = ts(self.intimes[stay], hours)
        self.add(
            "icu/chartevents",
            subject_id=subject,
            hadm_id=hadm,
            stay_id=stay,
            caregiver_id=1,
            charttime=t,
            storetime=t,
            itemid=itemid,
            value=value if value is not None else valuenum,
            valuenum=valuenum,
            valueuom=uom,
            warning=0,
        )

    def lab(
        self, subject: int, hadm: int | None, stay: int, hours: float, itemid: int, valuenum: float
    ) -> None:
        t = ts(self.intimes[stay], hours)
        n = len(self.rows["hosp/labevents"]) + 1
        self.add(
            "hosp/labevents",
            labevent_id=n,
            subject_id=subject,
            hadm_id=hadm,
            specimen_id=1000 + n,
            itemid=itemid,
            charttime=t,
            storetime=ts(t, 1),
            value=str(valuenum),
            valuenum=valuenum,
            priority="ROUTINE",
        )

    def note(
        self,
        kind: str,
        subject: int,
        hadm: int | None,
        stay: int,
        hours: float,
        stored_hours: float | None,
        text: str,
        note_type: str = "RR",
    ) -> str:
        seq = len(self.rows[f"note/{kind}"]) + 1
        note_id = f"{subject}-{note_type}-{seq}"
        self.add(
            f"note/{kind}",
            note_id=note_id,
            subject_id=subject,
            hadm_id=hadm,
            note_type=note_type,
            note_seq=seq,
            charttime=ts(self.intimes[stay], hours),
            storetime=None if stored_hours is None else ts(self.intimes[stay], stored_hours),
            text=text,
        )
        return note_id

    def add_random_patients(self, n: int, start_subject: int = 11000, seed: int = 0) -> None:
        """``n`` plain adult patients with one 72 h stay and a heart rate at 1 h."""
        rng = np.random.default_rng(seed)
        for i in range(n):
            s = start_subject + i
            self.add_stay(
                s,
                20000 + s,
                30000 + s,
                ts("2160-03-01 10:00:00", 24 * i),
                72,
                age=int(rng.integers(20, 90)),
                died=bool(rng.random() < 0.2),
            )
            self.chart(s, 20000 + s, 30000 + s, 1, 220045, valuenum=float(rng.integers(50, 120)))

    @classmethod
    def default(cls) -> MimicFactory:
        f = cls()
        f.add_stay(10001, 20001, 30001, "2150-01-01 08:00:00", 72)
        f.add_stay(10002, 20002, 30002, "2151-02-01 08:00:00", 60, died=True, gender="M")
        f.add_stay(10003, 20003, 30003, "2152-03-01 08:00:00", 72, age=15)
        f.add_stay(10004, 20004, 30004, "2153-04-01 08:00:00", 72, last=SICU)
        f.add_stay(10005, 20005, 30005, "2154-05-01 08:00:00", 72, n_stays=2)
        f.add_stay(10006, 20006, 30007, "2155-06-01 08:00:00", 24)
        f.add_stay(10007, 20007, 30008, "2156-07-01 08:00:00", 72)
        f.add_stay(
            10008,
            20008,
            30009,
            "2157-08-01 08:00:00",
            72,
            dod="2157-08-03",
            admission_type="ELECTIVE",
        )
        f.add_stay(10009, 20009, 30010, "2158-09-01 08:00:00", 72)
        f.add_stay(10009, 20010, 30011, "2158-09-20 08:00:00", 50, new_patient=False)
        s1 = (10001, 20001, 30001)
        f.chart(*s1, -1.0, 220045, valuenum=70)  # before intime: outside the window
        f.chart(*s1, 1.0, 220045, valuenum=80)
        f.chart(*s1, 2.0, 220045, valuenum=500)  # impossible heart rate
        f.chart(*s1, 50.0, 220045, valuenum=90)  # after 48 h
        f.chart(*s1, 1.0, 220050, valuenum=120)  # two systolic items at the same time -> mean
        f.chart(*s1, 1.0, 220179, valuenum=110)
        f.chart(*s1, 2.0, 223761, valuenum=98.6, uom="°F")
        f.chart(*s1, 3.0, 226531, valuenum=220, uom="lb")
        f.chart(*s1, 3.0, 226707, valuenum=70, uom="Inch")
        f.chart(*s1, 4.0, 223835, valuenum=50, uom="%")  # percent -> 0.5
        f.chart(*s1, 5.0, 223835, value="0.4")  # already a fraction, text only
        f.chart(*s1, 6.0, 220739, value="Spontaneously")
        f.chart(*s1, 6.0, 223901, value="Obeys Commands")
        f.chart(*s1, 6.0, 223900, value="No Response-ETT")
        f.chart(*s1, 7.0, 220739, value="To Speech")  # alone: no total at 7 h
        f.chart(*s1, 9.0, 220739, value="Unknown text")  # unparseable
        f.chart(*s1, 6.0, 223951, value="Abnormal >3 Seconds")
        f.chart(*s1, 8.0, 224308, value="Normal <3 Seconds")
        f.lab(10001, None, 30001, 10.0, 50931, 140.0)  # null hadm_id, inside the stay
        f.lab(10001, 20001, 30001, 12.0, 50813, 2.0)
        f.lab(10001, None, 30001, -5.0, 50931, 99.0)  # before the ICU stay
        f.lab(10001, None, 30001, 20.0, 50820, 9.5)  # impossible pH
        f.chart(10002, 20002, 30002, 1.0, 220045, valuenum=110)
        f.lab(10002, None, 30002, 3.0, 51301, 12.5)
        for stay, (subj, hadm) in {
            30003: (10003, 20003),
            30004: (10004, 20004),
            30005: (10005, 20005),
            30006: (10005, 20005),
            30007: (10006, 20006),
            30009: (10008, 20008),
            30011: (10009, 20010),
        }.items():
            f.chart(subj, hadm, stay, 1.0, 220045, valuenum=75)
        f.chart(10007, 20007, 30008, 49.0, 220045, valuenum=75)  # only after 48 h
        f.lab(10009, None, 30010, 2.0, 50912, 1.1)  # labs only
        for itemid, label in [
            (220045, "Heart Rate"),
            (223761, "Temperature Fahrenheit"),
            (220739, "GCS - Eye Opening"),
        ]:
            f.add(
                "icu/d_items",
                itemid=itemid,
                label=label,
                abbreviation=label,
                linksto="chartevents",
                category="Routine Vital Signs",
                param_type="Numeric",
            )
        for itemid, label in [(50931, "Glucose"), (50813, "Lactate"), (50820, "pH")]:
            f.add(
                "hosp/d_labitems", itemid=itemid, label=label, fluid="Blood", category="Chemistry"
            )
        for hadm, subj, code, ver in [
            (20001, 10001, "0389", 9),
            (20001, 10001, "4280", 9),
            (20002, 10002, "I5023", 10),
            (20002, 10002, "N179", 10),
            (20008, 10008, "E119", 10),
            (20009, 10009, "V4581", 9),
        ]:
            f.add(
                "hosp/diagnoses_icd",
                subject_id=subj,
                hadm_id=hadm,
                seq_num=1,
                icd_code=code,
                icd_version=ver,
            )
        f.note("radiology", 10001, 20001, 30001, 10, 11, f"Chest film. {MARKER} no effusion ___.")
        f.note("radiology", 10001, None, 30001, 20, None, f"Portable AP. {MARKER} clear lungs.")
        f.note("radiology", 10001, 20001, 30001, 40, 50, f"{MARKER} stored too late.")
        f.note("radiology", 10001, 20001, 30001, 60, 61, f"{MARKER} charted too late.")
        f.note("radiology", 10001, 20001, 30001, -30, -29, f"{MARKER} before the stay.")
        f.note("discharge", 10001, 20001, 30001, 80, 90, f"Discharge summary {MARKER}.", "DS")
        f.note("discharge", 10002, 20002, 30002, 16, None, f"Early summary {MARKER}.", "DS")
        f.note("radiology", 10002, 20002, 30002, 5, 6, f"Cardiomegaly {MARKER}.")
        return f

    def frame(self, table: str) -> pd.DataFrame:
        return pd.DataFrame(self.rows[table], columns=COLUMNS[table])

    def write(
        self,
        root: str | Path,
        fmt: str = "csv.gz",
        omit: tuple[str, ...] = (),
        empty: tuple[str, ...] = (),
        drop_columns: dict[str, list[str]] | None = None,
    ) -> Path:
        """Write every table except ``omit``; ``empty`` tables become 0-byte files."""
        root = Path(root)
        for table in COLUMNS:
            if table in omit:
                continue
            path = root / f"{table}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if table in empty:
                path.write_bytes(b"")
                continue
            df = self.frame(table)
            if drop_columns and table in drop_columns:
                df = df.drop(columns=drop_columns[table])
            df.to_csv(path, index=False)
        return root
