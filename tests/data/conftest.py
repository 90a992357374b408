"""Fixtures shared by the loader tests."""

from pathlib import Path

import pytest

# The real sample files live next to the repository: /work/shared/samples for /work/main.
SAMPLES_DIR = (Path(__file__).resolve().parents[2] / ".." / "shared" / "samples").resolve()


@pytest.fixture
def samples_dir() -> Path:
    """The folder of real MIMIC / PTB-XL / DICOM sample files; skips the test when it is absent."""
    if not SAMPLES_DIR.is_dir():
        pytest.skip(f"../shared/samples not found: {SAMPLES_DIR} (real-format tests need it)")
    return SAMPLES_DIR
