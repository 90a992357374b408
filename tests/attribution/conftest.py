"""Shared fixtures of the attribution tests: one CPU thread, tiny seeded models."""

from __future__ import annotations

import functools

import torch

from clinical_moe import create_model

GENERIC4 = ("m0", "m1", "m2", "m3")


@functools.cache
def tiny_model(name: str, modalities: tuple[str, ...] = GENERIC4, num_classes: int = 1):
    """A seeded, untrained model in eval mode with the cheap generic sequence encoders."""
    torch.manual_seed(0)
    model = create_model(
        name, modalities=modalities, num_classes=num_classes, d_model=16, num_tokens=3
    )
    return model.eval()
