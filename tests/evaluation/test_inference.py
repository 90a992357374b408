"""Encoders once + masked tokens == the model on the masked batch, for every registered head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clinical_moe
from clinical_moe.config import load_config
from clinical_moe.data.dataset import Collator
from clinical_moe.evaluation.inference import predict_under_masks
from clinical_moe.metrics import probabilities
from clinical_moe.missingness import mcar, pattern_mask
from clinical_moe.training.engine import build_data, build_model

from .conftest import CONFIGS


@pytest.mark.parametrize("head", clinical_moe.list_models())
def test_fast_path_equals_model_call(head, eval_cache):
    cfg = load_config(CONFIGS / "tiny" / f"{head}.yaml", [f"data.cache_dir={eval_cache}"])
    torch.manual_seed(0)
    data = build_data(cfg, eval_cache)
    model = build_model(cfg, data).eval()
    test = data.test
    ids = test.rows["stay_id"].to_numpy()
    masks = np.stack(
        [
            test.present,
            mcar(test.present, 0.7, seed=1, ids=ids),
            pattern_mask(test.present, "ecg+notes", test.modalities),
        ]
    )
    fast = predict_under_masks(model, test, masks, data.task, batch_size=8)
    batch = Collator(test)([test[i] for i in range(len(test))])
    with torch.no_grad():
        for k in (0, 1):
            slow = model(batch.with_present(torch.from_numpy(masks[k]))).logits
            assert np.allclose(fast[k], probabilities(slow, data.task), atol=1e-5), k
        rows = masks[2].any(1)
        assert np.isnan(fast[2][~rows]).all() and (~rows).any()
        slow = model(
            batch.select(torch.from_numpy(rows)).with_present(torch.from_numpy(masks[2][rows]))
        ).logits
        assert np.allclose(fast[2][rows], probabilities(slow, data.task), atol=1e-5)
