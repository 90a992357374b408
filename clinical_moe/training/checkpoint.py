"""Checkpoints that resume a run exactly, written atomically and loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python primitives::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "rng": [per-rank RNG states],
     "epoch": int, "step": int, "position": int,   # batches of `epoch` already trained on
     "early_stopping": {...}, "meters": {...}, "run_id": str | None, "world_size": int}

RNG states (torch CPU and CUDA, numpy, python, the augmentation generator) are stored as
tensors / ints so that ``torch.load(..., weights_only=True)`` accepts them. The sampler needs no
state: its order is a pure function of (seed, epoch), so ``position`` is enough to skip exactly the
batches already seen (see :mod:`clinical_moe.training.sampling`).

Layout: ``<train.checkpoint_dir>/<run name>/{last.pt, best.pt, run.json}``; ``run.json`` records
the MLflow run id as soon as the run exists, so even a run killed before its first checkpoint
resumes into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST, BEST, RUN_FILE = "last.pt", "best.pt", "run.json"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the one-line message names the file."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``: tensors and primitives only).

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: It is truncated, corrupt, not a torch checkpoint, or holds objects
            other than tensors and primitives (refused unread); one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types here, with multi-paragraph texts
        unsafe = "Unsupported global" in str(err)
        why = (
            "it holds objects other than tensors and numbers, refused for safety"
            if unsafe
            else f"truncated or not a torch checkpoint ({type(err).__name__})"
        )
        raise CheckpointError(
            f"{path}: cannot load the checkpoint: {why}; point to another best.pt / last.pt or "
            "re-run training"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (no state mapping)")
    return state


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG stream a training step draws from, as tensors and plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(pstate, dtype=torch.int64),
            "gauss": pgauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch from one integer (and ask torch for deterministic kernels)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


class CheckpointDir:
    """The files of one run: ``last.pt`` (resume), ``best.pt`` (best val AUROC), ``run.json``.

    Args:
        path: ``<train.checkpoint_dir>/<run name>``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def clear(self) -> None:
        """Forget a previous run in this directory (a fresh, non-resumed start)."""
        for name in (LAST, BEST, RUN_FILE):
            (self.path / name).unlink(missing_ok=True)

    def save(self, state: dict, name: str = LAST) -> Path:
        return atomic_save(state, self.path / name)

    def load_last(self) -> dict | None:
        return load_checkpoint(self.last) if self.last.exists() else None

    def write_run(self, info: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.path / RUN_FILE)

    def read_run(self) -> dict:
        f = self.path / RUN_FILE
        return json.loads(f.read_text()) if f.exists() else {}
