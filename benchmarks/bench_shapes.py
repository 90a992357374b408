"""Every fusion head at the papers' own shapes: step time, memory, FLOP rate (issue #16).

For each shape of issue #16's table, the fusion head alone (no encoders) runs on random
per-modality tokens, one thread:

- ``train_ms``: one training step, forward + loss (BCE + the head's auxiliary terms) + backward +
  optimizer step (Adam; SGD for the FuseMoE paper config), median of ``--reps`` after
  ``--warmup``;
- ``eval_ms``: one evaluation forward (``eval()``, no grad);
- ``params``: trainable parameters;
- ``peak_rss_mb`` / ``step_peak_delta_mb``: peak RSS of the process that ran the shape (one child
  process per shape, so the peaks do not mix) and its rise over the RSS after the model and
  inputs were built (``tracemalloc`` does not see torch's allocations);
- ``train_gflop`` / ``eval_gflop``: the FLOPs the step does, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, batched matmuls, attention; the
  CPU fused attention kernel and its backward, which that counter leaves out, are counted with
  its own attention formulas: :func:`flop_counter`), and
  ``train_flop_fraction`` / ``eval_flop_fraction``: the achieved FLOP rate as a fraction of the
  dense matmul peak measured in the same process just before (``matmul_gflops``: best of a few
  square fp32 matmuls);
- with ``--baseline-rev``, ``baseline_train_flop_fraction``: the same FLOPs over the old
  revision's interleaved step time (the "before" figure under the same load);
- ``reference_s``: the released code's step time at that shape (fixed figures from issue #16,
  measured on this machine when it was busy) and ``reference_over_ours`` (>= 1: ours is faster;
  low and high ends of the reference range).

Targets (issue #16): ``reference_over_ours >= 1`` everywhere, ``>= 2`` for ConfSMoE with none
missing and I2MoE at 4 x 48 tokens; every shape under 4 GiB; FLOP fraction >= 0.4 at B 64.

Usage::

    python -m benchmarks.bench_shapes --out benchmarks/results/shapes.json
    python -m benchmarks.bench_shapes --quick            # tiny shapes, one repeat, in-process
    python -m benchmarks.bench_shapes --shapes i2moe_4x48 --reps 2
    python -m benchmarks.bench_shapes --no-retain-freed-memory   # glibc's default malloc

Each child sets glibc's malloc to keep freed large blocks for reuse, as the ``clinical-moe``
commands that train do by default (:mod:`clinical_moe.allocator`): without it every large tensor
of a step is page-faulted in afresh, which at I2MoE's 4 x 48 shape is about a third of the step.
``--no-retain-freed-memory`` measures with glibc's default behaviour (the baseline revision of
``--baseline-rev`` runs in the same child, under the same setting). The row records
``retain_freed_memory``; ``reference_over_ours_via_baseline`` is given only without the setting,
because issue #16 measured its reference / old ratios under glibc's default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import (
    add_common_args,
    check_ok,
    environment,
    finish,
    last_json_line,
    median,
    ratio,
    retain_freed_memory,
    run_measured,
    self_peak_rss_mb,
    set_threads,
    time_interleaved,
)

MIB = 1024 * 1024
MEMORY_LIMIT_MB = 4096.0
FLOP_FRACTION_TARGET = 0.4


@dataclass
class Shape:
    """One row of issue #16's table.

    Attributes:
        name: Row key.
        head: Registered head name.
        modalities: M.
        tokens: Tokens per modality.
        d_model: Width D.
        batch: Batch B.
        present_p: Probability a modality is present (1.0 = none missing; >= 1 kept per row).
        kwargs: Head options (the rest are the head's defaults).
        reference_s: The released code's train step, (low, high) seconds (issue #16).
        optimizer: ``"adam"`` or ``"sgd"``.
        min_speedup: The target on ``reference_over_ours`` (judged on the low end).
        reference_over_old: Issue #16's "reference / ours" for the code of that time.
    """

    name: str
    head: str
    modalities: int
    tokens: int
    d_model: int
    batch: int
    present_p: float
    kwargs: dict = field(default_factory=dict)
    reference_s: tuple[float, float] | None = None
    optimizer: str = "adam"
    min_speedup: float = 1.0
    reference_over_old: tuple[float, float] | None = None


SHAPES = [
    Shape("fusemoe_script", "fusemoe", 4, 48, 128, 8, 1.0,
          {"num_experts": 3, "top_k": 2, "num_layers": 3, "num_heads": 8}, (4.5, 8.6)),
    Shape("fusemoe_paper", "fusemoe", 4, 48, 128, 8, 1.0,
          {"num_experts": 16, "top_k": 4, "num_layers": 3, "num_heads": 8}, (13.0, 13.0),
          optimizer="sgd"),
    Shape("flex_moe_b8", "flex_moe", 4, 16, 128, 8, 0.5,
          {"num_experts": 16, "top_k": 4, "num_layers": 1, "num_heads": 4}, (0.256, 0.309)),
    Shape("flex_moe_b64", "flex_moe", 4, 16, 128, 64, 0.5,
          {"num_experts": 16, "top_k": 4, "num_layers": 1, "num_heads": 4}, (0.660, 0.908)),
    Shape("conf_smoe_none_missing", "conf_smoe", 4, 48, 128, 64, 1.0,
          {"num_experts": 4, "top_k": 2, "num_layers": 2, "num_heads": 4}, (1.3, 1.4),
          min_speedup=2.0),
    Shape("conf_smoe_half_missing", "conf_smoe", 4, 48, 128, 64, 0.5,
          {"num_experts": 4, "top_k": 2, "num_layers": 2, "num_heads": 4}, (5.2, 6.4)),
    Shape("i2moe_mimic", "i2moe", 3, 4, 128, 32, 1.0,
          {"num_layers": 2, "num_heads": 4, "lambda_int": 0.01, "reweight_hidden": 256},
          (1.1, 1.9)),
    Shape("i2moe_4x48", "i2moe", 4, 48, 128, 64, 1.0,
          {"num_layers": 1, "num_heads": 4, "lambda_int": 0.01, "reweight_hidden": 256},
          (49.0, 49.0), min_speedup=2.0),
]  # fmt: skip

# Issue #16's "reference / ours" column, for the code the issue timed (alternating, same load).
REFERENCE_OVER_OLD = {
    "fusemoe_script": (5.7, 7.7),
    "fusemoe_paper": (9.8, 9.8),
    "flex_moe_b8": (1.9, 2.1),
    "flex_moe_b64": (1.4, 2.2),
    "conf_smoe_none_missing": (0.53, 0.63),
    "conf_smoe_half_missing": (2.1, 2.8),
    "i2moe_mimic": (1.5, 1.9),
    "i2moe_4x48": (0.80, 0.80),
}
for _s in SHAPES:
    _s.reference_over_old = REFERENCE_OVER_OLD[_s.name]


def quick_shape(s: Shape) -> Shape:
    """The same head and options at a tiny size (smoke runs)."""
    kw = dict(s.kwargs)
    kw["num_heads"] = 2
    return Shape(s.name, s.head, min(s.modalities, 3), 3, 16, 4, s.present_p, kw, s.reference_s,
                 s.optimizer, s.min_speedup)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# One shape (runs in its own process in a full run)


def matmul_peak_gflops(n: int, reps: int) -> float:
    """Best dense fp32 ``(n, n) @ (n, n)`` rate of a few calls, in GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flop_counter():
    """A ``FlopCounterMode`` that also counts CPU fused attention (forward and backward).

    PyTorch's counter has formulas for the CUDA attention kernels only, so on CPU every
    ``scaled_dot_product_attention`` that takes the fused path counted 0 FLOPs (the unfused path
    was counted through its batched matmuls). The same formulas are applied to the CPU ops.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

    def raw(formula):  # the imported formulas already map tensors to shapes
        def count(*args, out_val=None, **kwargs):
            return formula(*args, out_val=out_val, **kwargs)

        count._get_raw = True
        return count

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: raw(sdpa_flop),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: raw(sdpa_backward_flop),
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny quick-mode figures do not round to 0)."""
    return float(f"{x:.{digits}g}")


def _inputs(s: Shape, seed: int = 0):
    import torch

    from clinical_moe.testing import draw_present
    from clinical_moe.types import ModalityTokens

    gen = torch.Generator().manual_seed(seed)
    mods = tuple(f"m{i}" for i in range(s.modalities))
    if s.present_p >= 1.0:
        present = torch.ones(s.batch, s.modalities, dtype=torch.bool)
    else:
        present = draw_present(s.batch, s.modalities, gen, p=s.present_p)  # (B, M)
    tokens = {}
    for i, m in enumerate(mods):
        mask = present[:, i : i + 1].expand(s.batch, s.tokens).clone()  # (B, T)
        x = torch.randn(s.batch, s.tokens, s.d_model, generator=gen) * mask.unsqueeze(-1)
        tokens[m] = ModalityTokens(x, mask)
    labels = (torch.rand(s.batch, generator=gen) < 0.3).float()  # (B,)
    return mods, tokens, present, labels


_JUDGING = ("reference_s", "min_speedup", "reference_over_old")


def load_old_package(tree: str):
    """Import the ``clinical_moe`` package found in ``tree`` beside the current one.

    The current package's modules are set aside in ``sys.modules`` while the old one is imported
    (its absolute imports then resolve inside ``tree``), and put back afterwards; the old
    modules stay alive through the returned registry and the objects built from it.
    """
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "clinical_moe"}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, tree)
    try:
        import clinical_moe.fusion  # noqa: F401  (registers the old heads)
        import clinical_moe.registry as old_registry

        if not str(Path(old_registry.__file__).resolve()).startswith(str(Path(tree).resolve())):
            raise RuntimeError(f"imported {old_registry.__file__}, not the tree {tree}")
        return old_registry.HEADS
    finally:
        sys.path.remove(tree)
        for k in [k for k in sys.modules if k.split(".")[0] == "clinical_moe"]:
            del sys.modules[k]
        sys.modules.update(saved)


