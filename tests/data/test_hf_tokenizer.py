"""Issue 13: notes for a Hugging Face backbone are tokenized by that model's own tokenizer.

A tiny WordPiece tokenizer (and a tiny BERT) are built locally in the test; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clinical_moe.config import load_config

transformers = pytest.importorskip(
    "transformers", reason='needs the optional dependency: pip install "clinical-moe[hf]"'
)
pytestmark = pytest.mark.xdist_group("synth_hf")

REPO = Path(__file__).resolve().parents[2]
SENTENCES = [
    "patient admitted with chest pain and shortness of breath",
    "chest x ray shows bilateral effusion and edema",
    "no acute distress , stable vital signs , plan discharge",
    "sepsis suspected , lactate elevated , started antibiotics",
]


def _tiny_tokenizer(path: Path) -> Path:
    """A WordPiece tokenizer trained on a few sentences, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0
    tok.train_from_iterator(
        SENTENCES, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = _tiny_tokenizer(tmp_path_factory.mktemp("hf") / "tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("hf_corpus") / "corpus"
    generate_corpus(root, n_patients=60, seed=11, workers=1, image_size=(32, 32), quiet=True)
    return root


def _cfg(corpus: Path, cache: Path, hf_dir: Path | None, *extra: str):
    overrides = [
        f"data.root={corpus}",
        f"data.cache_dir={cache}",
        "data.workers=1",
        "data.modalities=[ehr,notes]",
        "data.note_max_len=24",
        *extra,
    ]
    if hf_dir is not None:
        overrides += ["model.encoders.notes.backbone=hf", f"model.encoders.notes.hf_path={hf_dir}"]
    return load_config(REPO / "configs" / "tiny" / "late.yaml", overrides)


def test_preprocess_uses_the_models_tokenizer(corpus, hf_dir, tmp_path):
    from clinical_moe.data.cache import StaleCacheError, build_cache, check_cache
    from clinical_moe.data.hf_tokenizer import HFNoteTokenizer
    from clinical_moe.data.notes import load_notes
    from clinical_moe.data.store import CacheStore

    cfg = _cfg(corpus, tmp_path / "hf_cache", hf_dir)
    build_cache(cfg, quiet=True)
    store = CacheStore(tmp_path / "hf_cache")
    notes = store.summary["notes"]
    assert notes["tokenizer"].startswith("hf:") and notes["vocab_size"] < 200
    assert store.summary["fingerprint_inputs"]["notes_tokenizer"] == notes["tokenizer"]
    rows = store.manifest[store.manifest["has_notes"]]
    assert len(rows) > 0
    ids = np.stack(
        [store.read("notes", int(r.shard), int(r.row))["input_ids"] for r in rows.itertuples()]
    )
    real = ids[ids != 0]
    assert real.max() < notes["vocab_size"]
    assert (ids[..., 0][ids[..., 0] != 0] == 2).all()  # every real note starts with [CLS]
    # the same ids as the tokenizer gives each note's text (first real note of the corpus)
    texts = load_notes(corpus / "mimic-iv-note")["text"].tolist()
    enc, _ = HFNoteTokenizer(hf_dir, max_len=24).transform_padded(texts)
    assert any((enc == row).all(-1).any() for row in ids.reshape(-1, 24) if row.any())

    # a cache tokenized for another vocabulary is refused, naming the tokenizer
    word = _cfg(corpus, tmp_path / "word_cache", None)
    build_cache(word, quiet=True)
    with pytest.raises(StaleCacheError, match="notes tokenizer: word-level -> hf:"):
        check_cache(_cfg(corpus, tmp_path / "word_cache", hf_dir))
    with pytest.raises(StaleCacheError, match="notes tokenizer: hf:.* -> word-level"):
        check_cache(_cfg(corpus, tmp_path / "hf_cache", None))


def test_train_with_a_local_hf_notes_encoder(corpus, hf_dir, tmp_path):
    from pipelines import train as train_pipeline

    cfg = _cfg(
        corpus,
        tmp_path / "cache",
        hf_dir,
        f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_model=false",
        "train.num_threads=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    )
    train_pipeline.train(cfg, quiet=True)
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["notes"]["tokenizer"].startswith("hf:")


def test_missing_folder_and_bad_pad_id(tmp_path):
    from clinical_moe.data.hf_tokenizer import HFNoteTokenizer

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        HFNoteTokenizer(tmp_path / "nowhere")
    path = _tiny_tokenizer(tmp_path / "tok")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "[SEP]"  # id 3
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pads with id 3"):
        HFNoteTokenizer(path)


def test_notes_tokenized_once_into_the_decode_store(corpus, hf_dir, tmp_path):
    """A second task reads the model's ids from the store; a note whose text changed is redone."""
    from clinical_moe.data.cache import build_cache
    from clinical_moe.data.decode_store import entry_path, settings_dir
    from clinical_moe.data.hf_tokenizer import HFNoteTokenizer
    from clinical_moe.data.note_store import note_key, note_settings
    from clinical_moe.data.store import CacheStore

    store = tmp_path / "decoded"
    first = _cfg(corpus, tmp_path / "a", hf_dir, f"data.decode_store={store}")
    build_cache(first, quiet=True)
    counts = CacheStore(tmp_path / "a").summary["notes"]["store"]
    assert counts["tokenized"] > 0 and counts["from_store"] == 0

    second = _cfg(corpus, tmp_path / "b", hf_dir, f"data.decode_store={store}", "seed=5")
    build_cache(second, quiet=True)
    again = CacheStore(tmp_path / "b").summary["notes"]
    assert again["store"]["tokenized"] == 0
    assert again["store"]["from_store"] == counts["tokenized"]

    # the stored ids are the tokenizer's own; a changed text is a new key (never served stale)
    tok = HFNoteTokenizer(hf_dir, max_len=24)
    folder = settings_dir(store, note_settings(tok.identity_, 24))
    entries = sorted(folder.glob("*/*.npy"))
    assert len(entries) == counts["tokenized"]
    note_id = entries[0].stem.split("~")[0]
    from clinical_moe.data.notes import load_notes

    notes = load_notes(corpus / "mimic-iv-note")
    text = notes.loc[notes["note_id"].astype(str) == note_id, "text"].iloc[0]
    stored = np.load(entry_path(folder, note_key(note_id, text)))
    assert (stored == tok.transform_padded([text])[0][0]).all()
    assert note_key(note_id, text + " addendum") != note_key(note_id, text)
    # another max length is another folder, so ids of one length never reach the other
    assert settings_dir(store, note_settings(tok.identity_, 32)) != folder
