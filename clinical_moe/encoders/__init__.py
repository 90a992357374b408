"""Modality encoders. Importing this package registers every built-in encoder.

Registered names: ``ehr`` (irregular time series, mTAND or grid), ``cxr`` (MONAI 2D CNN or
precomputed embeddings), ``ecg`` (1D ResNet), ``notes`` (small transformer or a local Hugging Face
encoder) and ``sequence`` (generic padded feature sequences, for any other modality).
"""

from clinical_moe.encoders import cxr, ecg, ehr, generic, notes  # noqa: F401
from clinical_moe.encoders.base import ModalityEncoder
from clinical_moe.encoders.mtand import MultiTimeAttention, TimeEmbedding

__all__ = ["ModalityEncoder", "MultiTimeAttention", "TimeEmbedding"]
