"""Training: the loop (engine), losses, checkpoints, resumable sampling, DDP helpers, routing stats.

``pipelines/train.py`` composes these with the MLflow logger; nothing in this package imports MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "infer_task": "clinical_moe.training.losses",
    "task_loss": "clinical_moe.training.losses",
    "modality_dropout": "clinical_moe.training.sampling",
}

__all__ = ["infer_task", "modality_dropout", "task_loss"]


def __getattr__(name: str) -> Any:
    """Import on first use (PEP 562): ``import clinical_moe.training.x`` stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clinical_moe.training' has no attribute {name!r}")
