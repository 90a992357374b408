"""Issue 13: Hugging Face note ids tokenized once, into the decode store, then read by any task.

On the notes of one corpus (``--corpus``; every note of ``mimic-iv-note``), with a WordPiece
tokenizer of ``--vocab`` words trained locally on a sample of them (nothing is downloaded), times
in one run:

1. ``direct``: ``HFNoteTokenizer.transform_padded`` over all notes (what a build did before);
2. ``first``: :func:`~clinical_moe.data.note_store.tokenize_with_store` into an empty store
   (tokenize + write every entry);
3. ``again``: the same call on the filled store (what a new task or seed pays).

``again`` must return the same ids as ``direct``. Tokenizers run on one thread
(``RAYON_NUM_THREADS=1``) so the ratios are not a matter of how many cores were free.

Usage::

    python -m benchmarks.bench_note_store --corpus runs/bq/corpus-n20000-s0 \\
        --out benchmarks/results/note_store_n20000.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import add_common_args, environment, finish  # noqa: E402


def _tokenizer(texts: list[str], vocab: int, path: Path) -> Path:
    """A BERT-style WordPiece tokenizer trained on ``texts``, saved in ``path``."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as the cache needs
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    fast.save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> dict:
    import numpy as np

    from clinical_moe.data.hf_tokenizer import HFNoteTokenizer
    from clinical_moe.data.note_store import tokenize_with_store
    from clinical_moe.data.notes import load_notes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="a corpus with mimic-iv-note/")
    parser.add_argument("--vocab", type=int, default=30000, help="WordPiece vocabulary size")
    parser.add_argument("--max-len", type=int, default=256, help="tokens kept per note")
    add_common_args(parser)
    args = parser.parse_args(argv)
    env = environment()

    notes = load_notes(Path(args.corpus) / "mimic-iv-note")
    texts = notes["text"].astype(str).tolist()
    ids = notes["note_id"].astype(str).tolist()
    work = Path(tempfile.mkdtemp(prefix="note_store_"))
    try:
        path = _tokenizer(texts[:5000], args.vocab, work / "tokenizer")
        tok = HFNoteTokenizer(path, max_len=args.max_len)
        t0 = time.perf_counter()
        direct, _ = tok.transform_padded(texts)  # (N, L)
        t_direct = time.perf_counter() - t0
        times, counts = {}, {}
        for step in ("first", "again"):
            t0 = time.perf_counter()
            got, counts[step] = tokenize_with_store(tok, texts, ids, work / "decoded")
            times[step] = time.perf_counter() - t0
        store_mb = sum(f.stat().st_size for f in (work / "decoded").rglob("*.npy")) / 1024**2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "note_store",
        "environment": env,
        "corpus": str(args.corpus),
        "notes": len(texts),
        "vocab": args.vocab,
        "max_len": args.max_len,
        "seconds": {"direct": round(t_direct, 2), **{k: round(v, 2) for k, v in times.items()}},
        "counts": counts,
        "again_over_direct": round(times["again"] / t_direct, 3),
        "first_over_direct": round(times["first"] / t_direct, 3),
        "store_mb": round(store_mb, 1),
        "identical_ids": bool(np.array_equal(got, direct)),
    }
    return finish(report, args.out)


if __name__ == "__main__":
    main()
