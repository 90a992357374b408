"""Encoder probes on fake encoders: chance for one that ignores the factor, high for one that copies it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from clinical_moe.attribution.probe import PROBE_COLUMNS, probe_encoders
from clinical_moe.types import ModalityTokens

MODS = ("cxr", "ecg")


class CopyEncoder(nn.Module):
    """Two tokens per stay: the input features, then zeros that the mask hides."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, inputs):
        x = inputs["x"] * self.scale  # (B, F)
        tokens = torch.stack([x, torch.full_like(x, 1e6)], dim=1)  # (B, 2, F): padding is huge
        mask = torch.zeros(x.shape[0], 2, dtype=torch.bool)
        mask[:, 0] = True
        return ModalityTokens(tokens, mask)


class FakeModel(nn.Module):
    """What the probe uses of a MultimodalModel: ``modalities`` and ``encoders``."""

    def __init__(self):
        super().__init__()
        self.modalities = MODS
        self.encoders = nn.ModuleDict({m: CopyEncoder() for m in MODS})


class FakeDataset:
    """Enough of CachedDataset for the probe: modalities, present, store, items."""

    def __init__(self, ids, features: dict[str, np.ndarray], present: np.ndarray):
        self.ids, self.features, self._present = ids, features, present
        self.modalities = MODS
        self.store = SimpleNamespace(summary={}, manifest=None)

    @property
    def present(self):
        return self._present

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        sample = {"id": int(self.ids[i]), "label": np.float32(0), "present": {}}
        for m, name in enumerate(MODS):
            has = bool(self._present[i, m])
            sample["present"][name] = has
            sample[name] = {"x": self.features[name][i]} if has else None
        return sample


def _split(truth: pd.DataFrame, rng, start: int, n: int) -> FakeDataset:
    rows = truth.iloc[start : start + n]
    pulm = rows["pulmonary"].to_numpy(np.float32)
    features = {
        # the CXR encoder's input copies the pulmonary factor (with noise); ECG's ignores cardiac
        "cxr": np.stack([pulm + 0.3 * rng.normal(size=n), rng.normal(size=n)], 1),
        "ecg": rng.normal(size=(n, 2)),
    }
    features = {k: v.astype(np.float32) for k, v in features.items()}
    present = rng.random((n, 2)) < 0.7
    present[:, 1] |= ~present[:, 0]  # every stay has something
    return FakeDataset(rows["stay_id"].to_numpy(), features, present)


def test_probe_is_chance_for_an_unrelated_encoder_and_high_for_a_copying_one():
    rng = np.random.default_rng(0)
    n = 1600
    truth = pd.DataFrame(
        {
            "stay_id": np.arange(n) + 10,
            "severity": rng.normal(size=n),
            "cardiac": rng.integers(0, 2, n),
            "pulmonary": rng.integers(0, 2, n),
            "infection": rng.integers(0, 2, n),
        }
    )
    train, test = _split(truth, rng, 0, 1000), _split(truth, rng, 1000, 600)
    model = FakeModel()
    out = probe_encoders(model, train, test, truth, max_train=500, n_boot=300, seed=0)
    assert list(out.columns) == PROBE_COLUMNS
    rows = out.set_index("modality")
    assert rows.loc["cxr", "factor"] == "pulmonary" and rows.loc["ecg", "factor"] == "cardiac"
    cxr, ecg = rows.loc["cxr"], rows.loc["ecg"]
    assert cxr["auroc"] > 0.95 and cxr["ci_low"] > 0.9  # padding (1e6) is masked out
    assert abs(ecg["auroc"] - 0.5) < 0.08 and ecg["ci_low"] < 0.5 < ecg["ci_high"]
    assert cxr["n_train"] == 500 and cxr["n_test"] == int(test.present[:, 0].sum())
    for r in out.itertuples():
        assert r.ci_low <= r.auroc <= r.ci_high
    again = probe_encoders(model, train, test, truth, max_train=500, n_boot=300, seed=0)
    pd.testing.assert_frame_equal(out, again)  # seeded
    assert probe_encoders(model, train, test, None).empty  # no truth folder: no probe
