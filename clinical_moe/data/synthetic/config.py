"""Configuration of the synthetic MIMIC-style corpus.

Everything that changes what the generator writes lives in :class:`SynthConfig`, so that a corpus is
fully described by its config (the config is copied into ``truth/effects.json``). The coefficients of
the generative story itself live in :mod:`clinical_moe.data.synthetic.latents`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SynthConfig:
    """What to generate and how.

    Two configs that compare equal produce byte-identical corpora, whatever the number of workers.
    """

    # Number of patients (subjects); each has one or more admissions with ICU stays.
    n_patients: int = 200
    # Master seed: every random stream is derived from (seed, shard index, purpose).
    seed: int = 0
    # Side length range in pixels of the written chest radiographs (rows drawn in [min, max]).
    image_size: tuple[int, int] = (512, 1024)
    # Patients per shard; ``None`` picks a size from ``n_patients`` only (never from ``workers``),
    # so that sharding, and therefore the bytes written, do not depend on the parallelism.
    shard_size: int | None = None
    # Worker processes; ``None`` = min(2, cpu count). Does not change the output.
    workers: int | None = None
    # Hide the progress bar (it is also hidden when stderr is not a terminal).
    quiet: bool = False
    # Write DICOM files (False: CXR metadata/labels/notes only, for fast table-only corpora).
    write_images: bool = True
    # Write WFDB ECG records (False: record list and measurements only).
    write_signals: bool = True
    # Hours after ICU admission inside which modality studies are mostly placed (pairing window).
    window_hours: float = 48.0
    # Fraction of chart values replaced by physiologically impossible ones (HR 9999, SpO2 150).
    impossible_rate: float = 0.002
    # gzip compression level of the ``.csv.gz`` tables (output is deterministic at any level).
    gzip_level: int = 6

    def resolved_workers(self) -> int:
        """Worker processes to use: the configured number or min(2, cpu count)."""
        if self.workers is not None:
            return max(1, int(self.workers))
        return max(1, min(2, os.cpu_count() or 1))

    def resolved_shard_size(self) -> int:
        """Patients per shard, a function of ``n_patients`` only (about 8+ shards, 25..500 each)."""
        if self.shard_size is not None:
            return max(1, int(self.shard_size))
        return int(min(500, max(25, math.ceil(self.n_patients / 8))))

    def n_shards(self) -> int:
        """Number of shards covering all patients."""
        return max(1, math.ceil(self.n_patients / self.resolved_shard_size()))

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for impossible settings."""
        if self.n_patients < 1:
            raise ValueError(f"n_patients must be >= 1, got {self.n_patients}")
        if self.n_patients > 2_000_000:
            raise ValueError("n_patients > 2,000,000 would overflow the 8-digit MIMIC id ranges")
        lo, hi = self.image_size
        if not 16 <= lo <= hi:
            raise ValueError(f"image_size must satisfy 16 <= min <= max, got {self.image_size}")
        if self.window_hours <= 0:
            raise ValueError(f"window_hours must be > 0, got {self.window_hours}")
