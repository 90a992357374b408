"""clinical_moe: clinical multimodal learning when modalities are missing.

Public API: the data contracts (:class:`Batch`, :class:`ModalityTokens`, :class:`FusionOutput`),
the model registry (:func:`create_model`, :func:`list_models`) and config loading.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names and the module that defines each: imported on first use (PEP 562), so that
#: ``import clinical_moe.config`` and ``clinical-moe --help`` do not pay for torch.
_LAZY = {
    "MultimodalModel": "clinical_moe.model",
    "create_model": "clinical_moe.model",
    "list_models": "clinical_moe.model",
    "DEFAULT_MODALITIES": "clinical_moe.types",
    "Batch": "clinical_moe.types",
    "FusionOutput": "clinical_moe.types",
    "ModalityTokens": "clinical_moe.types",
}

if TYPE_CHECKING:
    from clinical_moe.model import MultimodalModel, create_model, list_models
    from clinical_moe.types import DEFAULT_MODALITIES, Batch, FusionOutput, ModalityTokens


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clinical_moe' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODALITIES",
    "Batch",
    "FusionOutput",
    "ModalityTokens",
    "MultimodalModel",
    "create_model",
    "list_models",
    "__version__",
]
