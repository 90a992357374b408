"""The encoders' auxiliary loss on per-event targets: masking, gradients, and that it teaches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clinical_moe import create_model
from clinical_moe.encoders.events import pooled_feature
from clinical_moe.testing import random_batch
from clinical_moe.training.losses import encoder_target_losses, event_target_loss, task_loss
from clinical_moe.types import Batch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(head: str = "late", K: int = 2):
    torch.manual_seed(0)
    enc = {"cxr": {"num_targets": K, "num_events": 3}, "ecg": {"num_targets": K}}
    return create_model(
        head, modalities=("ehr", "cxr", "ecg"), d_model=16, num_tokens=4, encoders=enc
    )


def _with_targets(batch: Batch, K: int = 2, seed: int = 0) -> Batch:
    """Random 0/1 targets on real events with ~30% unknown (NaN); NaN on padded slots."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {k: dict(v) for k, v in batch.inputs.items()}
    for name in ("cxr", "ecg"):
        mask = inputs[name]["event_mask"]  # (B, N)
        t = (torch.rand(*mask.shape, K, generator=gen) < 0.5).float()
        t[torch.rand(*mask.shape, K, generator=gen) < 0.3] = float("nan")
        t[~mask] = float("nan")
        inputs[name]["targets"] = t
    return replace(batch, inputs=inputs)


def test_event_target_loss_ignores_unknown_and_invalid():
    logits = torch.tensor([[[2.0, -1.0], [5.0, 5.0]]], requires_grad=True)  # (1, 2, 2)
    targets = torch.tensor([[[1.0, float("nan")], [0.0, 1.0]]])
    valid = torch.tensor([[True, False]])  # the second event is padding
    loss, count = event_target_loss(logits, targets, valid)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(2.0), torch.tensor(1.0)
    )
    assert count == 1
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 0, 1] == 0) and (logits.grad[0, 1] == 0).all()
    # nothing known: zero loss that still backpropagates (zero) gradients
    empty, n = event_target_loss(logits, torch.full_like(targets, float("nan")), valid)
    assert n == 0 and float(empty.detach()) == 0.0 and empty.requires_grad


def test_continuous_targets_take_huber():
    logits = torch.tensor([[[0.0, 0.5]]])
    targets = torch.tensor([[[1.0, 2.5]]])
    loss, _ = event_target_loss(
        logits, targets, torch.ones(1, 1, dtype=torch.bool), torch.tensor([False, True])
    )
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(0.0), torch.tensor(1.0))
    torch.testing.assert_close(loss, (bce + 1.5) / 2)  # smooth L1 of an error of 2 is 1.5


def test_unknown_target_event_content_changes_nothing():
    """Changing the image of an event whose targets are all NaN (or that is padding) leaves the
    target loss unchanged; changing a labelled event's image changes it."""
    model = _model().eval()
    batch = _with_targets(
        random_batch(model, 6, present=torch.ones(6, 3, dtype=torch.bool), seed=1)
    )
    tg, mask = batch.inputs["cxr"]["targets"], batch.inputs["cxr"]["event_mask"]
    mask[:, :2] = True
    mask[:, 2] = False
    tg[0, 1] = float("nan")  # event (0, 1): real, every target unknown
    tg[0, 0] = 1.0

    def loss_of(b):
        with torch.no_grad():
            _, tokens = model(b, return_tokens=True)
        return encoder_target_losses(tokens, b, {"cxr": 1.0})[1]["cxr_target_loss"]

    ref = loss_of(batch)
    for slot in ((0, 1), (3, 2)):  # unknown targets; padded event
        img = batch.inputs["cxr"]["image"].clone()
        img[slot] = torch.rand_like(img[slot])
        noisy = replace(
            batch, inputs={**batch.inputs, "cxr": {**batch.inputs["cxr"], "image": img}}
        )
        torch.testing.assert_close(loss_of(noisy), ref, atol=1e-6, rtol=0)
    img = batch.inputs["cxr"]["image"].clone()
    img[0, 0] = torch.rand_like(img[0, 0])
    labelled = replace(batch, inputs={**batch.inputs, "cxr": {**batch.inputs["cxr"], "image": img}})
    assert abs(float(loss_of(labelled)) - float(ref)) > 1e-6


def test_dropped_or_absent_rows_are_not_scored():
    model = _model().eval()
    batch = _with_targets(
        random_batch(model, 6, present=torch.ones(6, 3, dtype=torch.bool), seed=2)
    )
    present = batch.present.clone()
    present[:3, 1] = False  # cxr dropped for the first three rows
    dropped = batch.with_present(present)
    with torch.no_grad():
        _, tokens = model(dropped, return_tokens=True)
        _, sub_tokens = model(dropped.select(torch.arange(3, 6)), return_tokens=True)
    full = encoder_target_losses(tokens, dropped, {"cxr": 1.0})[1]["cxr_target_loss"]
    rest = encoder_target_losses(sub_tokens, dropped.select(torch.arange(3, 6)), {"cxr": 1.0})
    torch.testing.assert_close(full, rest[1]["cxr_target_loss"])


@pytest.mark.parametrize("head", ["late", "fusemoe", "conf_smoe", "i2moe"])
def test_every_parameter_learns_with_target_loss(head):
    model = _model(head)
    batch = _with_targets(
        random_batch(model, 8, present=torch.ones(8, 3, dtype=torch.bool), seed=5)
    )
    model.train()
    out, tokens = model(batch, return_tokens=True)
    aux, parts = encoder_target_losses(tokens, batch, {"cxr": 1.0, "ecg": 0.5})
    assert set(parts) == {"cxr_target_loss", "ecg_target_loss"}
    (task_loss(out.logits, batch.labels, "binary") + out.aux_loss + aux).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"parameters without gradient: {dead[:8]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    head_grad = model.encoders["cxr"].target_head.linear.weight.grad
    assert head_grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# The point of it: a weak task label does not teach the encoder a per-image finding; its target does