def run_shape(
    s: Shape, warmup: int, reps: int, matmul_n: int, baseline_tree: str | None = None
) -> dict:
    """Time, count and measure one shape in this process.

    With ``baseline_tree``, the same head from that tree's package then runs in this process
    too, its training steps alternating with ours round by round (``baseline``), after our own
    figures (and our peak RSS) are taken.
    """
    import psutil
    import torch
    from torch.nn import functional as F

    import clinical_moe
    from clinical_moe.registry import HEADS

    mods, tokens, present, labels = _inputs(s)

    def build(registry):
        torch.manual_seed(0)
        head = registry.create(
            s.head,
            modalities=mods,
            d_model=s.d_model,
            num_classes=1,
            num_tokens={m: s.tokens for m in mods},
            **s.kwargs,
        )
        params = [p for p in head.parameters() if p.requires_grad]
        opt = (
            torch.optim.SGD(params, lr=1e-3)
            if s.optimizer == "sgd"
            else torch.optim.Adam(params, lr=1e-4)
        )

        def forward_backward():
            head.train()
            out = head(tokens, present, labels)
            loss = F.binary_cross_entropy_with_logits(out.logits.squeeze(-1), labels)
            (loss + out.aux_loss).backward()

        def train_step():
            opt.zero_grad(set_to_none=True)
            forward_backward()
            opt.step()

        return head, params, opt, forward_backward, train_step

    head, params, opt, forward_backward, train_step = build(HEADS)

    def eval_forward():
        head.eval()
        with torch.no_grad():
            head(tokens, present)

    peak_gflops = matmul_peak_gflops(matmul_n, 5)
    base_rss = psutil.Process().memory_info().rss / MIB
    train_t, eval_t = [], []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        train_step()
        t1 = time.perf_counter()
        eval_forward()
        t2 = time.perf_counter()
        if i >= warmup:
            train_t.append(t1 - t0)
            eval_t.append(t2 - t1)
    peak_rss = self_peak_rss_mb()
    opt.zero_grad(set_to_none=True)
    with flop_counter() as fc:
        forward_backward()
    train_flop = fc.get_total_flops()
    with flop_counter() as fc:
        eval_forward()
    eval_flop = fc.get_total_flops()
    t_train, t_eval = median(train_t), median(eval_t)
    row = {
        **{k: v for k, v in asdict(s).items() if k not in _JUDGING},
        "package": str(Path(clinical_moe.__file__).resolve().parent),
        "params": sum(p.numel() for p in params),
        "train_ms": round(t_train * 1e3, 2),
        "train_ms_all": [round(t * 1e3, 2) for t in train_t],
        "eval_ms": round(t_eval * 1e3, 2),
        "base_rss_mb": round(base_rss, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "step_peak_delta_mb": round(peak_rss - base_rss, 1),
        "matmul_gflops": round(peak_gflops, 2),
        "train_gflop": _sig(train_flop / 1e9),
        "eval_gflop": _sig(eval_flop / 1e9),
        "train_gflops": _sig(train_flop / t_train / 1e9),
        "eval_gflops": _sig(eval_flop / t_eval / 1e9),
        "train_flop_fraction": _sig(train_flop / t_train / 1e9 / peak_gflops),
        "eval_flop_fraction": _sig(eval_flop / t_eval / 1e9 / peak_gflops),
    }
    if baseline_tree:
        old = build(load_old_package(baseline_tree))
        ours_t, old_t = time_interleaved([train_step, old[4]], warmup, reps)
        row["baseline"] = {
            "train_ms": round(median(old_t) * 1e3, 2),
            "train_ms_all": [round(t * 1e3, 2) for t in old_t],
            "ours_interleaved_ms": round(median(ours_t) * 1e3, 2),
            "ours_interleaved_ms_all": [round(t * 1e3, 2) for t in ours_t],
            "paired_speedup": round(median([o / n for o, n in zip(old_t, ours_t)]), 3),
        }
        row["baseline_train_flop_fraction"] = _sig(train_flop / median(old_t) / 1e9 / peak_gflops)
    return row


def judge(s: Shape, row: dict, quick: bool) -> dict:
    """Add the reference column, the ratios and the target checks to a row."""
    row["reference_s"] = list(s.reference_s) if s.reference_s else None
    if s.reference_s and not quick:
        ours = row["train_ms"] / 1e3
        lo, hi = s.reference_s
        row["reference_over_ours"] = [ratio(lo, ours), ratio(hi, ours)]
        row["target_speedup"] = s.min_speedup
        row["meets_speed"] = bool(lo / ours >= s.min_speedup)
    base = row.get("baseline")
    if base and s.reference_over_old:
        speedup = base["paired_speedup"]  # old / ours, step by step in one process
        row["speedup_vs_baseline"] = round(speedup, 3)
    if base and s.reference_over_old and not row.get("retain_freed_memory"):
        # load-independent estimate: (reference / old, issue #16) x (old / ours, this run); only
        # under glibc's default malloc, the setting under which issue #16 took reference / old
        row["reference_over_ours_via_baseline"] = [
            round(r * speedup, 3) for r in s.reference_over_old
        ]
    row["meets_memory"] = bool(row["peak_rss_mb"] < MEMORY_LIMIT_MB)
    if row["batch"] >= 64:
        row["meets_flop_fraction"] = bool(row["train_flop_fraction"] >= FLOP_FRACTION_TARGET)
    return row


def export_revision(rev: str) -> str:
    """``clinical_moe/`` and ``benchmarks/`` of git revision ``rev`` in a temporary folder."""
    import subprocess
    import tempfile

    from benchmarks.common import REPO

    out = tempfile.mkdtemp(prefix="bench_shapes_base_")
    archive = subprocess.run(
        ["git", "archive", rev, "clinical_moe", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
    return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and prints / writes) the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, in-process")
    parser.add_argument("--shapes", nargs="*", default=None, help="names of the rows to run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--matmul-n", type=int, default=1024, help="side of the peak matmul")
    parser.add_argument(
        "--baseline-rev",
        default=None,
        help="also time each head of this git revision, alternating with ours in one process",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc keeps freed large blocks for reuse, as `clinical-moe train` does "
        "(clinical_moe.allocator; on by default)",
    )
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child: one shape
    parser.add_argument("--baseline-tree", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    retained = retain_freed_memory() if args.retain_freed_memory else False
    shapes = {s.name: s for s in SHAPES}
    if args.quick:
        shapes = {k: quick_shape(s) for k, s in shapes.items()}
        args.warmup, args.reps, args.matmul_n = 0, 1, 128
    if args.only:  # child process: one shape, one JSON line
        row = run_shape(
            shapes[args.only], args.warmup, args.reps, args.matmul_n, args.baseline_tree
        )
        row["retain_freed_memory"] = retained
        print(json.dumps(row))
        return row
    names = args.shapes or list(shapes)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {list(shapes)}")

    report = {"benchmark": "shapes", "environment": environment(), "quick": args.quick}
    report["retain_freed_memory"] = args.retain_freed_memory
    old_tree = None
    if args.baseline_rev and not args.quick:
        old_tree = export_revision(args.baseline_rev)
        report["baseline_rev"] = args.baseline_rev
    rows = []
    for name in names:
        s = shapes[name]
        if args.quick:  # in-process: the peaks then are this process's, not the shape's own
            row = run_shape(s, args.warmup, args.reps, args.matmul_n)
            row["retain_freed_memory"] = retained
        else:
            cmd = [sys.executable, "-m", "benchmarks.bench_shapes", "--only", name]
            cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup)]
            cmd += ["--reps", str(args.reps), "--matmul-n", str(args.matmul_n)]
            cmd += ["--baseline-tree", old_tree] if old_tree else []
            cmd += [f"--{'' if args.retain_freed_memory else 'no-'}retain-freed-memory"]
            res = run_measured(cmd, env={"OMP_NUM_THREADS": str(max(args.threads, 1))})
            check_ok(res, f"bench_shapes {name}")
            row = last_json_line(res["stdout"])
            row["child_seconds"] = round(res["seconds"], 1)
        rows.append(judge(s, row, args.quick))
        print(f"[bench_shapes] {name}: train {row['train_ms']} ms, eval {row['eval_ms']} ms, "
              f"peak {row['peak_rss_mb']} MB", file=sys.stderr)  # fmt: skip
    report["shapes"] = rows
    report["matmul_gflops_max"] = max(r["matmul_gflops"] for r in rows)
    report["targets"] = {
        "speed": "reference_over_ours (low end) >= 1, >= 2 for conf_smoe_none_missing, i2moe_4x48",
        "memory_mb": MEMORY_LIMIT_MB,
        "flop_fraction_at_b64": FLOP_FRACTION_TARGET,
        "all_speed": all(r.get("meets_speed", True) for r in rows),
        "all_memory": all(r["meets_memory"] for r in rows),
        "all_flop_fraction": all(r.get("meets_flop_fraction", True) for r in rows),
    }
    return finish(report, args.out)


if __name__ == "__main__":
    main()
