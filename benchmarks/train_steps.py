"""Measurements of :mod:`benchmarks.bench_train`: one head's step throughput, and DDP scaling.

:func:`measure_head` builds the real :class:`~clinical_moe.training.engine.Trainer` for a config
(no MLflow, no checkpoints written) and times, on batches collated beforehand from the cache,
``steps`` optimiser steps (``Trainer.train_step``: forward, loss, backward, clipping, AdamW) and
``steps`` eval-mode forward passes; data loading (dataset reads + collate) is timed on its own.

:func:`ddp_scaling` runs ``pipelines.train`` for a few steps as one process and under
``torchrun --nproc_per_node 2`` (gloo on CPU), and compares the training samples/s the engine
logged for its last epoch.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, CpuShare, TreeMemorySampler, check_ok, run_measured


def tier_config(head: str, tier: str) -> Path:
    """``configs/tiny/<head>.yaml`` for ``tiny``, ``configs/<head>.yaml`` for ``paper``."""
    return REPO / "configs" / ("tiny" if tier == "tiny" else "") / f"{head}.yaml"


def base_overrides(root: Path, cache: Path, work: Path, threads: int, device: str) -> list[str]:
    """Point a config at the benchmark's corpus and cache; no model logging, fixed threads."""
    return [
        f"data.root={root}",
        f"data.cache_dir={cache}",
        f"train.num_threads={threads}",
        f"train.device={device}",
        f"train.checkpoint_dir={work / 'checkpoints'}",
        "tracking.log_model=false",
        "train.num_workers=0",
    ]


def _batches(trainer, n: int, split: str = "train") -> list:
    """``n`` collated batches of the config's batch size, cycling through ``split``."""
    from torch.utils.data import DataLoader

    from clinical_moe.data.dataset import Collator

    ds = getattr(trainer.data, split)
    loader = DataLoader(
        ds, batch_size=trainer.cfg.train.batch_size, shuffle=False, collate_fn=Collator(ds)
    )
    return list(itertools.islice(itertools.cycle(loader), n)) if len(ds) else []


def measure_head(
    head: str,
    tier: str,
    root: Path,
    cache: Path,
    work: Path,
    steps: int,
    warmup: int,
    threads: int,
    device: str = "cpu",
) -> dict:
    """Train and inference samples/s of one head at one config tier, in this process."""
    import torch

    from clinical_moe.config import load_config
    from clinical_moe.tracking import NullLogger
    from clinical_moe.training.checkpoint import CheckpointDir
    from clinical_moe.training.engine import Trainer

    path = tier_config(head, tier)
    cfg = load_config(path, base_overrides(root, cache, work, threads, device))
    with TreeMemorySampler(os.getpid(), interval=0.05) as mem, tempfile.TemporaryDirectory() as tmp:
        rss_start = mem.peak_mb
        trainer = Trainer(cfg, cache, CheckpointDir(tmp), NullLogger(), quiet=True)
        n = warmup + steps
        t0 = time.perf_counter()
        train_b = _batches(trainer, n)
        load_s = time.perf_counter() - t0
        for b in train_b[:warmup]:
            trainer.train_step(b)
        t0 = time.perf_counter()
        for b in train_b[warmup:]:
            trainer.train_step(b)
        train_s = time.perf_counter() - t0
        model = trainer.model.eval()
        eval_b = _batches(trainer, n, "val") or train_b
        with torch.no_grad():
            for b in eval_b[:warmup]:
                model(b.to(trainer.info.device))
            t0 = time.perf_counter()
            for b in eval_b[warmup:]:
                model(b.to(trainer.info.device))
            infer_s = time.perf_counter() - t0
        mem.sample()
    n_train = sum(len(b) for b in train_b[warmup:])
    n_infer = sum(len(b) for b in eval_b[warmup:])
    out = {
        "head": head,
        "tier": tier,
        "config": str(path.relative_to(REPO)),
        "batch_size": cfg.train.batch_size,
        "d_model": cfg.model.d_model,
        "num_tokens": cfg.model.num_tokens,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "steps": steps,
        "warmup_steps": warmup,
        "threads": threads,
        "train_samples_per_s": round(n_train / train_s, 2),
        "train_ms_per_step": round(train_s / max(1, len(train_b) - warmup) * 1e3, 2),
        "infer_samples_per_s": round(n_infer / infer_s, 2),
        "load_samples_per_s": round(sum(len(b) for b in train_b) / load_s, 2),
        "peak_rss_mb": mem.peak_mb,
        "rss_before_model_mb": rss_start,
    }
    if device.startswith("cuda"):
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 1024**2, 1)
    return out


# ------------------------------------------------------------------------------------------------
# DDP scaling


def _last_epoch_rate(uri: str, run_name: str) -> float | None:
    """The ``train_samples_per_s`` the engine logged for the run's last epoch."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench_train")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    if not runs:
        return None
    hist = client.get_metric_history(runs[0].info.run_id, "train_samples_per_s")
    return max(hist, key=lambda m: m.step).value if hist else None


def ddp_run(
    head: str,
    tier: str,
    nproc: int,
    root: Path,
    cache: Path,
    work: Path,
    steps: int,
    threads: int = 1,
    epochs: int = 2,
) -> dict:
    """``pipelines.train`` with ``nproc`` processes (torchrun when > 1), for ``steps`` per epoch."""
    name = f"bench-{head}-{tier}-p{nproc}t{threads}-{int(time.time() * 1000)}"
    uri = f"sqlite:///{(work / 'mlflow-bench.db').resolve()}"
    overrides = base_overrides(root, cache, work, threads, "cpu") + [
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={steps}",
        "train.patience=100",
        "train.checkpoint_every=0",
        f"tracking.uri={uri}",
        "tracking.experiment=bench_train",
        f"tracking.run_name={name}",
    ]
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "pipelines.train",
        "--config",
        str(tier_config(head, tier)),
        "--quiet",
        *overrides,
    ]
    share = CpuShare()
    res = run_measured(cmd, env={"OMP_NUM_THREADS": str(threads)}, timeout=3600)
    check_ok(res, f"train with {nproc} process(es)")
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "samples_per_s": _last_epoch_rate(uri, name),
        "wall_seconds": round(res["seconds"], 1),
        **{k: v for k, v in res.items() if k.startswith(("peak_", "max_"))},
        "other_processes_cores": share.others_cores(),
    }


def ddp_scaling(
    head: str, tier: str, root: Path, cache: Path, work: Path, steps: int, threads_variant: bool
) -> dict:
    """1 process vs 2 processes (1 thread each), and optionally 1 process with 2 threads."""
    variants = ((1, 1), (2, 1), (1, 2)) if threads_variant else ((1, 1), (2, 1))
    runs = [ddp_run(head, tier, p, root, cache, work, steps, threads=t) for p, t in variants]
    one, two = runs[0]["samples_per_s"], runs[1]["samples_per_s"]
    threaded = runs[2]["samples_per_s"] if threads_variant else None
    ok = one and two
    return {
        "head": head,
        "tier": tier,
        "config": str(tier_config(head, tier).relative_to(REPO)),
        "steps_per_epoch": steps,
        "epochs": 2,
        "rate": "last epoch's train_samples_per_s",
        "runs": runs,
        "ratio_2proc_vs_1proc": round(two / one, 3) if ok else None,
        "ratio_1proc_2threads_vs_1thread": round(threaded / one, 3) if one and threaded else None,
    }
