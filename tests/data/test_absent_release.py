"""Issue 13: a release absent from ``data.root`` (only ``mimic-iv/``) makes its modality missing
for every stay; ``train`` then builds the model without it, with a warning naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinical_moe.config import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("synth_absent")


@pytest.fixture(scope="module")
def ehr_only_root(tmp_path_factory) -> Path:
    from clinical_moe.data.synthetic import generate_corpus

    full = tmp_path_factory.mktemp("absent") / "corpus"
    generate_corpus(full, n_patients=80, seed=7, workers=1, image_size=(32, 32), quiet=True)
    root = full.parent / "ehr_only"
    root.mkdir()
    (root / "mimic-iv").symlink_to(full / "mimic-iv", target_is_directory=True)
    return root


def test_train_drops_absent_modalities_with_a_warning(ehr_only_root, tmp_path):
    from pipelines import train as train_pipeline

    overrides = [
        f"data.root={ehr_only_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.workers=1",
        "data.image_size=16",
        "data.ecg_samples=100",
        f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_model=false",
        "train.num_threads=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    ]
    cfg = load_config(REPO / "configs" / "tiny" / "late.yaml", overrides)
    with pytest.warns(UserWarning) as record:
        train_pipeline.train(cfg, quiet=True)
    messages = [str(w.message) for w in record]
    for m in ("cxr", "ecg", "notes"):
        assert any(f"modality {m!r}" in t and "dropped from the model" in t for t in messages), m
    assert not any("modality 'ehr'" in t and "dropped" in t for t in messages)
    # the run's checkpoint holds an EHR-only model, and evaluate re-opens it the same way
    from clinical_moe.runs import load_run

    runs = sorted((tmp_path / "ckpt").glob("*/best.pt"))
    assert runs, list((tmp_path / "ckpt").rglob("*"))
    with pytest.warns(UserWarning, match="dropped from the model"):
        loaded = load_run(checkpoint=runs[0])
    assert tuple(loaded.model.modalities) == ("ehr",)


def test_no_modality_at_all_is_an_error(ehr_only_root, tmp_path):
    from clinical_moe.data.cache import build_cache
    from clinical_moe.data.dataset import present_modalities

    cfg = load_config(
        {},
        [
            f"data.root={ehr_only_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.workers=1",
            "data.modalities=[cxr,notes]",
        ],
    )
    with pytest.warns(UserWarning):
        build_cache(cfg, quiet=True)
    with pytest.raises(ValueError, match="any of the modalities"), pytest.warns(UserWarning):
        present_modalities(cfg.data.cache_dir, cfg.data.modalities)
