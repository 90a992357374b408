"""Per-event target heads of the event encoders: shapes, masking, scatter through the model."""

from __future__ import annotations

import pytest
import torch

import clinical_moe.encoders  # noqa: F401  (registers the built-in encoders)
from clinical_moe import create_model
from clinical_moe.registry import ENCODERS
from clinical_moe.testing import noise_absent, noise_padding, random_batch

K = 3
VARIANTS = [
    ("cxr", {}),
    ("cxr", {"token_mode": "event"}),
    ("cxr", {"backbone": "precomputed"}),
    ("ecg", {}),
    ("ecg", {"token_mode": "event"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encoder(name: str, kw: dict, num_targets: int = K, seed: int = 0):
    torch.manual_seed(seed)
    return ENCODERS.create(
        name, d_model=16, num_tokens=4, num_events=3, num_targets=num_targets, **kw
    )


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_event_logits_shape_and_padding(name, kw):
    enc = _encoder(name, kw).eval()
    inputs = enc.random_inputs(5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = enc(inputs)
    mask = inputs["event_mask"]
    assert out.event_logits.shape == (5, 3, K)
    assert torch.isfinite(out.event_logits).all()
    assert (out.event_logits[~mask] == 0).all(), "padded event slots must carry zero logits"
    assert (out.event_logits[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name,kw", VARIANTS[:1] + VARIANTS[3:4], ids=["cxr", "ecg"])
def test_no_target_head_by_default(name, kw):
    enc = ENCODERS.create(name, d_model=16, num_tokens=4)
    assert enc.num_targets == 0 and enc.target_head is None
    with torch.no_grad():
        assert enc(enc.random_inputs(2, torch.Generator().manual_seed(0))).event_logits is None


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_event_logits_depend_on_their_own_event_only(name, kw):
    """Changing one event's content changes its own logits, and no other event's or row's."""
    enc = _encoder(name, kw).eval()
    inputs = enc.random_inputs(4, torch.Generator().manual_seed(1))
    inputs["event_mask"][:, :2] = True
    key = enc.input_key
    changed = dict(inputs)
    changed[key] = inputs[key].clone()
    changed[key][1, 0] = torch.randn_like(changed[key][1, 0]) * 2
    with torch.no_grad():
        a, b = enc(inputs).event_logits, enc(changed).event_logits
    assert not torch.allclose(a[1, 0], b[1, 0])
    keep = torch.ones(4, 3, dtype=torch.bool)
    keep[1, 0] = False
    torch.testing.assert_close(a[keep], b[keep], atol=1e-6, rtol=0)


def test_padding_noise_leaves_event_logits_unchanged():
    enc = _encoder("cxr", {}).eval()
    model = create_model("late", modalities=("cxr",), d_model=16, num_tokens=4)
    model.encoders["cxr"] = enc
    batch = random_batch(model, 6, present=torch.ones(6, 1, dtype=torch.bool), seed=3)
    with torch.no_grad():
        _, ref = model(batch, return_tokens=True)
        _, noisy = model(noise_padding(batch, model), return_tokens=True)
    torch.testing.assert_close(noisy["cxr"].event_logits, ref["cxr"].event_logits)


@pytest.mark.parametrize("head", ["late", "fusemoe", "flex_moe"])
def test_model_scatters_event_logits_to_batch_rows(head):
    """``encode`` puts each present row's logits back at its row; absent rows are zero."""
    torch.manual_seed(0)
    encoders = {"cxr": {"num_targets": K, "num_events": 2}, "ecg": {"num_targets": 2}}
    model = create_model(
        head, modalities=("ehr", "cxr", "ecg"), d_model=16, num_tokens=4, encoders=encoders
    ).eval()
    present = torch.tensor(
        [[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool
    )
    batch = random_batch(model, 5, present=present, seed=4)
    with torch.no_grad():
        out, tokens = model(batch, return_tokens=True)
        plain = model(batch)
    torch.testing.assert_close(out.logits, plain.logits)  # heads ignore the new field
    for m, name, k in ((1, "cxr", K), (2, "ecg", 2)):
        ev = tokens[name].event_logits
        assert ev.shape[0] == 5 and ev.shape[-1] == k
        rows = present[:, m].nonzero().flatten()
        with torch.no_grad():
            alone = model.encoders[name]({k_: v[rows] for k_, v in batch.inputs[name].items()})
        torch.testing.assert_close(ev[rows], alone.event_logits)
        assert (ev[~present[:, m]] == 0).all()
    assert tokens["ehr"].event_logits is None
    # absent rows' inputs are invisible to the logits of every row
    with torch.no_grad():
        _, noisy = model(noise_absent(batch), return_tokens=True)
    torch.testing.assert_close(noisy["cxr"].event_logits, tokens["cxr"].event_logits)


def test_modality_tokens_rejects_bad_event_logits():
    from clinical_moe.types import ModalityTokens

    with pytest.raises(ValueError, match="event_logits"):
        ModalityTokens(torch.zeros(2, 3, 4), torch.ones(2, 3), event_logits=torch.zeros(3, 1, 2))


def test_avgmax_pooling_keeps_a_local_finding_that_averaging_dilutes():
    """``pool="avgmax"``: the global max of each channel beside its mean, 2C features."""
    import torch

    from clinical_moe.encoders.cxr import CXREncoder
    from clinical_moe.encoders.events import pooled_feature

    fmap = torch.zeros(2, 3, 8, 8)
    fmap[1, 0, 4, 4] = 6.4  # one bright cell of 64 (a thin line after the backbone)
    avg, both = pooled_feature(fmap), pooled_feature(fmap, "avgmax")
    assert avg.shape == (2, 3) and both.shape == (2, 6)
    assert torch.equal(both[:, :3], avg)
    assert float(avg[1, 0] - avg[0, 0]) == pytest.approx(0.1)  # diluted 64x by the mean
    assert float(both[1, 3] - both[0, 3]) == pytest.approx(6.4)  # kept whole by the max
    gen = torch.Generator().manual_seed(0)
    for mode in ("spatial", "event"):
        enc = CXREncoder(d_model=8, num_tokens=4, pool="avgmax", token_mode=mode, num_targets=2)
        x = enc.random_inputs(3, gen)
        out = enc(x)
        assert out.tokens.shape == (3, 4, 8) and out.event_logits.shape == (3, 2, 2)
        assert enc.target_head.linear.in_features == 2 * 32  # (8, 16, 32): C = 32, doubled
    with pytest.raises(ValueError, match="unknown pool"):
        CXREncoder(pool="median")
    # weights written with average pooling (before avgmax existed) load into a default encoder,
    # which then computes exactly what the average-pooling encoder computes
    for mode in ("spatial", "event"):
        old = CXREncoder(d_model=8, num_tokens=4, pool="avg", token_mode=mode, num_targets=2)
        new = CXREncoder(d_model=8, num_tokens=4, token_mode=mode, num_targets=2)
        assert new.pool_mode == "avgmax"
        new.load_state_dict(old.state_dict())
        assert new.pool_mode == "avg"
        x = old.random_inputs(3, gen)
        a, b = old.eval()(x), new.eval()(x)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.event_logits, b.event_logits)
