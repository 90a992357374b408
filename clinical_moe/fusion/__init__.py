"""Fusion heads. Importing this package registers every built-in head."""

from clinical_moe.fusion import (
    baselines,  # noqa: F401
    conf_smoe,  # noqa: F401
    flex_moe,  # noqa: F401
    fusemoe,  # noqa: F401
    i2moe,  # noqa: F401
)
from clinical_moe.fusion.base import FusionHead, masked_mean

__all__ = ["FusionHead", "masked_mean"]
