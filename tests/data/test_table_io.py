"""Issue 13: Parquet copies of the MIMIC tables are read like the ``.csv.gz`` files (same cache),
and the large tables' progress bar gets a row estimate for its ETA."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from clinical_moe.config import load_config

pytestmark = pytest.mark.xdist_group("synth_tables")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic corpus, and a copy whose MIMIC-IV tables are Parquet (all columns text)."""
    from clinical_moe.data.synthetic import generate_corpus

    base = tmp_path_factory.mktemp("tables")
    csv = base / "csv"
    generate_corpus(csv, n_patients=50, seed=13, workers=1, image_size=(32, 32), quiet=True)
    pq = base / "parquet"
    for f in (csv / "mimic-iv").rglob("*.csv.gz"):
        out = pq / f.relative_to(csv).with_name(f.name.replace(".csv.gz", ".parquet"))
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.read_csv(f, dtype=str).to_parquet(out, index=False)
    for release in ("mimic-cxr", "mimic-iv-ecg", "mimic-iv-note"):
        (pq / release).symlink_to(csv / release, target_is_directory=True)
    return csv, pq


def _build(root: Path, cache: Path) -> Path:
    from clinical_moe.data.cache import build_cache

    cfg = load_config(
        {},
        [
            f"data.root={root}",
            f"data.cache_dir={cache}",
            "data.workers=1",
            "data.image_size=16",
            "data.ecg_samples=100",
            "data.note_max_len=16",
        ],
    )
    return build_cache(cfg, quiet=True)


def test_parquet_tables_give_the_same_cache(corpora, tmp_path):
    from clinical_moe.data.tables import find_table

    csv, pq = corpora
    assert find_table(pq / "mimic-iv", "icu/chartevents").suffix == ".parquet"
    a, b = _build(csv, tmp_path / "a"), _build(pq, tmp_path / "b")
    files = sorted(p.relative_to(a) for p in (a / "shards").rglob("*") if p.is_file())
    assert files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = pd.read_parquet(a / "manifest.parquet"), pd.read_parquet(b / "manifest.parquet")
    pd.testing.assert_frame_equal(ma, mb)


def test_row_estimate_for_the_eta(corpora):
    from clinical_moe.data.table_io import estimated_rows

    csv, pq = corpora
    for name in ("icu/chartevents", "hosp/labevents"):
        true = len(pd.read_csv(csv / "mimic-iv" / f"{name}.csv.gz", usecols=[0]))
        assert estimated_rows(pq / "mimic-iv" / f"{name}.parquet") == true
        guess = estimated_rows(csv / "mimic-iv" / f"{name}.csv.gz")
        assert 0.7 * true < guess < 1.3 * true, (name, guess, true)


def test_damaged_parquet_names_the_file(tmp_path):
    from clinical_moe.data.tables import TableError, read_table

    (tmp_path / "hosp").mkdir()
    (tmp_path / "hosp" / "patients.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TableError, match="patients.parquet"):
        read_table(tmp_path, "hosp/patients")
