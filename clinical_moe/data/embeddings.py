"""Precomputed per-event embeddings (a foundation model's features) read from files.

``data.embeddings.<modality>: PATH`` (or a list of paths) gives each CXR image (``dicom_id``),
ECG (``study_id``) or note (``note_id``) a vector. A source is either

- a Parquet file with the id column (``dicom_id`` / ``study_id`` / ``note_id``, or ``id``) and
  either one list-valued column (``embedding``) or one numeric column per feature; or
- a ``.npy`` array ``(n, F)`` with its ids beside it, one per row, in ``<stem>.ids.csv`` /
  ``<stem>.ids.parquet`` (first column, or the id column) or ``<stem>.ids.txt`` (one per line).

Several sources of one modality (e.g. two foundation models, as in MedMIX) are concatenated
feature-wise, in the order given; an event gets a vector only if every source has its id, so an
id missing from any source makes the modality missing for that event (counted in the summary).
The vectors then stand in for the decoded files: the cache stores ``<m>_embedding.npy`` and the
encoder reads them through the CXR encoder's ``precomputed`` backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: The id that keys each modality's events.
ID_COLUMN = {"cxr": "dicom_id", "ecg": "study_id", "notes": "note_id"}


def source_paths(spec) -> list[Path]:
    """``PATH`` or ``[PATH, ...]`` -> paths."""
    return [Path(p) for p in ([spec] if isinstance(spec, str) else list(spec))]


def _id_file(path: Path) -> Path:
    for suffix in (".ids.csv", ".ids.parquet", ".ids.txt"):
        f = path.with_name(path.stem + suffix)
        if f.is_file():
            return f
    raise FileNotFoundError(
        f"embedding file {path} has no ids file beside it ({path.stem}.ids.csv, .ids.parquet "
        "or .ids.txt, one id per row of the array)"
    )


def _read_ids(path: Path, id_column: str) -> np.ndarray:
    if path.suffix == ".txt":
        return np.asarray(path.read_text().split(), dtype=str)
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
    col = id_column if id_column in table else table.columns[0]
    return table[col].astype(str).to_numpy()


def read_source(path: str | Path, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n,) str, vectors float32 (n, F))`` of one embedding file.

    Raises:
        FileNotFoundError: The file (or a ``.npy``'s ids file) is missing.
        ValueError: Ids and rows disagree, or no id / feature columns are found; the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.embeddings.{modality}: {path} not found")
    id_column = ID_COLUMN[modality]
    if path.suffix == ".npy":
        vectors = np.load(path, mmap_mode="r")
        ids = _read_ids(_id_file(path), id_column)
    else:
        table = pd.read_parquet(path)
        col = next((c for c in (id_column, "id") if c in table), None)
        if col is None:
            raise ValueError(f"{path}: no id column ({id_column} or id)")
        ids = table[col].astype(str).to_numpy()
        rest = table.drop(columns=[col])
        if "embedding" in rest:
            vectors = np.stack(rest["embedding"].to_numpy()) if len(rest) else np.zeros((0, 0))
        else:
            rest = rest.select_dtypes("number")
            if rest.shape[1] == 0:
                raise ValueError(f"{path}: no embedding column and no numeric feature columns")
            vectors = rest.to_numpy()
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(
            f"{path}: {len(ids)} ids for an array of shape {tuple(vectors.shape)}; "
            "expected one id per row of an (n, F) array"
        )
    return ids, np.asarray(vectors, dtype=np.float32)


class EmbeddingTable:
    """Every source of one modality joined on the event id: ``lookup(ids) -> (vectors, found)``.

    Args:
        spec: ``PATH`` or ``[PATH, ...]`` (``data.embeddings.<modality>``).
        modality: ``cxr``, ``ecg`` or ``notes`` (decides the id column).

    Attributes:
        dim: Concatenated feature size F.
        sources: ``[(path, F_i)]``.
    """

    def __init__(self, spec, modality: str) -> None:
        self.modality = modality
        self.sources: list[tuple[str, int]] = []
        index: dict[str, int] | None = None
        parts = []
        for path in source_paths(spec):
            ids, vectors = read_source(path, modality)
            row = pd.Series(np.arange(len(ids)), index=ids)
            row = row[~row.index.duplicated(keep="last")]
            parts.append((row, vectors))
            self.sources.append((str(path), int(vectors.shape[1])))
            keys = set(row.index)
            index = keys if index is None else index & keys
        order = sorted(index or ())
        self._row = {k: i for i, k in enumerate(order)}
        blocks = [v[r.loc[order].to_numpy()] if order else v[:0] for r, v in parts]
        self.vectors = np.concatenate(blocks, axis=1) if blocks else np.zeros((0, 0), np.float32)
        self.dim = int(self.vectors.shape[1])

    def lookup(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors float32 (n_found, F), found bool (n,))`` for event ids, in order."""
        rows = [self._row.get(str(i), -1) for i in ids]
        found = np.asarray([r >= 0 for r in rows], bool)
        return self.vectors[[r for r in rows if r >= 0]], found


def event_id(modality: str, path: str) -> str:
    """The id of a paired CXR / ECG event from its file path (``{dicom_id}.dcm``, ``{study_id}``)."""
    return Path(path).name.split(".")[0] if modality == "cxr" else Path(path).name


def embed_events(plan, embeddings: dict, note_ids: dict[int, list[str]], summary: dict) -> None:
    """Replace the planned files / notes of each modality in ``embeddings`` by their vectors.

    Fills ``plan.embedded[m]`` (stay_id -> ``(vectors (n, F), hours (n,)[, targets (n, K)])``),
    empties ``plan.cxr`` / ``plan.ecg`` / ``plan.notes`` for ``m`` (nothing is decoded for it),
    and writes ``summary["embeddings"][m]`` (sources, dim, events with / without a vector, stays
    left without one) and the encoder options (the ``precomputed`` backbone, ``embedding_dim``).

    Args:
        plan: A :class:`~clinical_moe.data.plan.StayPlan` (cxr / ecg / notes already planned).
        embeddings: ``data.embeddings``.
        note_ids: stay_id -> note ids, row for row with ``plan.notes``.
        summary: The preprocessing summary being built.
    """
    out = summary.setdefault("embeddings", {})
    for m, spec in embeddings.items():
        table = EmbeddingTable(spec, m)
        planned = getattr(plan, m)
        targets = plan.targets.get(m, {})
        embedded, total, found_n, lost_stays = {}, 0, 0, 0
        for sid, items in planned.items():
            if m == "notes":
                ids, hours = note_ids.get(sid, []), np.asarray(items[1], np.float32)
            else:
                ids = [event_id(m, path) for path, _ in items]
                hours = np.asarray([h for _, h in items], np.float32)
            vectors, found = table.lookup(ids)
            total, found_n = total + len(ids), found_n + int(found.sum())
            if not found.any():
                lost_stays += 1
                continue
            entry = (vectors, hours[found])
            if sid in targets:
                entry = (*entry, targets[sid][found])  # (n, K) rows of the kept events
            embedded[sid] = entry
        plan.embedded[m] = embedded
        setattr(plan, m, {})
        out[m] = {
            "sources": [list(s) for s in table.sources],
            "dim": table.dim,
            "events": total,
            "with_embedding": found_n,
            "missing_embedding": total - found_n,
            "stays_without_embedding": lost_stays,
        }
        summary.setdefault("encoder_kwargs", {})[m] = {
            "type": "cxr",  # the CXR encoder's precomputed backbone serves any modality's vectors
            "backbone": "precomputed",
            "embedding_dim": table.dim,
        }
