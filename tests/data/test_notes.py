"""Notes: loading, the leakage guard, train-only tokenisation, and no note text in any message."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest

from clinical_moe.data.notes import NoteTokenizer, load_notes, pair_notes
from clinical_moe.data.tables import read_table

try:
    from tests.data.mimic_factory import MARKER, MimicFactory
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    from mimic_factory import MARKER, MimicFactory


@pytest.fixture
def root(tmp_path):
    return MimicFactory.default().write(tmp_path / "note-root")


def _stays(root):
    return read_table(root, "icu/icustays")


def test_load_notes_dtypes_and_subject_filter(root):
    notes = load_notes(root)
    assert len(notes) == 8 and set(notes["source"]) == {"radiology", "discharge"}
    assert notes["text"].dtype == "string" and notes["hadm_id"].dtype == "Int64"
    assert notes["hadm_id"].isna().sum() == 1  # nullable in radiology
    assert pd.api.types.is_datetime64_any_dtype(notes["storetime"])
    only = load_notes(root, subject_ids=[10002], chunksize=2)
    assert set(only["subject_id"]) == {10002} and len(only) == 2


def test_absent_note_file_warns(tmp_path):
    root = MimicFactory.default().write(tmp_path, omit=("note/discharge",))
    with pytest.warns(UserWarning, match="note/discharge"):
        notes = load_notes(root)
    assert set(notes["source"]) == {"radiology"}
    with pytest.warns(UserWarning):
        assert load_notes(tmp_path / "nowhere").empty


def test_leakage_guard(root):
    pairs = pair_notes(_stays(root), load_notes(root), prediction_hours=48)
    kept = pairs.groupby("stay_id")["note_id"].apply(list).to_dict()
    assert kept == {30001: ["10001-RR-1", "10001-RR-2"], 30002: ["10002-RR-6"]}
    assert "10001-RR-3" not in set(pairs["note_id"])  # charted at 40 h but stored at 50 h
    assert not pairs["note_type"].isin(["DS"]).any()
    assert pairs.attrs["exclusions"] == {
        "before_window": 1,
        "charted_after_prediction": 2,
        "stored_after_prediction": 1,
        "excluded_type": 1,
        "beyond_max_notes": 0,
    }
    assert pairs["hours"].tolist() == [10.0, 20.0, 5.0]
    merged = pairs.merge(_stays(root)[["stay_id", "intime"]], on="stay_id")
    cutoff = merged["intime"] + pd.Timedelta(hours=48)
    assert (merged["charttime"] < cutoff).all() and (merged["charttime"] >= merged["intime"]).all()
    assert (merged["storetime"].isna() | (merged["storetime"] < cutoff)).all()


def test_leakage_guard_is_time_based_even_without_type_rule(root):
    pairs = pair_notes(_stays(root), load_notes(root), exclude_types=())
    ds = pairs[pairs["note_type"] == "DS"]
    assert ds["note_id"].tolist() == ["10002-DS-2"]  # charted at 16 h, no storetime
    assert "10001-DS-1" not in set(pairs["note_id"])  # written at discharge (80 h)


def test_window_start_and_max_notes(root):
    notes = load_notes(root)
    early = pair_notes(_stays(root), notes, window_start_hours=-48)
    assert "10001-RR-5" in set(early["note_id"])
    last = pair_notes(_stays(root), notes, max_notes=1)
    assert last.loc[last["stay_id"] == 30001, "note_id"].tolist() == ["10001-RR-2"]
    assert last.attrs["exclusions"]["beyond_max_notes"] == 1


def test_tokenizer_fitted_on_train_only():
    texts = pd.DataFrame(
        {
            "split": ["train", "train", "val", "test"],
            "text": [
                "Left pleural effusion. ___ noted.",
                "No effusion, no pneumothorax.",
                "New cardiomegaly.",
                "Effusion and cardiomegaly.",
            ],
        }
    )
    tok = NoteTokenizer(min_freq=1, max_len=6).fit(texts.loc[texts["split"] == "train", "text"])
    assert tok.n_docs_ == 2
    assert "cardiomegaly" not in tok.vocab_ and "effusion" in tok.vocab_
    val_ids = tok.transform(texts.loc[texts["split"] == "val", "text"])[0]
    assert val_ids.tolist() == [1, tok.UNK, tok.vocab_["."]]  # "new" and "cardiomegaly": unknown
    ids = tok.transform(["Left ___ effusion"])[0]
    assert ids.tolist() == [tok.vocab_["left"], tok.REDACTED, tok.vocab_["effusion"]]
    padded, mask = tok.transform_padded(["effusion", "no effusion no effusion no effusion no"])
    assert padded.shape == mask.shape == (2, 6) and padded.dtype == np.int64
    assert mask.sum(axis=1).tolist() == [1, 6] and padded[0, 1:].tolist() == [0] * 5
    strict = NoteTokenizer(min_freq=2).fit(texts.loc[texts["split"] == "train", "text"])
    assert "left" not in strict.vocab_ and "effusion" in strict.vocab_
    with pytest.raises(RuntimeError, match="not fitted"):
        NoteTokenizer().transform(["x"])


def test_tokenizer_max_vocab_keeps_most_frequent():
    tok = NoteTokenizer(max_vocab=4, min_freq=1).fit(["b b a", "b c c"])
    assert list(tok.vocab_) == ["[PAD]", "[UNK]", "___", "b"]


def test_note_text_never_reaches_logs_warnings_or_errors(tmp_path, caplog):
    f = MimicFactory.default()
    f.add(
        "note/radiology",
        note_id="10001-RR-99",
        subject_id=10001,
        hadm_id=20001,
        note_type="RR",
        note_seq=99,
        charttime=None,
        storetime=None,
        text=f"{MARKER} no time",
    )
    root = f.write(tmp_path / "ok")
    messages = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notes = load_notes(root)
        pairs = pair_notes(_stays(root), notes, max_notes=1)
        tok = NoteTokenizer(min_freq=1).fit(pairs["text"])
        tok.transform_padded(notes["text"])
        messages.append(repr(tok))
        load_notes(tmp_path / "absent")
        with pytest.raises(ValueError) as err:
            pair_notes(_stays(root), notes.drop(columns="storetime"))
        messages.append(str(err.value))
        bad = f.frame("note/radiology").astype({"subject_id": object})
        bad.loc[0, "subject_id"] = MARKER  # a text cell in an id column
        (tmp_path / "bad" / "note").mkdir(parents=True)
        bad.to_csv(tmp_path / "bad" / "note" / "radiology.csv.gz", index=False)
        # issue 15: the bad row is dropped and counted (by reason, never by value)
        kept = load_notes(tmp_path / "bad", kinds=["radiology"])
        assert len(kept) == len(notes[notes["source"] == "radiology"]) - 1
        (tmp_path / "bad" / "note" / "radiology.csv.gz").write_bytes(b"\x1f\x8b\x08")
        with pytest.warns(UserWarning, match="radiology.csv.gz") as err:
            load_notes(tmp_path / "bad", kinds=["radiology"])
        messages += [str(w.message) for w in err]
    assert MARKER in " ".join(notes["text"])  # the marker really went through the code
    assert any("10001-RR-99" in r.getMessage() for r in caplog.records)  # named by id
    messages += [r.getMessage() for r in caplog.records]
    messages += [str(w.message) for w in caught]
    assert caplog.records and caught
    assert not [m for m in messages if MARKER.lower() in m.lower()]
