"""Within-modality drill-down: EHR / CXR Integrated Gradients, ECG occlusion, never notes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clinical_moe.attribution import Target
from clinical_moe.attribution.drilldown import (
    cxr_saliency,
    ecg_occlusion,
    ehr_variables,
    input_integrated_gradients,
)
from clinical_moe.testing import random_batch

from .conftest import tiny_model

MODS = ("ehr", "cxr", "ecg", "notes")
TARGET = Target()


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("concat", MODS)  # the real default encoders
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    return model, random_batch(model, batch_size=3, present=present, seed=1)


def _log_odds(model, batch, modality, key, value):
    inputs = {m: dict(d) for m, d in batch.inputs.items()}
    inputs[modality][key] = value
    with torch.no_grad():
        return model(replace(batch, inputs=inputs)).logits[:, 0]


@pytest.mark.parametrize(("modality", "key"), [("ehr", "values"), ("cxr", "image")])
def test_input_ig_is_complete_and_zero_without_the_modality(setup, modality, key):
    model, batch = setup
    attr = input_integrated_gradients(model, batch, TARGET, modality, n_steps=48)
    x = batch.inputs[modality][key]
    assert attr.shape == x.shape
    absent = ~batch.present_of(modality)
    assert torch.all(attr[absent] == 0)
    gap = _log_odds(model, batch, modality, key, x) - _log_odds(
        model, batch, modality, key, torch.zeros_like(x)
    )
    total = attr.flatten(1).sum(1)
    torch.testing.assert_close(total, gap, atol=2e-3 + 0.05 * gap.abs().max().item(), rtol=0)
    assert total[~absent].abs().min() > 0


def test_tables_of_the_drilldown(setup):
    model, batch = setup
    ehr = input_integrated_gradients(model, batch, TARGET, "ehr", n_steps=8)
    names = [f"v{i}" for i in range(ehr.shape[-1])]
    table = ehr_variables(ehr, names, batch.ids)
    assert len(table) == 3 * len(names)
    np.testing.assert_allclose(
        table.groupby("stay_id", sort=False)["attribution"].sum(),
        ehr.flatten(1).sum(1).numpy(),
        rtol=1e-4,
        atol=1e-6,
    )
    sal = cxr_saliency(input_integrated_gradients(model, batch, TARGET, "cxr", n_steps=8))
    assert sal.shape == (3, *batch.inputs["cxr"]["image"].shape[-2:])


def test_ecg_occlusion_matches_flattening_a_window_by_hand(setup):
    model, batch = setup
    occ = ecg_occlusion(model, batch, TARGET, bins=4)
    assert occ.shape == (3, 12, 4) and np.isnan(occ[2]).all() and np.isfinite(occ[:2]).all()
    x = batch.inputs["ecg"]["signal"]
    S = x.shape[-1]
    for lead, b in ((0, 0), (7, 3)):
        flat = x.clone()
        flat[:, :, lead, b * S // 4 : (b + 1) * S // 4] = 0
        expect = _log_odds(model, batch, "ecg", "signal", x) - _log_odds(
            model, batch, "ecg", "signal", flat
        )
        np.testing.assert_allclose(occ[:2, lead, b], expect[:2].numpy(), atol=1e-5)


def test_notes_are_never_drilled_into(setup):
    model, batch = setup
    with pytest.raises(ValueError, match="free text"):
        input_integrated_gradients(model, batch, TARGET, "notes")
