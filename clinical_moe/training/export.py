"""A flat-tensor view of a model, for MLflow's pytorch flavor (which cannot pass a ``Batch``).

:class:`FlatModel` takes ``present`` and then every modality input as positional tensors, in the
order of :func:`flat_inputs`, and returns probabilities. Its MLflow signature is inferred from a real
example batch, so the logged model documents the exact input names, dtypes and shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clinical_moe.metrics import probabilities
from clinical_moe.types import Batch


def flat_inputs(batch: Batch) -> dict[str, np.ndarray]:
    """``{"present": ..., "<modality>.<key>": ...}`` as numpy arrays, in FlatModel's argument order.

    Per-event training targets (``<modality>.targets``) are labels, not model inputs: left out.
    """
    out = {"present": batch.present.cpu().numpy()}
    for m in batch.modalities:
        for k, v in batch.inputs[m].items():
            if k != "targets":
                out[f"{m}.{k}"] = v.detach().cpu().numpy()
    return out


class FlatModel(nn.Module):
    """Wraps a :class:`~clinical_moe.model.MultimodalModel`: flat tensors in, probabilities out.

    Args:
        model: The trained model (evaluated in eval mode).
        names: Input names as produced by :func:`flat_inputs` (``"present"`` first).
        task: ``binary`` / ``multiclass`` / ``multilabel`` (selects sigmoid or softmax).
    """

    def __init__(self, model: nn.Module, names: list[str], task: str) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.task = task
        self.modalities = tuple(model.modalities)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, tensors))
        inputs: dict[str, dict[str, torch.Tensor]] = {m: {} for m in self.modalities}
        for name, t in named.items():
            if name != "present":
                m, key = name.split(".", 1)
                inputs[m][key] = t
        batch = Batch(inputs, named["present"].bool(), None, modalities=self.modalities)
        self.model.eval()
        logits = self.model(batch).logits  # (B, C)
        return torch.as_tensor(probabilities(logits.detach().cpu(), self.task))
