"""Parquet copies of the MIMIC tables, and progress with an ETA while the large tables stream.

Both serve :mod:`clinical_moe.data.tables`, the one path every table is read through:

- ``<root>/<module>/<table>.parquet`` (e.g. converted once with pandas / DuckDB) is preferred to
  the ``.csv.gz`` beside it: the same columns, read in row batches with the same dtypes, the same
  blank-key accounting and the same errors naming the file.
- Streaming a table larger than :data:`PROGRESS_MIN_BYTES` (chartevents, labevents, notes) shows
  a tqdm bar in rows with an ETA. A Parquet file knows its row count; for a CSV it is estimated
  from the first MiB (bytes per row, and the gzip ratio). The bar is off under ``--quiet``
  (:func:`quiet_tables`) and when stderr is not a terminal.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd

#: Files smaller than this are read without a progress bar (they take well under a second).
PROGRESS_MIN_BYTES = 20 * 2**20
_QUIET = [False]


@contextlib.contextmanager
def quiet_tables(quiet: bool) -> Iterator[None]:
    """Within this block, table progress bars are off when ``quiet`` (``--quiet``)."""
    old, _QUIET[0] = _QUIET[0], bool(quiet) or _QUIET[0]
    try:
        yield
    finally:
        _QUIET[0] = old


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a core dependency (manifest)
        raise ImportError('Parquet tables need pyarrow: pip install "pyarrow>=14"') from exc
    return pq


def parquet_header(path: Path) -> list[str]:
    """Column names of a Parquet table (a damaged file raises a TableError naming it)."""
    from clinical_moe.data.tables import TableError

    try:
        return list(_pyarrow().ParquetFile(path).schema_arrow.names)
    except (OSError, ValueError) as exc:
        raise TableError(path, "corrupt", f"not a readable Parquet file ({exc})") from None


def read_parquet_chunks(
    path: Path,
    table: str,
    usecols: Sequence[str] | None,
    dtypes: Mapping[str, object],
    chunksize: int,
    keys: Sequence[str],
) -> Iterator[pd.DataFrame]:
    """Row batches of a Parquet table in the CSV reader's dtypes; blank keys dropped and counted.

    Raises:
        TableError: ``corrupt`` for an unreadable file, ``empty`` for one without rows.
    """
    from clinical_moe.data import damage
    from clinical_moe.data.tables import TableError, _coerce, _drop_blank_keys

    log = damage.current()
    try:
        f = _pyarrow().ParquetFile(path)
        batches = f.iter_batches(batch_size=chunksize, columns=list(usecols) if usecols else None)
        rows = 0
        for batch in batches:
            chunk = batch.to_pandas()
            rows += len(chunk)
            chunk, counted = _coerce(chunk, dtypes, table, keys, str(path), log)
            yield _drop_blank_keys(chunk, keys, counted, table, str(path), log)
    except (OSError, ValueError) as exc:
        raise TableError(path, "corrupt", f"Parquet read failed ({exc})") from None
    if rows == 0:
        raise TableError(path, "empty", f"table {table!r} has no rows")


def estimated_rows(path: Path) -> int | None:
    """Rows of a table: exact for Parquet, estimated from the first MiB for a CSV(.gz)."""
    try:
        if path.suffix == ".parquet":
            return int(_pyarrow().ParquetFile(path).metadata.num_rows)
        size = path.stat().st_size
        with open(path, "rb") as raw:
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw) as gz:
                    sample = gz.read(2**20)
                ratio = len(sample) / max(raw.tell(), 1)  # uncompressed / compressed bytes
            else:
                sample, ratio = raw.read(2**20), 1.0
        lines = sample.count(b"\n")
        return int(size * ratio * lines / max(len(sample), 1)) if lines else None
    except (OSError, EOFError, ValueError):
        return None  # damaged: the reader reports it


class _Progress:
    def __init__(self, bar) -> None:
        self.bar = bar

    def advance(self, rows: int) -> None:
        if self.bar is not None:
            if self.bar.total is not None and self.bar.n + rows > self.bar.total:
                self.bar.total = self.bar.n + rows  # the estimate was low
            self.bar.update(rows)


@contextlib.contextmanager
def table_progress(path: Path, name: str) -> Iterator[_Progress]:
    """A rows bar with an ETA for a large table (a no-op for small ones, quiet, or no TTY)."""
    if _QUIET[0] or path.stat().st_size < PROGRESS_MIN_BYTES:
        yield _Progress(None)
        return
    from tqdm.auto import tqdm

    bar = tqdm(
        total=estimated_rows(path),
        desc=f"reading {name}",
        unit="row",
        unit_scale=True,
        disable=None,  # off when stderr is not a terminal
    )
    try:
        yield _Progress(bar)
    finally:
        bar.close()
