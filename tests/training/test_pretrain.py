"""``clinical-moe pretrain``: encoders trained on their own targets, then loaded and frozen by heads."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from clinical_moe.config import load_config
from clinical_moe.model import build_encoders
from clinical_moe.testing import random_batch
from tests.training.conftest import CONFIGS, PYTHON, REPO, subprocess_env, tiny_overrides

# average pooling: the toy target (brightness) is a global average, learned in the few steps here;
# the default max half (thin local findings, tests/encoders) needs more steps on this toy
CXR = {"channels": [4, 8], "image_size": 16, "pool": "avg"}
ECG = {"channels": [8, 8], "signal_length": 64}


def write_target_cache(path: Path, n: int = 120, seed: int = 0) -> Path:
    """A small cache (ehr, cxr, ecg) whose images / ECGs carry learnable per-event targets.

    cxr: ``dense`` = brighter than average (binary), ``unknown`` always NaN. ecg: ``high`` =
    larger amplitude (binary), ``amp`` = the standardised amplitude (continuous). ~20% of the
    binary targets are unknown.
    """
    from clinical_moe.data.cache_writer import ShardWriter, finalize_cache

    rng = np.random.default_rng(seed)
    mods, V, S, H, L = ("ehr", "cxr", "ecg"), 5, 2, 16, 64
    split = np.array(["train", "val", "test"])[rng.choice(3, n, p=[0.6, 0.2, 0.2])]
    w = ShardWriter(path, 0, mods, 1, {"cxr": (H, H), "ecg": (12, L)}, V, S, {"cxr": 2, "ecg": 2})
    for i in range(n):
        z = rng.normal(size=2)
        events = {}
        if rng.random() < 0.8:
            img = np.clip(rng.normal(128 + 40 * z[0], 20, (1, H, H)), 0, 255).astype(np.uint8)
            tg = np.array([[float(z[0] > 0), np.nan]], np.float32)
            if rng.random() < 0.2:
                tg[0, 0] = np.nan
            events["cxr"] = (img, np.array([10.0]), tg)
        if rng.random() < 0.8:
            sig = (1 + 0.4 * z[1]) * np.sin(np.linspace(0, 25, L))[None] + rng.normal(
                0, 0.1, (12, L)
            )
            tg = np.array([[float(z[1] > 0), z[1]]], np.float32)
            events["ecg"] = (sig[None].astype(np.float16), np.array([5.0]), tg)
        ehr = {
            "values": rng.normal(size=(3, V)).astype(np.float32),
            "obs_mask": np.ones((3, V), bool),
            "times": np.array([1.0, 2.0, 3.0]),
            "static": rng.normal(size=S),
        }
        meta = {
            "stay_id": 40_000_000 + i,
            "subject_id": i,
            "split": split[i],
            "label": float(z.sum() > 0),
        }
        w.add(meta, ehr=ehr, events=events)
    summary = {
        "modalities": list(mods),
        "label_columns": ["label"],
        "encoder_kwargs": {"ehr": {"num_variables": V, "num_static": S}},
        "targets": {"cxr": ["dense", "unknown"], "ecg": ["high", "amp"]},
        "target_kinds": {
            "cxr": {"dense": "binary", "unknown": "binary"},
            "ecg": {"high": "binary", "amp": "continuous"},
        },
    }
    finalize_cache(path, [w.close()], summary, num_variables=V)
    return path


@pytest.fixture(scope="module")
def target_cache(tmp_path_factory) -> Path:
    return write_target_cache(tmp_path_factory.mktemp("targets") / "cache")


def _cfg(cache: Path, tmp: Path, uri: str, *extra: str):
    over = tiny_overrides(cache, tmp, uri, **{"data.modalities": "[ehr, cxr, ecg]"})
    over += [
        f"model.encoders={{cxr: {CXR}, ecg: {ECG}}}".replace("'", ""),
        "pretrain.epochs=4",
        "pretrain.batch_size=16",
        "pretrain.lr=3.0e-3",
        f"pretrain.out_dir={tmp / 'pretrained'}",
        *extra,
    ]
    return load_config(CONFIGS / "tiny" / "late.yaml", over)


@pytest.fixture(scope="module")
def pretrained(target_cache, tmp_path_factory, mlflow_template):
    """Both encoders pretrained once (MLflow store included) for the tests below."""
    import shutil

    from clinical_moe.training.pretrain import pretrain_encoders

    tmp = tmp_path_factory.mktemp("pretrain")
    shutil.copyfile(mlflow_template, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp}/mlflow.db"
    torch.set_num_threads(1)
    cfg = _cfg(target_cache, tmp, uri)
    return cfg, uri, pretrain_encoders(cfg, ["cxr", "ecg"])


def test_pretrain_writes_loadable_weights_and_logs(pretrained):
    from mlflow.tracking import MlflowClient

    cfg, uri, results = pretrained
    for m in ("cxr", "ecg"):
        r = results[m]
        state = torch.load(r["path"], map_location="cpu", weights_only=True)
        assert state["modality"] == m and "state_dict" in state
        assert any(k.startswith("target_head.") for k in state["state_dict"])
        run = MlflowClient(uri).get_run(r["run_id"])
        assert run.info.status == "FINISHED"
        assert "train_loss" in run.data.metrics and "val_loss" in run.data.metrics
        arts = [a.path for a in MlflowClient(uri).list_artifacts(r["run_id"], "weights")]
        assert f"weights/{m}.pt" in arts
    cxr = results["cxr"]["metrics"]
    assert cxr["best_val_auroc/dense"] > 0.85, cxr  # brightness is easy: it must be learned
    assert "best_val_auroc/unknown" not in cxr  # no known value: no AUROC
    assert results["ecg"]["metrics"]["best_val_auroc/high"] > 0.7  # 20 steps; chance 0.5
    assert "best_val_auroc/amp" not in results["ecg"]["metrics"]  # continuous: loss only


def test_frozen_pretrained_encoder_does_not_change(pretrained):
    cfg, _, results = pretrained
    spec = {"cxr": {**CXR, "pretrained": results["cxr"]["path"], "freeze": True}}
    enc = build_encoders(["cxr"], cfg.model.d_model, cfg.model.num_tokens, spec)["cxr"]
    saved = torch.load(results["cxr"]["path"], weights_only=True)["state_dict"]
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.training and not enc.train().training


def test_training_step_leaves_frozen_parts_alone(pretrained):
    from clinical_moe import create_model
    from clinical_moe.training.losses import task_loss

    cfg, _, results = pretrained
    enc = {
        "cxr": {**CXR, "pretrained": results["cxr"]["path"], "freeze": True},
        "ecg": {**ECG, "pretrained": results["ecg"]["path"], "freeze": "backbone"},
    }
    d, t = cfg.model.d_model * 2, 3  # another width / token count than the pretrained files
    with pytest.raises(ValueError, match="cxr.pt"):  # freeze: true needs every tensor to match
        create_model("late", modalities=("cxr", "ecg"), d_model=d, num_tokens=t, encoders=enc)
    enc["cxr"]["freeze"] = "backbone"
    model = create_model("late", modalities=("cxr", "ecg"), d_model=d, num_tokens=t, encoders=enc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch(model, 6, present=torch.ones(6, 2, dtype=torch.bool), seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(batch)
    task_loss(out.logits, batch.labels, "binary").backward()
    opt.step()
    after = model.state_dict()
    for name, p in model.named_parameters():
        is_backbone = ".backbone." in name
        assert p.requires_grad != is_backbone, name
        changed = not torch.equal(before[name], after[name])
        assert changed != is_backbone, name
    for name, buf in model.named_buffers():  # e.g. batch-norm statistics of a frozen backbone
        assert torch.equal(before[name], buf), name


def test_mismatched_backbone_is_refused_naming_the_file(pretrained):
    cfg, _, results = pretrained
    spec = {
        "cxr": {"channels": [4, 16], "pretrained": results["cxr"]["path"], "freeze": "backbone"}
    }
    with pytest.raises(ValueError, match=r"cxr\.pt.*backbone"):
        build_encoders(["cxr"], 16, 2, spec)


def test_backbone_reuse_across_widths_logs_the_skipped_projection(pretrained, caplog):
    cfg, _, results = pretrained
    spec = {"cxr": {**CXR, "pretrained": results["cxr"]["path"], "freeze": "backbone"}}
    with caplog.at_level(logging.INFO, logger="clinical_moe.encoders.base"):
        enc = build_encoders(["cxr"], 48, 5, spec)["cxr"]
    assert "cell_proj" in caplog.text and "cxr.pt" in caplog.text
    saved = torch.load(results["cxr"]["path"], weights_only=True)["state_dict"]
    for k, v in enc.state_dict().items():
        if k.startswith("backbone."):
            torch.testing.assert_close(v, saved[k])
    with torch.no_grad():
        toks = enc(enc.random_inputs(3, torch.Generator().manual_seed(0)))
    assert toks.tokens.shape == (3, 5, 48)


def test_train_with_targets_logs_encoder_losses_and_loads_pretrained(
    pretrained, target_cache, tmp_path, new_store
):
    """`train` on a cache with targets adds the encoder losses; a frozen pretrained encoder gets none."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import train

    cfg, _, results = pretrained
    uri = new_store(tmp_path)
    over = [
        f"model.encoders.ecg.pretrained={results['ecg']['path']}",
        "model.encoders.ecg.freeze=backbone",
    ]
    run_cfg = _cfg(target_cache, tmp_path, uri, "train.epochs=1", "tracking.run_name=aux", *over)
    train(run_cfg, quiet=True)
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name(run_cfg.tracking.experiment).experiment_id]
    )
    metrics = run.data.metrics
    assert "train_cxr_target_loss" in metrics and "train_encoder_aux_loss" in metrics
    assert "train_ecg_target_loss" not in metrics  # backbone frozen: no target head, no loss


@pytest.mark.slow
def test_cli_pretrain(target_cache, tmp_path, new_store):
    uri = new_store(tmp_path)
    over = [str(o) for o in tiny_overrides(target_cache, tmp_path, uri)]
    over += [
        "data.modalities=[ehr, cxr, ecg]",
        "pretrain.epochs=1",
        f"model.encoders={{cxr: {CXR}}}".replace("'", ""),
    ]
    out = tmp_path / "weights"
    cmd = [
        PYTHON,
        "-m",
        "pipelines.cli",
        "pretrain",
        "--config",
        str(CONFIGS / "tiny" / "late.yaml"),
    ]
    cmd += [*over, "--modality", "cxr", "--out", str(out), "--quiet"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "cxr.pt").is_file() and (out / "cxr.json").is_file()
    assert "model.encoders.cxr.pretrained=" in proc.stdout
