"""Tokenized notes in the decode store: each note tokenized once per tokenizer, for any task.

A Hugging Face tokenizer's ids depend on nothing but the note's text and the tokenizer, so, like a
decoded image, they are stored once and read by every task, window and seed that pairs the note
(issue 13). On real MIMIC-IV-Note (2.6 M notes) tokenizing is minutes per build; a new task then
tokenizes only the notes no earlier build paired.

Layout, beside the images and waveforms of :mod:`~clinical_moe.data.decode_store`::

    notes-<digest>/settings.json   tokenizer identity (hash of its vocabulary files), max length
    notes-<digest>/<ab>/<key>.npy  (note_max_len,) int32 ids, padded with 0 as the cache stores them

``key`` is ``<note_id>~<sha1 of the text>``: a note whose text changed (a corrected or
re-generated release) gets a new key and is tokenized again, never served stale. Entries are
written atomically, so several builds may fill the folder at once.

The package's own word-level tokenizer is *not* stored here: its vocabulary is fitted on each
task's train split, so its ids belong to that task's cache, not to the note.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from hashlib import sha1
from pathlib import Path

import numpy as np

from clinical_moe.data.decode_store import _atomic_array, entry_path, settings_dir

#: Bump when the way notes are tokenized into the store changes.
NOTE_VERSION = 1
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,120}")


def note_settings(identity: str, max_len: int) -> dict:
    """Everything that decides a stored note's ids besides its text."""
    return {
        "modality": "notes",
        "tokenizer": str(identity),
        "note_max_len": int(max_len),
        "version": NOTE_VERSION,
    }


def note_key(note_id: str, text: str) -> str:
    """``<note_id>~<text hash>``; an id that is not a safe file name is itself hashed."""
    note_id = str(note_id)
    if not _SAFE_ID.fullmatch(note_id) or "~" in note_id:
        note_id = "id" + sha1(note_id.encode()).hexdigest()[:16]
    digest = sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{note_id}~{digest}"


def tokenize_with_store(
    tok, texts: Sequence[str], note_ids: Sequence[str], store: str | Path
) -> tuple[np.ndarray, dict[str, int]]:
    """Ids of every note, read from the store or tokenized now and stored.

    Args:
        tok: A tokenizer with ``identity_``, ``max_len`` and ``transform_padded`` (e.g.
            :class:`~clinical_moe.data.hf_tokenizer.HFNoteTokenizer`).
        texts: Note texts, row for row with ``note_ids``.
        note_ids: The notes' ids (MIMIC-IV-Note ``note_id``).
        store: The decode store root (``data.decode_store``).

    Returns:
        ``(ids int64 (N, max_len), counts)`` with counts ``{"tokenized", "from_store"}``.
    """
    texts = [t if isinstance(t, str) else "" for t in texts]
    folder = settings_dir(store, note_settings(tok.identity_, tok.max_len))
    keys = [note_key(i, t) for i, t in zip(note_ids, texts, strict=True)]
    ids = np.zeros((len(keys), tok.max_len), np.int64)  # (N, L)
    missing: list[int] = []
    for row, key in enumerate(keys):
        try:
            ids[row] = np.load(entry_path(folder, key))
        except (FileNotFoundError, ValueError):  # absent, or a torn file from a killed writer
            missing.append(row)
    if missing:
        new, _ = tok.transform_padded([texts[r] for r in missing])  # (M, L)
        made: set[Path] = set()
        for r, row_ids in zip(missing, new, strict=True):
            ids[r] = row_ids
            path = entry_path(folder, keys[r])
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            _atomic_array(path, row_ids.astype(np.int32))
    return ids, {"tokenized": len(missing), "from_store": len(keys) - len(missing)}
