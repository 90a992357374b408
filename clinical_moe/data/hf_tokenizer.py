"""Tokenizing notes with a Hugging Face model's own tokenizer, from a local directory only.

When the notes encoder is ``backbone: hf`` with ``hf_path``, its token ids must come from that
model's vocabulary: the package's word-level ids (fitted on the train notes) would be fed into a
WordPiece / BPE embedding table and silently mean other words. Preprocessing then uses
:class:`HFNoteTokenizer` instead of :class:`~clinical_moe.data.notes.NoteTokenizer`, and the
tokenizer's identity (a hash of its vocabulary files) enters the cache fingerprint, so a cache
tokenized for another vocabulary is rebuilt by ``train`` and refused by ``evaluate``.

Nothing is downloaded: ``AutoTokenizer.from_pretrained(path, local_files_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

HF_HINT = 'the notes backbone "hf" needs transformers: pip install "clinical-moe[hf]"'


def load_tokenizer(path: str | Path):
    """``transformers.AutoTokenizer`` from a local directory (never downloaded)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"hf_path {path} is not a folder; models and tokenizers are never downloaded - save "
            "them locally first (model.save_pretrained(path); tokenizer.save_pretrained(path))"
        )
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(HF_HINT) from exc
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class HFNoteTokenizer:
    """The :class:`~clinical_moe.data.notes.NoteTokenizer` interface over a model's own tokenizer.

    Args:
        path: Local directory holding the tokenizer files (usually the model's ``hf_path``).
        max_len: Tokens kept per note, special tokens included (longer notes are truncated).

    Attributes:
        vocab_: The tokenizer's vocabulary (token -> id); nothing is fitted.
        identity_: Hash of the vocabulary files (what the cache fingerprint records).

    The cache marks padding by id 0 (``attention_mask = ids != 0``), so the tokenizer's pad id
    must be 0, as in BERT-family vocabularies (``[PAD]`` = 0).
    """

    def __init__(self, path: str | Path, max_len: int = 256) -> None:
        from clinical_moe.data.fingerprint import tokenizer_identity

        self.path, self.max_len = Path(path), int(max_len)
        self.tok = load_tokenizer(self.path)
        pad = self.tok.pad_token_id
        if pad != 0:
            raise ValueError(
                f"the tokenizer in {self.path} pads with id {pad}, but the cache marks padding "
                "by id 0; use a tokenizer whose [PAD] id is 0 (BERT-family vocabularies)"
            )
        self.vocab_ = self.tok.get_vocab()
        self.identity_ = tokenizer_identity(self.path)

    def __repr__(self) -> str:
        return f"HFNoteTokenizer(path={str(self.path)!r}, max_len={self.max_len})"

    def fit(self, texts: Iterable[str]) -> HFNoteTokenizer:
        """Nothing to learn: the vocabulary is the model's (kept for the tokenizer interface)."""
        return self

    def transform_padded(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int64 (N, max_len), attention_mask bool (N, max_len))``, padded with 0."""
        texts = [t if isinstance(t, str) else "" for t in texts]
        if not texts:
            return np.zeros((0, self.max_len), np.int64), np.zeros((0, self.max_len), bool)
        enc = self.tok(
            texts,
            max_length=self.max_len,
            truncation=True,
            padding="max_length",
            return_attention_mask=True,
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)  # (N, L)
        mask = np.asarray(enc["attention_mask"], dtype=bool)  # (N, L)
        return np.where(mask, ids, 0), mask
