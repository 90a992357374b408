"""Contract tests of every registered modality encoder, plus encoder-specific checks.

The contract tests are parametrised over ``ENCODERS.names()`` (so a newly registered encoder is
covered automatically) and over a few non-default variants of the built-in encoders.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import clinical_moe.encoders  # noqa: F401  (registers the built-in encoders)
from clinical_moe.encoders.ehr import forward_fill, grid_bins
from clinical_moe.encoders.mtand import MultiTimeAttention, masked_softmax_weights
from clinical_moe.registry import ENCODERS
from clinical_moe.testing import noise_absent, noise_padding, random_batch
from clinical_moe.types import Batch

B, T, D = 6, 4, 32
VARIANTS = [(name, {}) for name in ENCODERS.names()] + [
    ("ehr", {"mode": "grid"}),
    ("ehr", {"mode": "grid", "forward_fill": False, "num_static": 0}),
    ("cxr", {"token_mode": "event", "num_heads": 2}),
    ("cxr", {"backbone": "precomputed"}),
    ("cxr", {"backbone": "precomputed", "token_mode": "event"}),
    ("cxr", {"num_tokens": 6}),
    ("ecg", {"token_mode": "event"}),
    ("notes", {"token_mode": "event"}),
    ("notes", {"max_len": 5}),  # notes longer than one chunk
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a busy shared machine (3x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, kw: dict, seed: int = 0):
    torch.manual_seed(seed)
    kw = {"d_model": D, "num_tokens": T, **kw}
    return ENCODERS.create(name, **kw)


def inputs_of(enc, seed: int = 0, batch_size: int = B) -> dict[str, torch.Tensor]:
    return enc.random_inputs(batch_size, torch.Generator().manual_seed(seed))


def run(enc, inputs) -> torch.Tensor:
    with torch.no_grad():
        return enc(inputs).tokens


@pytest.fixture(params=VARIANTS, ids=IDS)
def spec(request):
    return request.param


def test_shape_mask_finite(spec):
    name, kw = spec
    enc = make(name, kw).eval()
    out = enc(inputs_of(enc))
    t = kw.get("num_tokens", T)
    assert out.tokens.shape == (B, t, D)
    assert out.mask.shape == (B, t) and out.mask.dtype == torch.bool and bool(out.mask.all())
    assert torch.isfinite(out.tokens).all()
    assert out.times is None or out.times.shape == (B, t)


def test_eval_deterministic_and_input_dependent(spec):
    enc = make(*spec).eval()
    x = inputs_of(enc)
    first = run(enc, x)
    assert torch.equal(first, run(enc, x))
    other = run(enc, inputs_of(enc, seed=1))
    assert not torch.allclose(first, other, atol=1e-4), "output ignores its inputs"


def test_per_sample_independent(spec):
    enc = make(*spec).eval()
    a, b = inputs_of(enc, seed=0), inputs_of(enc, seed=1)
    keep = torch.tensor([4, 0, 2])
    mixed = {k: torch.cat([b[k][:3], a[k][keep]]) for k in a}  # other rows changed and reordered
    torch.testing.assert_close(run(enc, mixed)[3:], run(enc, a)[keep], rtol=1e-5, atol=1e-5)


def test_padding_invisible(spec):
    name, kw = spec
    enc = make(name, kw).eval()
    x = inputs_of(enc)
    batch = Batch({name: x}, torch.ones(B, 1, dtype=torch.bool), modalities=(name,))
    noisy = noise_padding(batch, SimpleNamespace(encoders={name: enc})).inputs[name]
    assert any(not torch.equal(noisy[k], x[k]) for k in x), "random_inputs has no padding"
    ref = run(enc, x)
    torch.testing.assert_close(run(enc, noisy), ref, rtol=1e-5, atol=1e-5)
    nan = {k: torch.where(v.isnan(), float("nan"), v) for k, v in noisy.items()}
    for key, mask_key in enc.padding.items():  # padding holding NaN / inf is invisible too
        if key in x and x[key].is_floating_point():
            m = x[mask_key].bool()
            m = m.view(*m.shape, *([1] * (x[key].dim() - m.dim()))).expand_as(x[key])
            nan[key] = torch.where(m, x[key], float("nan"))
    torch.testing.assert_close(run(enc, nan), ref, rtol=1e-5, atol=1e-5)


EHR_KEYS = ("values", "obs_mask", "times", "time_mask")
NOTE_KEYS = ("input_ids", "attention_mask", "times", "event_mask")
CXR_KEYS = ("image", "times", "event_mask")
TRUNCATE = [  # (encoder, options, padding mask of the slot cut, keys cut, dim of the slot)
    ("ehr", {}, "time_mask", EHR_KEYS, 1),
    ("ehr", {"mode": "grid"}, "time_mask", EHR_KEYS, 1),
    ("cxr", {}, "event_mask", CXR_KEYS, 1),
    ("cxr", {"token_mode": "event"}, "event_mask", CXR_KEYS, 1),
    ("ecg", {}, "event_mask", ("signal", "times", "event_mask"), 1),
    ("notes", {}, "event_mask", NOTE_KEYS, 1),
    ("notes", {"token_mode": "event"}, "event_mask", NOTE_KEYS, 1),
    ("notes", {}, "attention_mask", NOTE_KEYS[:2], 2),  # the last token of every note
    ("notes", {"token_mode": "event"}, "attention_mask", NOTE_KEYS[:2], 2),
]


@pytest.mark.parametrize("name, kw, mask_key, keys, dim", TRUNCATE)
def test_number_of_padding_slots_does_not_matter(name, kw, mask_key, keys, dim):
    enc = make(name, kw).eval()
    x = inputs_of(enc, batch_size=16)
    last = x[mask_key].select(dim, -1)  # (B,) or (B, N): the slot to cut
    rows = (~last.reshape(16, -1).any(1)).nonzero().flatten()  # rows where it is padding
    assert rows.numel() > 0
    cut = {k: v.narrow(dim, 0, v.shape[dim] - 1) if k in keys else v for k, v in x.items()}
    torch.testing.assert_close(run(enc, cut)[rows], run(enc, x)[rows], rtol=1e-5, atol=1e-5)


def test_every_parameter_gets_a_gradient(spec):
    enc = make(*spec).train()
    out = enc(inputs_of(enc)).tokens
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weight).sum().backward()  # not tokens.sum(): a final LayerNorm would zero that gradient
    for pname, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def test_freeze(spec):
    enc = make(*spec).freeze()
    enc.train()
    assert not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    x = inputs_of(enc)
    out = enc(x).tokens
    assert not out.requires_grad
    assert torch.equal(out, enc(x).tokens)  # no dropout although the model trains


def test_load_pretrained_roundtrip(spec, tmp_path):
    src, dst = make(*spec, seed=0).eval(), make(*spec, seed=1).eval()
    x = inputs_of(src)
    assert not torch.allclose(run(src, x), run(dst, x))
    path = tmp_path / "enc.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst.load_pretrained(path, strict=True)
    assert torch.equal(run(dst, x), run(src, x))
    with pytest.raises(FileNotFoundError, match="not found"):
        dst.load_pretrained(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------- mTAND / EHR


def test_mtand_single_observation_is_copied_and_unobserved_gives_zero():
    mtan = MultiTimeAttention(time_embed_dim=8, num_heads=2, time_scale=48.0)
    times = torch.tensor([[3.0, 10.0, 40.0]])  # (1, L=3)
    values = torch.tensor([[[1.0, 5.0, 7.0], [2.0, 6.0, 8.0], [3.0, -9.0, 9.0]]])  # (1, 3, V=3)
    mask = torch.tensor([[[True, False, False], [True, True, False], [True, False, False]]])
    values.requires_grad_(True)
    out = mtan(torch.tensor([0.0, 24.0, 48.0]), times, values, mask)  # (1, R=3, H * V)
    out = out.view(1, 3, 2, 3)  # (1, R, H, V)
    torch.testing.assert_close(out[..., 1], torch.full((1, 3, 2), 6.0))  # one observation: copied
    assert torch.equal(out[..., 2], torch.zeros(1, 3, 2))  # never observed: zero, no NaN
    assert bool(((out[..., 0] > 1.0) & (out[..., 0] < 3.0)).all())  # a convex combination
    out.sum().backward()
    assert torch.isfinite(values.grad).all() and bool((values.grad[~mask] == 0).all())


def test_masked_softmax_has_no_underflow():
    scores = torch.tensor([[1000.0, -1000.0, 0.0]])
    w = masked_softmax_weights(scores, torch.tensor([[False, True, False]]), dim=-1)
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0]]))
    none = masked_softmax_weights(scores, torch.zeros(1, 3, dtype=torch.bool), dim=-1)
    assert torch.equal(none, torch.zeros(1, 3))


@pytest.mark.parametrize("mode", ["mtand", "grid"])
def test_ehr_unobserved_values_are_invisible_observed_are_not(mode):
    enc = make("ehr", {"mode": mode}).eval()
    x = inputs_of(enc)
    base = run(enc, x)
    hidden = x["time_mask"][..., None] & ~x["obs_mask"]  # real time point, value not observed
    changed = dict(x, values=torch.where(hidden, torch.full_like(x["values"], 1e4), x["values"]))
    assert torch.equal(run(enc, changed), base)
    b, t, v = x["obs_mask"].nonzero()[0].tolist()
    bumped = x["values"].clone()
    bumped[b, t, v] += 2.0
    out = run(enc, dict(x, values=bumped))
    assert not torch.allclose(out[b], base[b])
    others = [i for i in range(B) if i != b]
    torch.testing.assert_close(out[others], base[others], rtol=0, atol=1e-6)


def test_mtand_interpolates_each_variable_from_its_own_observations():
    # Per-variable softmax: a variable whose observations all hold one value interpolates to that
    # value at every reference time, whatever the observation times. A softmax shared across
    # variables would mix in the (zeroed) unobserved entries and depend on the times.
    enc = make("ehr", {}).eval()
    x = inputs_of(enc)
    const = torch.randn(x["values"].shape[-1], generator=torch.Generator().manual_seed(5))
    x["values"] = const * x["obs_mask"]
    moved = torch.rand(x["times"].shape, generator=torch.Generator().manual_seed(6)) * 48.0
    shifted = dict(x, times=torch.where(x["time_mask"], moved, x["times"]))
    torch.testing.assert_close(run(enc, shifted), run(enc, x), rtol=1e-5, atol=1e-5)


def test_grid_bins_and_forward_fill():
    values = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [5.0, 0.0], [7.0, 9.0]]])  # (1, L=4, V=2)
    obs = torch.tensor([[[True, False], [True, True], [False, False], [True, False]]])
    times = torch.tensor([[1.0, 2.0, 20.0, 30.0]])
    mean, seen = grid_bins(values, obs, times, num_bins=4, window=48.0)  # bins of 12 h
    assert torch.equal(mean[0, :, 0], torch.tensor([2.0, 0.0, 7.0, 0.0]))
    assert torch.equal(seen[0, :, 1], torch.tensor([True, False, False, False]))
    filled, ever = forward_fill(mean, seen)
    assert torch.equal(filled[0, :, 0], torch.tensor([2.0, 2.0, 7.0, 7.0]))
    assert torch.equal(filled[0, :, 1], torch.tensor([4.0, 4.0, 4.0, 4.0]))
    assert bool(ever.all())


def test_ehr_rejects_wrong_variable_count_and_mode():
    enc = make("ehr", {"num_variables": 5})
    x = inputs_of(make("ehr", {}))
    with pytest.raises(ValueError, match="num_variables=5"):
        enc(x)
    with pytest.raises(ValueError, match="unknown ehr mode"):
        make("ehr", {"mode": "hourly"})


# ------------------------------------------------------------------------------------ CXR / ECG


def test_cxr_precomputed_embeddings():
    enc = make("cxr", {"backbone": "precomputed", "embedding_dim": 12}).eval()
    x = inputs_of(enc)
    assert x["embedding"].shape == (B, 2, 12) and "image" not in x
    assert run(enc, x).shape == (B, T, D)
    with pytest.raises(ValueError, match="embedding_dim=12"):
        enc(dict(x, embedding=torch.zeros(B, 2, 7)))
    image_enc = make("cxr", {})
    with pytest.raises(KeyError, match="precomputed"):
        image_enc(x)


@pytest.mark.parametrize("token_mode", ["spatial", "event"])
def test_cxr_densenet121_runs_on_a_tiny_image(token_mode):
    enc = make("cxr", {"backbone": "densenet121", "token_mode": token_mode, "num_events": 1}).eval()
    x = inputs_of(enc, batch_size=2)
    assert x["image"].shape == (2, 1, 1, 32, 32)
    out = run(enc, x)
    assert out.shape == (2, T, D) and torch.isfinite(out).all()


def test_cxr_event_times_matter():
    enc = make("cxr", {}).eval()
    x = inputs_of(enc)
    shifted = dict(x, times=torch.where(x["event_mask"], x["times"] + 12.0, x["times"]))
    assert not torch.allclose(run(enc, shifted), run(enc, x))


@pytest.mark.parametrize("token_mode", ["time", "event"])
def test_ecg_any_signal_length(token_mode):
    enc = make("ecg", {"token_mode": token_mode}).eval()
    for length in (250, 500, 1000, 5000):
        x = make("ecg", {"signal_length": length}).random_inputs(
            2, torch.Generator().manual_seed(0)
        )
        out = run(enc, x)
        assert out.shape == (2, T, D) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="12"):
        enc(dict(x, signal=x["signal"][:, :, :6]))


# ---------------------------------------------------------------------------------------- notes


def test_notes_hf_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        make("notes", {"backbone": "hf", "hf_path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="hf_path"):
        make("notes", {"backbone": "hf"})
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"clinical-moe\[hf\]"):
            make("notes", {"backbone": "hf", "hf_path": str(tmp_path)})


def test_notes_chunking_matches_single_chunk_for_short_notes():
    short, long = make("notes", {"max_len": 16}).eval(), make("notes", {"max_len": 32}).eval()
    long.load_state_dict({**short.state_dict(), "pos": torch.cat([short.pos, long.pos[16:]])})
    x = inputs_of(short)  # notes of 16 tokens fit one chunk of either size
    torch.testing.assert_close(run(long, x), run(short, x), rtol=1e-5, atol=1e-5)


def test_notes_rejects_out_of_vocabulary_ids():
    enc = make("notes", {"vocab_size": 50})
    x = inputs_of(enc)
    with pytest.raises(ValueError, match="vocab_size=50"):
        enc(dict(x, input_ids=x["input_ids"] + 100))
    with pytest.raises(ValueError, match="must divide d_model=30"):
        make("notes", {"d_model": 30})


# ---------------------------------------------------------------------------- through the model


def test_default_encoders_inside_a_model():
    from clinical_moe import create_model

    torch.manual_seed(0)
    model = create_model("concat")  # ehr, cxr, ecg, notes with their default encoders
    batch = random_batch(model, batch_size=5, seed=0)
    model.train()
    model(batch).logits.sum().backward()
    model.eval()
    with torch.no_grad():
        ref = model(batch).logits
        torch.testing.assert_close(model(noise_absent(batch)).logits, ref, rtol=1e-5, atol=1e-5)
        noisy = noise_padding(batch, model)
        torch.testing.assert_close(model(noisy).logits, ref, rtol=1e-5, atol=1e-5)
