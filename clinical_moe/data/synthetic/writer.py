"""Sharded, parallel, deterministic writing of the corpus.

Patients are cut into shards of a size that depends on ``n_patients`` only. Each shard is made by
one worker from its own random streams (``SeedSequence(seed, spawn_key=(shard,))``): the worker
writes its DICOM / WFDB files directly and its table rows as header-less CSV part files; the parent
then concatenates the parts in shard order into the final tables (gzip with ``mtime=0``). The bytes
written therefore do not depend on the number of workers, and memory stays bounded by one shard per
worker.
"""

from __future__ import annotations

import csv
import gzip
import io
import multiprocessing as mp
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from clinical_moe.data.synthetic.config import SynthConfig
from clinical_moe.data.synthetic.cxr_tables import cxr_shard
from clinical_moe.data.synthetic.ecg_tables import ecg_shard
from clinical_moe.data.synthetic.ehr_events import chartevents_table, labevents_table
from clinical_moe.data.synthetic.ehr_tables import (
    admissions_table,
    d_items_table,
    d_labitems_table,
    diagnoses_table,
    icustays_table,
    patients_table,
)
from clinical_moe.data.synthetic.notes_text import notes_shard
from clinical_moe.data.synthetic.observer import add_observed_risk
from clinical_moe.data.synthetic.plan import plan_shard, shard_rngs
from clinical_moe.data.synthetic.schema import COLUMNS, TABLE_PATHS
from clinical_moe.data.synthetic.truth import (
    STAY_COLUMNS,
    STUDY_COLUMNS,
    stays_truth,
    studies_truth,
)

PARTS_DIR = ".parts"
SHARD_TABLES = [
    "patients",
    "admissions",
    "icustays",
    "diagnoses_icd",
    "chartevents",
    "labevents",
    "cxr_metadata",
    "cxr_chexpert",
    "cxr_records",
    "ecg_records",
    "ecg_measurements",
    "radiology",
    "discharge",
    "truth_stays",
    "truth_studies",
]


def table_columns(name: str) -> list[str]:
    """Column list of a table written by the corpus."""
    if name in ("radiology", "discharge"):
        return COLUMNS["notes"]
    if name == "truth_stays":
        return STAY_COLUMNS
    if name == "truth_studies":
        return STUDY_COLUMNS
    return COLUMNS[name]


def _write_csv(df: pd.DataFrame, path: Path, header: bool) -> None:
    df.to_csv(path, index=False, header=header, lineterminator="\n")


def make_shard(cfg: SynthConfig, shard_index: int, out_dir: str) -> dict:
    """Make one shard: write its files and table parts; return its row counts.

    A module-level function so that worker processes can run it.
    """
    root = Path(out_dir)
    plan = plan_shard(cfg, shard_index)
    rng = shard_rngs(cfg, shard_index)
    tables: dict[str, pd.DataFrame] = {
        "patients": patients_table(plan),
        "admissions": admissions_table(plan, rng["ehr"]),
        "icustays": icustays_table(plan),
        "diagnoses_icd": diagnoses_table(plan, rng["ehr"]),
    }
    tables["chartevents"], n_bad = chartevents_table(plan, rng["ehr"], cfg.impossible_rate)
    tables["labevents"] = labevents_table(plan, rng["ehr"])
    cxr_tabs, cxr_truth, findings = cxr_shard(plan, rng["cxr"], cfg, root, rng["cxr_findings"])
    ecg_tabs, ecg_truth = ecg_shard(plan, rng["ecg"], cfg, root)
    note_tabs, note_truth = notes_shard(plan, rng["notes"], findings)
    tables.update(cxr_tabs)
    tables.update(ecg_tabs)
    tables.update(note_tabs)
    tables["truth_studies"] = studies_truth(cxr_truth + ecg_truth + note_truth)
    # the ceiling (observed_risk) reads the shard's recorded study findings
    tables["truth_stays"] = add_observed_risk(stays_truth(plan), tables["truth_studies"])
    for name, df in tables.items():
        part = root / PARTS_DIR / name / f"{shard_index:06d}.csv"
        part.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(df[table_columns(name)], part, header=False)
    counts = {name: len(df) for name, df in tables.items()}
    counts["impossible_values"] = n_bad
    counts["dicom_files"] = len(tables["cxr_records"]) if cfg.write_images else 0
    counts["ecg_files"] = len(tables["ecg_records"]) if cfg.write_signals else 0
    return counts


def _header_line(columns: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(columns)
    return buf.getvalue().encode()


def concat_parts(root: Path, name: str, n_shards: int, gzip_level: int) -> Path:
    """Concatenate the part files of table ``name`` in shard order into its final file."""
    dest = root / TABLE_PATHS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw:
        if dest.suffix == ".gz":
            out = gzip.GzipFile(
                filename=dest.name[:-3], mode="wb", compresslevel=gzip_level, fileobj=raw, mtime=0
            )
        else:
            out = raw
        out.write(_header_line(table_columns(name)))
        for k in range(n_shards):
            part = root / PARTS_DIR / name / f"{k:06d}.csv"
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        if out is not raw:
            out.close()
    return dest


def write_static(root: Path, gzip_level: int) -> None:
    """Write the dictionary tables (d_items, d_labitems)."""
    for name, df in (("d_items", d_items_table()), ("d_labitems", d_labitems_table())):
        dest = root / TABLE_PATHS[name]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(dest, "wb") as raw,
            gzip.GzipFile(
                filename=dest.name[:-3], mode="wb", compresslevel=gzip_level, fileobj=raw, mtime=0
            ) as gz,
        ):
            gz.write(df.to_csv(index=False, lineterminator="\n").encode())


def run_shards(cfg: SynthConfig, root: Path) -> dict[str, int]:
    """Make every shard (in parallel when ``workers`` > 1) and merge the parts; return counts."""
    from tqdm.auto import tqdm

    n = cfg.n_shards()
    workers = min(cfg.resolved_workers(), n)
    disable = cfg.quiet or not sys.stderr.isatty()
    totals: dict[str, int] = {}
    with tqdm(total=n, desc="synth shards", unit="shard", disable=disable) as bar:
        if workers <= 1:
            results = []
            for k in range(n):
                results.append(make_shard(cfg, k, str(root)))
                bar.update(1)
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
                futures = [pool.submit(make_shard, cfg, k, str(root)) for k in range(n)]
                for fut in as_completed(futures):
                    fut.result()  # surface worker errors early
                    bar.update(1)
                results = [f.result() for f in futures]
    for counts in results:
        for key, v in counts.items():
            totals[key] = totals.get(key, 0) + v
    for name in tqdm(SHARD_TABLES, desc="synth tables", unit="table", disable=disable):
        concat_parts(root, name, n, cfg.gzip_level)
    shutil.rmtree(root / PARTS_DIR)
    write_static(root, cfg.gzip_level)
    return totals