def _blob_batch(n: int, gen: torch.Generator, size: int = 16, amp: float = 0.25):
    """Noise images with a small bright blob (a "finding") in half of them, same mean brightness.

    The task label depends only weakly on the finding (P(y=1) = 0.6 with it, 0.4 without).
    """
    blob = (torch.rand(n, generator=gen) < 0.5).float()
    img = 0.5 + 0.15 * torch.randn(n, 1, 1, size, size, generator=gen)  # (n, N=1, 1, H, W)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.randint(3, size - 3, (n,), generator=gen) for _ in range(2))
    bump = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 4.5)
    bump = bump - bump.mean((1, 2), keepdim=True)  # (n, H, W); no mean-brightness shortcut
    img[:, 0, 0] += amp * blob[:, None, None] * bump
    y = (torch.rand(n, generator=gen) < 0.4 + 0.2 * blob).float()
    inputs = {
        "cxr": {
            "image": img,
            "times": torch.zeros(n, 1),
            "event_mask": torch.ones(n, 1, dtype=torch.bool),
            "targets": blob[:, None, None],  # (n, 1, K=1)
        }
    }
    return Batch(inputs, torch.ones(n, 1, dtype=torch.bool), y, modalities=("cxr",)), blob


def _train_blob(aux_weight: float, steps: int = 300):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    encoders = {"cxr": {"num_targets": 1, "channels": (8, 16), "num_events": 1}}
    model = create_model("late", modalities=("cxr",), d_model=16, num_tokens=4, encoders=encoders)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch, _ = _blob_batch(32, gen)
        out, tokens = model(batch, return_tokens=True)
        aux, _ = encoder_target_losses(tokens, batch, {"cxr": aux_weight})
        loss = task_loss(out.logits, batch.labels, "binary") + out.aux_loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _probe_auroc(model) -> float:
    """Logistic probe of the finding on the encoder's pooled feature (fit 512, test 512 images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    enc = model.encoders["cxr"]

    def feats(batch):
        with torch.no_grad():
            return pooled_feature(enc.features(batch.inputs["cxr"]["image"][:, 0])).numpy()

    (fit, y_fit), (test, y_test) = (
        _blob_batch(512, torch.Generator().manual_seed(s)) for s in (7, 8)
    )
    probe = LogisticRegression(max_iter=2000).fit(feats(fit), y_fit.numpy())
    return float(roc_auc_score(y_test.numpy(), probe.predict_proba(feats(test))[:, 1]))


@pytest.mark.slow
def test_target_loss_teaches_the_encoder_its_modality():
    """Measured (seeded, 300 steps of 32): aux head 0.98 AUROC, probe 0.98; task-only probe 0.62."""
    from sklearn.metrics import roc_auc_score

    with_aux, task_only = _train_blob(1.0), _train_blob(0.0)
    test, blob = _blob_batch(512, torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, tokens = with_aux(test, return_tokens=True)
    head_auroc = roc_auc_score(blob.numpy(), tokens["cxr"].event_logits[:, 0, 0].numpy())
    aux_probe, task_probe = _probe_auroc(with_aux), _probe_auroc(task_only)
    assert head_auroc > 0.9, head_auroc
    assert aux_probe > 0.9, aux_probe
    assert aux_probe - task_probe > 0.2, (aux_probe, task_probe)
    assert np.isfinite([head_auroc, aux_probe, task_probe]).all()


# ------------------------------------------------------------------------------------------------
# Config and wiring


def test_encoder_aux_config_is_checked():
    from clinical_moe.config import ConfigError, load_config

    assert load_config().train.encoder_aux == {"cxr": 1.0, "ecg": 1.0}
    with pytest.raises(ConfigError, match=r"encoder_aux.*'cxrr'.*cxr"):
        load_config(None, ["train.encoder_aux={cxrr: 1.0}"])
    with pytest.raises(ConfigError, match="encoder_aux.ecg"):
        load_config(None, ["train.encoder_aux={ecg: -1}"])


def test_target_heads_only_where_targets_weight_and_a_trainable_backbone():
    from types import SimpleNamespace

    from clinical_moe.config import load_config
    from clinical_moe.training.engine import cache_targets, encoder_options

    summary = {
        "targets": {"cxr": ["a", "b"], "ecg": ["x", "hr"], "notes": []},
        "target_kinds": {"cxr": {"a": "binary"}, "ecg": {"x": "binary", "hr": "continuous"}},
    }
    targets, continuous = cache_targets(SimpleNamespace(summary=summary))
    assert targets == {"cxr": ["a", "b"], "ecg": ["x", "hr"]}
    assert continuous["ecg"].tolist() == [False, True] and continuous["cxr"].tolist() == [False] * 2
    cfg = load_config(None, ["model.encoders={ecg: {freeze: backbone}}"])
    opts = encoder_options(cfg, {}, targets)
    assert opts["cxr"]["num_targets"] == 2
    assert "num_targets" not in opts["ecg"]  # a frozen backbone cannot learn from the loss
    off = load_config(None, ["train.encoder_aux={cxr: 0.0}"])
    assert "num_targets" not in encoder_options(off, {}, targets).get("cxr", {})
    assert encoder_options(cfg, {}, {}) == {"ecg": {"freeze": "backbone"}}  # old caches: no heads
