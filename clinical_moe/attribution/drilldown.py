"""Within-modality drill-down: which variables, leads or pixels of one modality drive a stay.

All of it explains the target log-odds through the modality's encoder and the fusion head, the
other modalities held as they are:

- EHR ``values`` ``(B, L, V)``: Integrated Gradients (Sundararajan, Taly & Yan 2017) with a zero
  baseline, masks unchanged; the cache stores standardised values, so 0 is each variable's
  training mean. Summed over time points -> one attribution per variable (:func:`ehr_variables`).
- CXR ``image`` ``(B, N, 1, H, W)`` in [0, 1]: Integrated Gradients from a black image, summed over
  images and channels -> a saliency map (:func:`cxr_saliency`).
- ECG ``signal`` ``(B, N, 12, S)``: occlusion (captum ``FeatureAblation``) of lead x time windows,
  each window in turn set to 0 mV (a flat line) in every recording of the stay: the change in
  log-odds, ``f(x) - f(x with the window flat)`` (:func:`ecg_occlusion`). Not IG: the ECG encoder
  normalises its feature maps (GroupNorm), which makes it invariant to the signal's scale, so every
  straight path from a flat baseline is flat too and IG would miss the whole effect.

Notes are never drilled into: their inputs are token ids of patient free text, which must not be
shown anywhere. Cost: ``n_steps`` passes of the full model (encoders included) per batch, so this
is meant for a few stays (a notebook drill-down), not for a whole split.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from clinical_moe.attribution.target import Target
from clinical_moe.data.ecg import CANONICAL_LEADS
from clinical_moe.model import MultimodalModel
from clinical_moe.types import Batch

DRILLABLE = {"ehr": "values", "ecg": "signal", "cxr": "image"}
ECG_LEADS = CANONICAL_LEADS  # the lead order of the ECG inputs


def input_integrated_gradients(
    model: MultimodalModel,
    batch: Batch,
    target: Target,
    modality: str,
    key: str | None = None,
    n_steps: int = 32,
) -> torch.Tensor:
    """IG of the target log-odds w.r.t. ``batch.inputs[modality][key]`` (zero baseline).

    Args:
        model: The model (eval mode).
        batch: A few stays.
        target: What is attributed.
        modality: ``"ehr"`` or ``"cxr"`` (``"ecg"`` works but see :func:`ecg_occlusion`;
            never notes).
        key: The input tensor (default :data:`DRILLABLE` ``[modality]``).
        n_steps: Integration steps.

    Returns:
        A tensor shaped like the input; zero for stays without the modality.
    """
    from captum.attr import IntegratedGradients

    x, forward = _input_forward(model, batch, target, modality, key)
    with torch.enable_grad():
        attr = IntegratedGradients(forward).attribute(
            x, baselines=torch.zeros_like(x), n_steps=n_steps
        )
    keep = batch.present_of(modality).view(len(batch), *([1] * (x.dim() - 1)))
    return torch.where(keep, attr.detach(), torch.zeros(()))


def _input_forward(model, batch: Batch, target: Target, modality: str, key: str | None):
    """The raw input of ``modality`` and a captum forward function of it (rows tile the batch)."""
    if modality == "notes":
        raise ValueError("notes are patient free text: no drill-down into them")
    key = key or DRILLABLE.get(modality)
    if key is None or key not in batch.inputs.get(modality, {}):
        raise KeyError(f"no input {key!r} for modality {modality!r}")
    model.eval()
    B = len(batch)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        reps = inp.shape[0] // B
        inputs = {
            m: {k: torch.cat([v] * reps) for k, v in d.items()} for m, d in batch.inputs.items()
        }
        inputs[modality][key] = inp
        big = replace(
            batch,
            inputs=inputs,
            present=batch.present.repeat(reps, 1),
            labels=None,
            ids=list(range(inp.shape[0])),
        )
        return target.log_odds(model(big).logits.float())

    return batch.inputs[modality][key].float(), forward


def ecg_occlusion(
    model: MultimodalModel, batch: Batch, target: Target, bins: int = 10
) -> np.ndarray:
    """``(B, 12, bins)``: change in log-odds when one lead x time window is flattened to 0 mV.

    NaN for stays without an ECG. See the module docstring.
    """
    from captum.attr import FeatureAblation

    x, forward = _input_forward(model, batch, target, "ecg", "signal")  # (B, N, 12, S)
    _, N, leads, S = x.shape
    edges = torch.tensor_split(torch.arange(S), bins)
    window = torch.zeros(S, dtype=torch.long)
    for b, idx in enumerate(edges):
        window[idx] = b
    mask = torch.arange(leads).view(leads, 1) * bins + window.view(1, S)  # (12, S)
    mask = mask.view(1, 1, leads, S).expand(1, N, leads, S)
    with torch.no_grad():
        attr = FeatureAblation(forward).attribute(x, baselines=0.0, feature_mask=mask)
    first = torch.stack([idx[0] for idx in edges])  # (bins,) one sample inside each window
    out = attr[:, 0][:, :, first].numpy()  # (B, 12, bins)
    out[~batch.present_of("ecg").numpy()] = np.nan
    return out


def ehr_variables(attr: torch.Tensor, variables: list[str], ids: list[int]) -> pd.DataFrame:
    """``(B, L, V)`` EHR IG -> long table (stay_id, variable, attribution), summed over time."""
    per = attr.sum(1).numpy()  # (B, V)
    names = (
        list(variables)
        if len(variables) == per.shape[1]
        else [f"var{v}" for v in range(per.shape[1])]
    )
    return pd.DataFrame(
        [
            {"stay_id": int(sid), "variable": n, "attribution": float(a)}
            for sid, row in zip(ids, per)
            for n, a in zip(names, row)
        ]
    )


def cxr_saliency(attr: torch.Tensor) -> np.ndarray:
    """``(B, N, 1, H, W)`` CXR IG -> ``(B, H, W)`` saliency (summed over images and channels)."""
    return attr.sum(dim=(1, 2)).numpy()
