"""Test helpers in the spirit of ``torch.testing``: valid random batches for any model.

Users and outside contract suites rely on :func:`random_batch`; the noise helpers are what the
registry-wide invariant tests use to check that absent modalities and padding are invisible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from clinical_moe.model import MultimodalModel, build_encoders
from clinical_moe.types import Batch, ModalityTokens


def _encoders_of(model_or_modalities):
    if isinstance(model_or_modalities, MultimodalModel):
        return dict(model_or_modalities.encoders.items()), model_or_modalities.head.num_classes
    if isinstance(model_or_modalities, str):
        model_or_modalities = (model_or_modalities,)
    mods = tuple(model_or_modalities)
    return build_encoders(mods, d_model=32, num_tokens=4), 1


def draw_present(batch_size: int, num_modalities: int, generator: torch.Generator, p: float = 0.7):
    """A random ``BoolTensor[B, M]`` with at least one True per row."""
    present = torch.rand(batch_size, num_modalities, generator=generator) < p
    empty = ~present.any(1)
    pick = torch.randint(0, num_modalities, (batch_size,), generator=generator)
    present[empty, pick[empty]] = True
    return present


def random_batch(
    model_or_modalities: MultimodalModel | Sequence[str] | str,
    batch_size: int = 4,
    present: torch.Tensor | None = None,
    seed: int = 0,
    task: str | None = None,
) -> Batch:
    """A valid random :class:`Batch` for a model's modalities.

    Args:
        model_or_modalities: A model from :func:`clinical_moe.create_model` (its encoders say what
            raw inputs look like), or modality names (default encoders are assumed).
        batch_size: Rows B.
        present: ``BoolTensor[B, M]``; drawn at random (>= 1 modality per row) when None.
        seed: Seed of a private generator; the global RNG is untouched.
        task: "binary", "multiclass" or "multilabel"; inferred from the model's classes when None.

    Returns:
        A batch whose absent rows are zero-filled, like the collate function produces.
    """
    gen = torch.Generator().manual_seed(seed)
    encoders, num_classes = _encoders_of(model_or_modalities)
    mods = tuple(encoders)
    if present is None:
        present = draw_present(batch_size, len(mods), gen)
    present = torch.as_tensor(present, dtype=torch.bool)
    if present.shape != (batch_size, len(mods)):
        raise ValueError(f"present must be ({batch_size}, {len(mods)}), got {tuple(present.shape)}")
    inputs = {}
    for m, name in enumerate(mods):
        raw = encoders[name].random_inputs(batch_size, gen)
        keep = present[:, m]
        inputs[name] = {
            k: v * keep.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in raw.items()
        }
    task = task or ("binary" if num_classes == 1 else "multiclass")
    if task == "binary":
        labels = torch.randint(0, 2, (batch_size,), generator=gen).float()
    elif task == "multiclass":
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    elif task == "multilabel":
        labels = torch.randint(0, 2, (batch_size, num_classes), generator=gen).float()
    else:
        raise ValueError(f"unknown task {task!r}; use binary, multiclass or multilabel")
    return Batch(inputs, present, labels, ids=list(range(1000, 1000 + batch_size)), modalities=mods)


def _noise_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.rand(t.shape, generator=gen) < 0.5
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * 3.0
    hi = int(t.max().item()) + 1 if t.numel() else 2
    return torch.randint(0, max(hi, 2), t.shape, generator=gen, dtype=t.dtype)


def noise_absent(batch: Batch, seed: int = 1) -> Batch:
    """Fill the inputs of every absent (row, modality) with noise; masks are left as they are."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for m, name in enumerate(batch.modalities):
        absent = ~batch.present[:, m]
        new = {}
        for k, v in batch.inputs[name].items():
            sel = absent.view(-1, *([1] * (v.dim() - 1))).expand_as(v)
            new[k] = torch.where(sel, _noise_like(v, gen), v)
        inputs[name] = new
    return replace(batch, inputs=inputs)


def noise_padding(batch: Batch, model: MultimodalModel, seed: int = 2) -> Batch:
    """Fill every padded position (per each encoder's ``padding`` spec) with noise."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for name in batch.modalities:
        spec = model.encoders[name].padding
        new = dict(batch.inputs[name])
        for key, mask_key in spec.items():
            if key not in new or mask_key not in batch.inputs[name]:
                continue
            v, mask = new[key], batch.inputs[name][mask_key].bool()
            mask = mask.view(*mask.shape, *([1] * (v.dim() - mask.dim()))).expand_as(v)
            new[key] = torch.where(mask, v, _noise_like(v, gen))
        inputs[name] = new
    return replace(batch, inputs=inputs)


def noise_padded_tokens(
    tokens: dict[str, ModalityTokens], seed: int = 3, scale: float = 5.0
) -> dict[str, ModalityTokens]:
    """Encoder outputs with every padded token (``mask`` False) replaced by large noise.

    A head must give the same output on the result as on ``tokens``; the token-level twin of
    :func:`noise_padding`, for tests that call a head directly.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tokens.items():
        noise = torch.randn(t.tokens.shape, generator=gen, dtype=t.tokens.dtype) * scale
        out[name] = replace(t, tokens=torch.where(t.mask[..., None], t.tokens, noise))
    return out


