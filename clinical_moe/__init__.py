"""clinical_moe: clinical multimodal learning when modalities are missing.

Public API: the data contracts (:class:`Batch`, :class:`ModalityTokens`, :class:`FusionOutput`),
the model registry (:func:`create_model`, :func:`list_models`) and config loading.
"""

from clinical_moe.model import MultimodalModel, create_model, list_models
from clinical_moe.types import DEFAULT_MODALITIES, Batch, FusionOutput, ModalityTokens

__version__ = "0.1.0"

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
