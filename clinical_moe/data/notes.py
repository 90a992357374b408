"""MIMIC-IV-Note loading, leakage-safe pairing to ICU stays, and a small word tokenizer.

Privacy rule: note text never appears in logs, warnings, exceptions or reprs. Messages name a
note_id or a row number and counts, nothing else.

Leakage rule (:func:`pair_notes`): a note may feed a prediction made at ``intime +
prediction_hours`` only if its charttime AND its storetime (when present) are strictly before that
time, and its charttime is at or after the window start. Discharge summaries are written at
discharge, so they fail this rule for a 48 h prediction; they are also excluded by type by default
(``exclude_types``), in case a release stores a date-only charttime.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.data import damage
from clinical_moe.data.tables import TableError, find_table, iter_table, parse_times

logger = logging.getLogger(__name__)

NOTE_COLUMNS = [
    "note_id",
    "subject_id",
    "hadm_id",
    "note_type",
    "note_seq",
    "charttime",
    "storetime",
    "text",
]
NOTE_KINDS = ("radiology", "discharge")


def load_notes(
    note_root: str | Path,
    kinds: Sequence[str] = NOTE_KINDS,
    subject_ids: Iterable[int] | None = None,
    chunksize: int = 100_000,
) -> pd.DataFrame:
    """Read ``note/radiology`` and / or ``note/discharge`` (``.csv.gz`` or ``.csv``) in chunks.

    Args:
        note_root: The MIMIC-IV-Note root, the directory that holds ``note/``.
        kinds: Which note files to read.
        subject_ids: Keep only these subjects (filtered chunk by chunk, to bound memory).
        chunksize: Rows per chunk.

    Returns:
        Notes with :data:`NOTE_COLUMNS` (ids ``Int64``, text ``string``, times parsed), plus
        ``source`` (the kind). Rows without a usable charttime are dropped and counted (by
        reason, in the :mod:`~clinical_moe.data.damage` ledger); an absent, damaged, empty or
        header-only file gives a warning naming it and no rows; an undecodable byte in a note is
        replaced (the note is kept) and counted.
    """
    log = damage.current()
    keep_subjects = None
    if subject_ids is not None:
        keep_subjects = pd.array(sorted({int(s) for s in subject_ids}), dtype="Int64")
    parts = []
    for kind in kinds:
        if kind not in NOTE_KINDS:
            raise ValueError(f"unknown note kind {kind!r}; choose from {NOTE_KINDS}")
        table = f"note/{kind}"
        lost = f"no {kind} notes will be used"
        path = find_table(note_root, table, required=False)
        if path is None:
            log.missing_source(table, None, "absent", f"not found under {note_root}", lost)
            continue
        kind_parts = []
        try:
            for chunk in iter_table(note_root, table, NOTE_COLUMNS, chunksize=chunksize):
                if keep_subjects is not None:
                    chunk = chunk[chunk["subject_id"].isin(keep_subjects)]
                if not chunk.empty:
                    kind_parts.append(parse_times(chunk.copy(), table, path).assign(source=kind))
        except TableError as err:  # optional: a damaged / empty note file counts as absent
            log.missing_source(table, err.path, err.reason, err.detail, lost)
            continue
        parts += kind_parts
    if not parts:
        empty = {
            c: pd.Series(dtype=t)
            for c, t in [
                ("note_id", "string"),
                ("subject_id", "Int64"),
                ("hadm_id", "Int64"),
                ("note_type", "string"),
                ("note_seq", "Int64"),
                ("charttime", "datetime64[ns]"),
                ("storetime", "datetime64[ns]"),
                ("text", "string"),
                ("source", "string"),
            ]
        }
        return pd.DataFrame(empty)
    notes = pd.concat(parts, ignore_index=True)
    no_time = notes["charttime"].isna()
    if no_time.any():
        ids = notes.loc[no_time, "note_id"].head(5).tolist()
        logger.warning(
            "notes: dropped %d note(s) without a charttime (e.g. note_id %s)",
            int(no_time.sum()),
            ids,
        )
        notes = notes[~no_time].reset_index(drop=True)
    return notes


def pair_notes(
    stays: pd.DataFrame,
    notes: pd.DataFrame,
    prediction_hours: float = 48.0,
    window_start_hours: float = 0.0,
    exclude_types: Sequence[str] = ("DS", "AD"),
    max_notes: int | None = None,
) -> pd.DataFrame:
    """Attach to each stay the notes available before its prediction time (leakage guard).

    A note of the stay's subject is kept when ``intime + window_start_hours <= charttime``,
    ``charttime < intime + prediction_hours`` and, when storetime is present,
    ``storetime < intime + prediction_hours``; and its note_type is not in ``exclude_types``.
    Every (stay, note) candidate that fails is counted under its first failing reason:
    ``before_window``, ``charted_after_prediction``, ``stored_after_prediction``,
    ``excluded_type``; then ``beyond_max_notes`` when ``max_notes`` keeps only the latest ones.

    Args:
        stays: ``subject_id``, ``stay_id``, ``intime`` per stay.
        notes: Output of :func:`load_notes`.
        prediction_hours: Prediction time, hours after intime.
        window_start_hours: Window start, hours after intime (negative reaches before the ICU).
        exclude_types: note_type codes never used ("DS" discharge summary, "AD" addendum).
        max_notes: Keep at most this many (the latest) notes per stay; None keeps all.

    Returns:
        One row per kept (stay, note): ``stay_id, subject_id, note_id, note_type, charttime,
        storetime, hours`` (charttime in hours since intime) ``, text``, sorted by stay and time.
        ``attrs["exclusions"]`` maps reason -> count (also logged).
    """
    missing = [c for c in ("subject_id", "stay_id", "intime") if c not in stays.columns]
    missing += [
        f"notes.{c}"
        for c in ("note_id", "subject_id", "note_type", "charttime", "storetime", "text")
        if c not in notes.columns
    ]
    if missing:
        raise ValueError(f"pair_notes: missing column(s) {missing}")
    cand = stays[["subject_id", "stay_id", "intime"]].merge(
        notes[["note_id", "subject_id", "note_type", "charttime", "storetime", "text"]],
        on="subject_id",
    )
    pred = cand["intime"] + pd.to_timedelta(prediction_hours, unit="h")
    start = cand["intime"] + pd.to_timedelta(window_start_hours, unit="h")
    reasons = {
        "before_window": (cand["charttime"] < start).fillna(True),
        "charted_after_prediction": (cand["charttime"] >= pred).fillna(True),
        "stored_after_prediction": (cand["storetime"] >= pred).fillna(False),
        "excluded_type": cand["note_type"].isin(list(exclude_types)).fillna(False),
    }
    out_mask = pd.Series(False, index=cand.index)
    exclusions = {}
    for reason, bad in reasons.items():
        first = bad & ~out_mask
        exclusions[reason] = int(first.sum())
        out_mask |= bad
    kept = cand[~out_mask].assign(
        hours=lambda d: (d["charttime"] - d["intime"]).dt.total_seconds() / 3600.0
    )
    kept = kept.sort_values(["stay_id", "charttime", "note_id"], ignore_index=True)
    exclusions["beyond_max_notes"] = 0
    if max_notes is not None:
        rank = kept.groupby("stay_id").cumcount(ascending=False)
        exclusions["beyond_max_notes"] = int((rank >= max_notes).sum())
        kept = kept[rank < max_notes].reset_index(drop=True)
    kept = kept[
        ["stay_id", "subject_id", "note_id", "note_type", "charttime", "storetime", "hours", "text"]
    ]
    kept.attrs["exclusions"] = exclusions
    logger.info(
        "notes: paired %d note(s) to %d stay(s); excluded %s",
        len(kept),
        kept["stay_id"].nunique(),
        exclusions,
    )
    return kept


_TOKEN_RE = re.compile(r"___|[a-z]+(?:'[a-z]+)?|\d+(?:\.\d+)?|[^\sa-z\d]")


class NoteTokenizer:
    """Word-level tokenizer fitted on training notes only (scikit-learn style).

    Text is lower-cased and split by a simple regex into words, numbers and single punctuation
    marks; MIMIC's de-identification span ``___`` is its own special token. Ids: 0 = pad,
    1 = unknown (any word not in the training vocabulary), 2 = ``___``; words follow by
    decreasing training frequency (ties alphabetical), keeping those seen ``min_freq`` times, at
    most ``max_vocab`` ids in all.

    Attributes:
        vocab_: dict word -> id, learned by :meth:`fit`.
        n_docs_: number of training texts seen.
    """

    PAD, UNK, REDACTED = 0, 1, 2
    SPECIALS = ("[PAD]", "[UNK]", "___")

    def __init__(
        self,
        max_vocab: int = 20_000,
        min_freq: int = 2,
        max_len: int = 256,
        truncation: str = "head",
    ) -> None:
        if truncation not in ("head", "tail"):
            raise ValueError("truncation must be 'head' (keep the start) or 'tail' (keep the end)")
        self.max_vocab = max_vocab
        self.min_freq = min_freq
        self.max_len = max_len
        self.truncation = truncation

    def __repr__(self) -> str:  # parameters only: the vocabulary holds note words
        return (
            f"NoteTokenizer(max_vocab={self.max_vocab}, min_freq={self.min_freq}, "
            f"max_len={self.max_len}, truncation={self.truncation!r})"
        )

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Lower-case and split one text into tokens."""
        return _TOKEN_RE.findall(text.lower()) if isinstance(text, str) else []

    def fit(self, texts: Iterable[str]) -> NoteTokenizer:
        """Learn the vocabulary from training texts (never from val / test)."""
        counts: Counter[str] = Counter()
        n = 0
        for text in texts:
            counts.update(self.tokenize(text))
            n += 1
        counts.pop("___", None)
        words = sorted(
            (w for w, c in counts.items() if c >= self.min_freq), key=lambda w: (-counts[w], w)
        )
        words = words[: max(self.max_vocab - len(self.SPECIALS), 0)]
        self.vocab_ = {w: i for i, w in enumerate([*self.SPECIALS, *words])}
        self.n_docs_ = n
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "vocab_"):
            raise RuntimeError("NoteTokenizer is not fitted: call fit(train texts) first")

    def transform(self, texts: Iterable[str]) -> list[np.ndarray]:
        """Token ids (int64) per text, truncated to ``max_len``; unknown words map to 1."""
        self._check_fitted()
        vocab, out = self.vocab_, []
        for text in texts:
            ids = np.fromiter((vocab.get(t, self.UNK) for t in self.tokenize(text)), dtype=np.int64)
            out.append(
                ids[: self.max_len]
                if self.truncation == "head"
                else ids[-self.max_len :]
                if self.max_len
                else ids[:0]
            )
        return out

    def transform_padded(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int64 (N, max_len), attention_mask bool (N, max_len))``, padded with 0."""
        seqs = self.transform(texts)
        ids = np.zeros((len(seqs), self.max_len), dtype=np.int64)
        mask = np.zeros((len(seqs), self.max_len), dtype=bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = True
        return ids, mask

    def fit_transform(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`fit` then :meth:`transform` on the same (training) texts."""
        return self.fit(texts).transform(texts)