def cat_batches(*batches: Batch) -> Batch:
    """Concatenate batches with the same modalities and input shapes along the batch dimension."""
    first = batches[0]
    inputs = {
        name: {k: torch.cat([b.inputs[name][k] for b in batches]) for k in first.inputs[name]}
        for name in first.modalities
    }
    labels = None if first.labels is None else torch.cat([b.labels for b in batches])
    ids = [i for b in batches for i in b.ids]
    present = torch.cat([b.present for b in batches])
    return Batch(inputs, present, labels, ids=ids, modalities=first.modalities)


def write_toy_cache(
    cache_dir,
    n_stays: int = 160,
    modalities: Sequence[str] = ("ehr", "cxr", "ecg", "notes"),
    seed: int = 0,
    image_size: int = 16,
    ecg_samples: int = 64,
    note_len: int = 12,
    num_variables: int = 17,
    num_static: int = 8,
    shard_size: int = 64,
):
    """Write a small, learnable cache in the real on-disk layout, without the raw-file pipeline.

    The label follows a logistic model of one feature per modality (EHR mean value, CXR brightness,
    ECG amplitude, a note keyword), so every modality carries signal; modalities are missing at
    random (~30%) with EHR always present when listed. For tests of training, evaluation and
    attribution; real runs use ``clinical-moe synth`` + ``clinical-moe preprocess``.

    Returns:
        The manifest DataFrame.
    """
    import numpy as np

    from clinical_moe.data.cache_writer import ShardWriter, finalize_cache

    rng = np.random.default_rng(seed)
    mods = tuple(modalities)
    z = rng.normal(size=(n_stays, len(mods)))  # (n, M) latent per modality
    logit = 1.5 * z.sum(1) / np.sqrt(len(mods)) - 0.5
    risk = 1 / (1 + np.exp(-logit))
    labels = (rng.random(n_stays) < risk).astype(np.float32)
    present = rng.random((n_stays, len(mods))) < 0.7
    if "ehr" in mods:
        present[:, mods.index("ehr")] = True
    present[~present.any(1), 0] = True
    split = np.array(["train", "val", "test"])[rng.choice(3, n_stays, p=[0.6, 0.2, 0.2])]
    shapes = {"cxr": (image_size, image_size), "ecg": (12, ecg_samples), "notes": (note_len,)}
    metas = []
    for s0 in range(0, n_stays, shard_size):
        w = ShardWriter(cache_dir, s0 // shard_size, mods, 1, shapes, num_variables, num_static)
        for i in range(s0, min(s0 + shard_size, n_stays)):
            meta = {
                "stay_id": 30_000_000 + i,
                "subject_id": 10_000_000 + i,
                "split": split[i],
                "label": labels[i],
                "true_risk": risk[i],
            }
            ehr, events = None, {}
            for m, name in enumerate(mods):
                if not present[i, m]:
                    continue
                zi = z[i, m]
                if name == "ehr":
                    L = int(rng.integers(3, 10))
                    obs = rng.random((L, num_variables)) < 0.5
                    obs[:, 0] = True
                    values = rng.normal(zi, 1.0, (L, num_variables)).astype(np.float32) * obs
                    ehr = {
                        "values": values,
                        "obs_mask": obs,
                        "times": np.sort(rng.uniform(0, 48, L)),
                        "static": rng.normal(size=num_static),
                    }
                elif name == "cxr":
                    img = np.clip(
                        rng.normal(128 + 30 * zi, 20, (1, image_size, image_size)), 0, 255
                    )
                    events[name] = (img.astype(np.uint8), np.array([rng.uniform(0, 48)]))
                elif name == "ecg":
                    t = np.linspace(0, 6.28 * 4, ecg_samples)
                    sig = (1 + 0.5 * zi) * np.sin(t)[None] + rng.normal(0, 0.1, (12, ecg_samples))
                    events[name] = (sig[None].astype(np.float16), np.array([rng.uniform(0, 48)]))
                elif name == "notes":
                    ids = rng.integers(4, 50, note_len)
                    ids[: int(rng.integers(1, 4))] = 2 if zi > 0 else 3  # keyword tokens
                    ids[int(rng.integers(note_len // 2, note_len)) :] = 0  # padding
                    events[name] = (ids[None].astype(np.int32), np.array([rng.uniform(0, 48)]))
            w.add(meta, ehr=ehr, events=events)
        metas.append(w.close())
    summary = {
        "modalities": list(mods),
        "label_columns": ["label"],
        "task": "toy",
        "toy": True,
        # what encoders must be built with to read this cache (merged into encoder options)
        "encoder_kwargs": {
            "ehr": {"num_variables": num_variables, "num_static": num_static},
            "notes": {"vocab_size": 64},
        },
    }
    return finalize_cache(
        cache_dir, metas, summary, num_variables=num_variables if "ehr" in mods else None
    )
