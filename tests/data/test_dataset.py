"""CachedDataset, collate and the modality-count sampler, on a small cache in the real layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from clinical_moe.data.dataset import CachedDataset, Collator, ModalityCountSampler, collate
from clinical_moe.testing import write_toy_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    write_toy_cache(path, n_stays=90, seed=3, shard_size=32)
    return path


def test_splits_and_presence_match_manifest(cache):
    full = CachedDataset(cache)
    parts = [CachedDataset(cache, s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(full) == 90
    ids = [set(p.rows["stay_id"]) for p in parts]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    sample = full[0]
    for m in full.modalities:
        assert (sample[m] is None) == (not sample["present"][m])


def test_collate_pads_and_masks(cache):
    ds = CachedDataset(cache, "train")
    batch = Collator(ds)([ds[i] for i in range(6)])
    B = 6
    ehr = batch.inputs["ehr"]
    lengths = [ds[i]["ehr"]["times"].shape[0] for i in range(B)]
    assert ehr["values"].shape[:2] == (B, max(lengths))
    assert ehr["time_mask"].sum(1).tolist() == lengths
    for m, name in enumerate(ds.modalities):
        absent = ~batch.present[:, m]
        for v in batch.inputs[name].values():
            assert v[absent].float().abs().sum() == 0, f"{name}: absent rows must be zero"
    assert batch.labels.shape == (B,)
    assert batch.ids == [ds[i]["id"] for i in range(B)]


def test_collator_handles_a_batch_without_a_modality(cache):
    ds = CachedDataset(cache, "train")
    m = ds.modalities.index("cxr")
    rows = np.flatnonzero(~ds.present[:, m])[:3]
    samples = [ds[int(i)] for i in rows]
    with pytest.raises(ValueError, match="cxr"):
        collate(samples, ds.modalities)
    batch = Collator(ds)(samples)
    assert not batch.present[:, m].any()
    assert batch.inputs["cxr"]["image"].shape[0] == 3


def test_dataset_pickles_for_worker_processes(cache):
    ds = CachedDataset(cache, "val")
    clone = pickle.loads(pickle.dumps(ds))
    a, b = ds[1], clone[1]
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["ehr"]["values"], b["ehr"]["values"])


def test_ehr_values_are_standardised_with_train_statistics(cache):
    ds = CachedDataset(cache, "train")
    vals = np.concatenate(
        [ds[i]["ehr"]["values"][ds[i]["ehr"]["obs_mask"]] for i in range(len(ds))]
    )
    assert abs(vals.mean()) < 0.1 and 0.8 < vals.std() < 1.2


def test_unknown_split_or_modality_is_named(cache):
    with pytest.raises(ValueError, match="'tset'"):
        CachedDataset(cache, "tset")
    with pytest.raises(ValueError, match="mri"):
        CachedDataset(cache, modalities=("ehr", "mri"))


def test_modality_count_sampler_orders_then_shuffles():
    present = np.array([[1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 1, 0], [1, 1, 1]], bool)
    s = ModalityCountSampler(present, warmup_epochs=1, seed=0)
    counts = present.sum(1)[list(s)]
    assert list(counts) == sorted(counts, reverse=True)
    s.set_epoch(1)
    later = [list(ModalityCountSampler(present, 1, seed=0)) for _ in range(2)]
    assert later[0] == later[1]  # deterministic per (seed, epoch)
    assert sorted(list(s)) == list(range(5))


def test_modality_count_sampler_splits_ranks_disjointly():
    present = np.random.default_rng(0).random((11, 3)) < 0.6
    ranks = [list(ModalityCountSampler(present, 2, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert not set(ranks[0]) & set(ranks[1])


def test_batches_feed_a_model(cache):
    from clinical_moe import create_model

    ds = CachedDataset(cache, "train")
    batch = Collator(ds)([ds[i] for i in range(4)])
    model = create_model(
        "late",
        modalities=ds.modalities,
        encoders={"ehr": {"num_static": 8}, "notes": {"vocab_size": 64}},
    ).eval()
    with torch.no_grad():
        assert model(batch).logits.shape == (4, 1)


def _copy_with_presence(cache, tmp_path, edit):
    """A copy of ``cache`` whose manifest presence flags are rewritten by ``edit(manifest)``."""
    import shutil

    import pandas as pd

    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    manifest = pd.read_parquet(out / "manifest.parquet")
    edit(manifest)
    manifest.to_parquet(out / "manifest.parquet")
    return out


def test_collator_learns_shapes_from_other_splits_when_a_split_lacks_a_modality(cache, tmp_path):
    def no_val_cxr(m):
        m.loc[m["split"] == "val", "has_cxr"] = False

    edited = _copy_with_presence(cache, tmp_path, no_val_cxr)
    val = CachedDataset(edited, "val")
    train = CachedDataset(edited, "train")
    batch = Collator(val)([val[i] for i in range(4)])
    ref = Collator(train)([train[i] for i in range(4)])
    assert not batch.present[:, val.modalities.index("cxr")].any()
    assert batch.inputs["cxr"]["image"].shape[1:] == ref.inputs["cxr"]["image"].shape[1:]


def test_modality_absent_from_the_whole_cache_is_a_clear_error(cache, tmp_path):
    def no_ecg(m):
        m["has_ecg"] = False

    edited = _copy_with_presence(cache, tmp_path, no_ecg)
    with pytest.raises(ValueError, match="'ecg'"):
        Collator(CachedDataset(edited, "train"))
