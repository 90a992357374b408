"""A small synthetic corpus and the settings of a seconds-long cache, shared by the cache tests."""

from __future__ import annotations

from pathlib import Path

from clinical_moe.config import load_config

#: Data settings that keep a cache build to seconds (tiny images, short ECGs and notes, 1 worker).
SMALL = [
    "data.workers=1",
    "data.image_size=16",
    "data.ecg_samples=100",
    "data.note_max_len=16",
    "data.note_vocab=100",
]


def small_corpus(folder: Path, n_patients: int, seed: int) -> Path:
    """A synthetic corpus of ``n_patients`` under ``folder / "corpus"`` (32 px images)."""
    from clinical_moe.data.synthetic import generate_corpus

    root = folder / "corpus"
    generate_corpus(
        root, n_patients=n_patients, seed=seed, workers=1, image_size=(32, 32), quiet=True
    )
    return root


def small_config(root: Path, cache: Path, *extra: str):
    """The default config on ``root`` with a small cache at ``cache``, plus overrides."""
    return load_config({}, [f"data.root={root}", f"data.cache_dir={cache}", *SMALL, *extra])
