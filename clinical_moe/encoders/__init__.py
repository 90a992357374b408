"""Modality encoders. Importing this package registers every built-in encoder."""

from clinical_moe.encoders import generic  # noqa: F401
from clinical_moe.encoders.base import ModalityEncoder

__all__ = ["ModalityEncoder"]
