"""Forward + backward time of the sparse MoE layer vs a dense FFN with the same active FLOPs.

The dense baseline has ``hidden = k * H`` (each token does the work of k experts of width H, i.e.
k / E of the experts' total), so ``ratio = moe_time / dense_time`` measures the overhead of routing
and grouped dispatch. Prints one JSON document.

Usage::

    python -m benchmarks.bench_moe --quick --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from clinical_moe.fusion.moe import DenseFFN, MoELayer

FULL = {"experts": [4, 8, 16, 32], "top_k": [1, 2, 4], "tokens": [1024, 8192, 65536]}
QUICK = {"experts": [4, 16], "top_k": [1, 4], "tokens": [1024, 8192]}


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "git_commit": git_commit(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(fns, warmup: int, reps: int, device: str) -> list[list[float]]:
    """Seconds of each ``fn()`` over ``reps`` rounds after ``warmup`` rounds.

    The functions are interleaved round by round, so a change of machine load during the run
    affects all of them alike (the ratio stays meaningful on a shared machine).
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return times


def bench_one(E: int, k: int, n: int, d: int, h: int, args) -> dict:
    torch.manual_seed(0)
    dev = args.device
    moe = MoELayer(d, num_experts=E, top_k=k, hidden=h, gate=args.gate, cv2=0.01).to(dev).train()
    dense = DenseFFN(d, k * h).to(dev).train()
    x = torch.randn(1, n, d, device=dev, requires_grad=True)  # (1, N, D): one long sequence
    mask = torch.ones(1, n, dtype=torch.bool, device=dev)

    def step_moe():
        out = moe(x, mask)
        (out.y.sum() + out.aux_loss).backward()

    def step_dense():
        dense(x).sum().backward()

    moe_t, dense_t = time_steps([step_moe, step_dense], args.warmup, args.reps, dev)
    t_moe, t_dense = statistics.median(moe_t), statistics.median(dense_t)
    return {
        "experts": E,
        "top_k": k,
        "tokens": n,
        "moe_ms": round(t_moe * 1e3, 3),
        "dense_ms": round(t_dense * 1e3, 3),
        "ratio": round(t_moe / t_dense, 3),
        "ratio_of_min": round(min(moe_t) / min(dense_t), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset of the grid")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="hidden width of each expert")
    p.add_argument("--gate", default="softmax")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    results = []
    for n in grid["tokens"]:
        for E in grid["experts"]:
            for k in grid["top_k"]:
                if k <= E:
                    results.append(bench_one(E, k, n, args.d_model, args.hidden, args))
    report = {
        "benchmark": "moe_vs_dense_ffn_fwd_bwd",
        "d_model": args.d_model,
        "expert_hidden": args.hidden,
        "dense_hidden": "top_k * expert_hidden",
        "gate": args.gate,
        "timing": "median (and min) of interleaved reps after warm-up",
        "warmup": args.warmup,
        "reps": args.reps,
        "machine": machine_info(args.device),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
