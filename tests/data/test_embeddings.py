"""Issue 13: precomputed per-event embeddings (``data.embeddings.<m>``) become that modality's
inputs: Parquet or ``.npy`` + ids, several sources concatenated, missing ids counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinical_moe.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("synth_embeddings")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("emb_corpus") / "corpus"
    generate_corpus(root, n_patients=60, seed=5, workers=1, image_size=(32, 32), quiet=True)
    return root


def _vec(key: str, dim: int) -> np.ndarray:
    """A deterministic vector per id (what the cache must hold for that event)."""
    seed = int.from_bytes(key.encode()[-6:], "little")
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


@pytest.fixture(scope="module")
def sources(corpus, tmp_path_factory) -> dict:
    """cxr: a Parquet (list column, ~1/3 of ids dropped) + a .npy with ids; ecg: numeric columns."""
    from clinical_moe.data.cxr import read_cxr_metadata
    from clinical_moe.data.ecg import read_record_list

    out = tmp_path_factory.mktemp("emb")
    dicoms = read_cxr_metadata(corpus / "mimic-cxr")["dicom_id"].astype(str).tolist()
    kept = [d for i, d in enumerate(dicoms) if i % 3 != 0]
    pd.DataFrame({"dicom_id": kept, "embedding": [_vec(d, 6) for d in kept]}).to_parquet(
        out / "cxr_a.parquet"
    )
    np.save(out / "cxr_b.npy", np.stack([_vec(d + "b", 2) for d in dicoms]))
    (out / "cxr_b.ids.txt").write_text("\n".join(dicoms))
    studies = read_record_list(corpus / "mimic-iv-ecg")["study_id"].astype(str).tolist()
    table = pd.DataFrame(np.stack([_vec(s, 4) for s in studies]), columns=list("abcd"))
    table.insert(0, "study_id", studies)
    table.to_parquet(out / "ecg.parquet")
    return {"dir": out, "kept": set(kept), "dicoms": set(dicoms)}


def _cfg(corpus: Path, cache: Path, sources: dict, *extra: str):
    d = sources["dir"]
    overrides = [
        f"data.root={corpus}",
        f"data.cache_dir={cache}",
        "data.workers=1",
        "data.max_events=2",
        "data.modalities=[ehr,cxr,ecg]",
        f"data.embeddings.cxr=[{d / 'cxr_a.parquet'},{d / 'cxr_b.npy'}]",
        f"data.embeddings.ecg={d / 'ecg.parquet'}",
        *extra,
    ]
    return load_config(REPO / "configs" / "tiny" / "late.yaml", overrides)


def test_embeddings_become_the_modality_inputs(corpus, sources, tmp_path):
    from clinical_moe.data.cache import build_cache
    from clinical_moe.data.fingerprint import stale_reason
    from clinical_moe.data.store import CacheStore

    cfg = _cfg(corpus, tmp_path / "cache", sources)
    build_cache(cfg, quiet=True)
    store = CacheStore(tmp_path / "cache")
    emb = store.summary["embeddings"]
    assert emb["cxr"]["dim"] == 8 and emb["ecg"]["dim"] == 4
    assert emb["cxr"]["missing_embedding"] > 0 and emb["cxr"]["with_embedding"] > 0
    assert emb["ecg"]["missing_embedding"] == 0
    assert store.summary["encoder_kwargs"]["cxr"]["backbone"] == "precomputed"
    shard = tmp_path / "cache" / "shards" / "00000"
    assert (shard / "cxr_embedding.npy").is_file() and not (shard / "cxr_image.npy").exists()
    # every stored cxr vector is [source a | source b] of one of the kept dicom ids
    expected = {tuple(np.r_[_vec(d, 6), _vec(d + "b", 2)].round(5)) for d in sources["kept"]}
    rows = store.manifest[store.manifest["has_cxr"]]
    assert len(rows)
    for r in rows.itertuples():
        x = store.read("cxr", int(r.shard), int(r.row))
        assert x["embedding"].shape == (2, 8) and "image" not in x
        for v in x["embedding"][x["event_mask"]]:
            assert tuple(v.round(5)) in expected
    # a changed embedding file makes the cache stale
    assert stale_reason(cfg) is None
    table = pd.read_parquet(sources["dir"] / "ecg.parquet")
    table.iloc[:-1].to_parquet(tmp_path / "ecg2.parquet")
    other = _cfg(
        corpus, tmp_path / "cache", sources, f"data.embeddings.ecg={tmp_path / 'ecg2.parquet'}"
    )
    assert "data.embeddings" in stale_reason(other)


def test_train_on_embeddings(corpus, sources, tmp_path):
    from pipelines import train as train_pipeline

    cfg = _cfg(
        corpus,
        tmp_path / "cache",
        sources,
        f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_model=false",
        "train.num_threads=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    )
    train_pipeline.train(cfg, quiet=True)


def test_bad_embedding_specs(tmp_path):
    from clinical_moe.data.embeddings import EmbeddingTable

    with pytest.raises(ConfigError, match="data.embeddings.ehr"):
        load_config({}, ["data.embeddings.ehr=/x.parquet"])
    np.save(tmp_path / "v.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(FileNotFoundError, match="ids file"):
        EmbeddingTable(str(tmp_path / "v.npy"), "cxr")
    (tmp_path / "v.ids.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 ids for an array of shape"):
        EmbeddingTable(str(tmp_path / "v.npy"), "cxr")
    with pytest.raises(FileNotFoundError, match="data.embeddings.ecg"):
        EmbeddingTable(str(tmp_path / "none.parquet"), "ecg")
