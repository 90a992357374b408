"""Issue 13: the two-stage preprocessing: decode once, then assemble any task or seed cheaply.

On one corpus (``--corpus``), each step in a child process (its whole process tree's peak RSS
sampled), all in one run so that the ratios compare like with like:

1. ``full``: a from-scratch build (empty decode store): EHR table store, decode, assembly.
2. ``new_task`` / ``new_seed``: the same corpus with ``data.task=los7`` / ``seed=1``, against the
   filled store. Target: each <= 10% of ``full``.
3. ``scratch_task``: ``los7`` again from an empty store; its cache must be byte-identical to
   ``new_task``'s (every file but ``decode_store.json``, the pointer to the store).
4. ``engines``: the decode stage alone into empty stores, local pool vs Ray, both with 2 workers,
   alternating ``--rounds`` times; throughput in files/s (Ray's start-up is timed apart) and
   whether the two stores and caches hold the same bytes. Target: Ray >= 0.9x the pool.
5. ``shards``: ``--shard 0/2``, ``--shard 1/2`` then ``--finalize``: the same cache as ``full``.
6. ``--assembly-corpus`` (e.g. 50,000 patients): a full build, then a new task's assembly with
   its peak RSS. Target: < 4 GB.

Usage::

    python -m benchmarks.bench_stages --corpus runs/bq/corpus-n20000-s0 \\
        --assembly-corpus runs/bench_stages/corpus-n50000 --out benchmarks/results/stages.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    add_common_args,
    check_ok,
    environment,
    finish,
    last_json_line,
    run_measured,
)

RSS_TARGET_MB = round(4e9 / 1024**2, 1)
ASSEMBLY_TARGET = 0.10
RAY_TARGET = 0.9
POINTER = "decode_store.json"


def _config(root: str, cache: str, store: str, overrides: list[str]):
    from clinical_moe.config import load_config

    base = [
        f"data.root={root}",
        f"data.cache_dir={cache}",
        f"data.decode_store={store}",
        "data.workers=2",
    ]
    return load_config(str(REPO / "configs/tiny/fusemoe.yaml"), base + overrides)


def child(params: dict) -> dict:
    """One measured step in this (child) process: a build, or the decode stage alone."""
    import clinical_moe.data.plan as plan_mod
    from clinical_moe.data import cache as cache_mod

    cfg = _config(params["root"], params["cache"], params["store"], params["overrides"])
    if params.get("decode_only"):
        return _decode_only(cfg)
    timing: dict = {}
    original = plan_mod.plan_stays

    def timed(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        timing["plan_seconds"] = time.perf_counter() - t
        return out

    plan_mod.plan_stays = timed
    t0 = time.perf_counter()
    part = tuple(params["part"]) if params.get("part") else None
    cache_mod.build_cache(
        cfg, resume=False, quiet=True, part=part, finalize=bool(params.get("finalize"))
    )
    return {
        "seconds": time.perf_counter() - t0,
        **timing,
        "decode": dict(cache_mod.last_decode),
    }


def _decode_only(cfg) -> dict:
    """Plan, then time the decode stage alone (Ray's start-up timed apart)."""
    from clinical_moe.data.assemble import event_refs, missing_entries
    from clinical_moe.data.decode_engine import run_jobs
    from clinical_moe.data.decode_store import make_jobs
    from clinical_moe.data.plan import plan_stays

    refs = event_refs(plan_stays(cfg, quiet=True), cfg)
    todo = missing_entries(refs)
    jobs = [
        j for m, fs in todo.items() for j in make_jobs(m, refs[m]["dir"], refs[m]["settings"], fs)
    ]
    startup = 0.0
    if cfg.data.engine == "ray":
        from clinical_moe.data.decode_engine import start_ray

        t = time.perf_counter()
        ray = start_ray(cfg.data.workers)
        ray.get([ray.remote(lambda: 1).remote() for _ in range(cfg.data.workers)])  # warm workers
        startup = time.perf_counter() - t
    t0 = time.perf_counter()
    stats = run_jobs(jobs, cfg.data.engine, cfg.data.workers, True)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "startup_seconds": startup,
        "files": stats["files"],
        "files_per_s": stats["files"] / seconds,
        "files_per_s_with_startup": stats["files"] / (seconds + startup),
    }


def _step(name: str, params: dict) -> dict:
    res = run_measured(
        [sys.executable, "-m", "benchmarks.bench_stages", "--child", json.dumps(params)]
    )
    check_ok(res, name)
    out = last_json_line(res["stdout"])
    out["wall_seconds"] = round(res["seconds"], 2)
    out["peak_rss_tree_mb"] = res.get("peak_rss_tree_mb")
    return out


def _files(folder: Path, skip=(POINTER,)) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and not p.name.startswith(".")
    }


def identical(a: Path, b: Path) -> bool:
    fa, fb = _files(a), _files(b)
    return fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)


def run(args) -> dict:
    """The steps of the module docstring: those of ``--corpus`` and of ``--assembly-corpus``."""
    work = Path(args.work)
    w = work / "stages"
    shutil.rmtree(w, ignore_errors=True)
    report: dict = {}
    if args.corpus:
        report.update(_main_steps(args, w))
    if args.assembly_corpus:
        big = str(Path(args.assembly_corpus).resolve())
        p = {"root": big, "store": str(w / "store_big")}
        report["big_corpus"] = big
        report["big_full"] = _step("big full", {**p, "cache": str(w / "big"), "overrides": []})
        report["big_new_task"] = _step(
            "big task", {**p, "cache": str(w / "big_los7"), "overrides": ["data.task=los7"]}
        )
        report["big_new_task_peak_rss_mb"] = report["big_new_task"]["peak_rss_tree_mb"]
    report["targets"] = {
        "new_task_or_seed_over_full_max": ASSEMBLY_TARGET,
        "ray_over_pool_min": RAY_TARGET,
        "assembly_peak_rss_mb_max": RSS_TARGET_MB,
    }
    if not args.keep:
        shutil.rmtree(w, ignore_errors=True)
    return report


def _main_steps(args, w: Path) -> dict:
    root = str(Path(args.corpus).resolve())

    def build(name, cache, store, overrides=(), **extra):
        p = {"root": root, "cache": str(w / cache), "store": str(w / store)}
        return _step(name, {**p, "overrides": list(overrides), **extra})

    report: dict = {"corpus": root}
    full = build("full", "full", "store")
    task = build("new_task", "los7", "store", ["data.task=los7"])
    seed = build("new_seed", "seed1", "store", ["seed=1"])
    scratch = build("scratch_task", "los7_scratch", "store_scratch", ["data.task=los7"])
    report["full"], report["new_task"], report["new_seed"] = full, task, seed
    report["scratch_task"] = scratch
    report["new_task_over_full"] = round(task["seconds"] / full["seconds"], 4)
    report["new_seed_over_full"] = round(seed["seconds"] / full["seconds"], 4)
    report["new_task_identical_to_scratch"] = identical(w / "los7", w / "los7_scratch")

    rounds = []
    for r in range(args.rounds):
        row = {}
        for engine in ("pool", "ray"):
            row[engine] = build(
                f"{engine}-{r}",
                f"eng-{engine}-{r}",
                f"store-{engine}-{r}",
                [f"data.engine={engine}"],
                decode_only=True,
            )
        row["ray_over_pool"] = round(row["ray"]["files_per_s"] / row["pool"]["files_per_s"], 3)
        row["ray_over_pool_with_startup"] = round(
            row["ray"]["files_per_s_with_startup"] / row["pool"]["files_per_s"], 3
        )
        row["stores_identical"] = identical(w / f"store-pool-{r}", w / f"store-ray-{r}")
        rounds.append(row)
    if rounds:
        report["engines"] = rounds
        report["ray_over_pool_median"] = sorted(r["ray_over_pool"] for r in rounds)[
            len(rounds) // 2
        ]

    for i in range(2):
        build(f"shard {i}/2", "sharded", "store_sharded", part=[i, 2])
    build("finalize", "sharded", "store_sharded", finalize=True)
    report["shards_identical_to_full"] = identical(w / "full", w / "sharded")
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", help="corpus root (e.g. a 20,000-patient synthetic corpus)")
    p.add_argument("--assembly-corpus", help="a larger corpus for the assembly memory (50k)")
    p.add_argument("--work", default="runs/bench_stages", help="scratch folder")
    p.add_argument("--rounds", type=int, default=2, help="alternating pool / Ray decode rounds")
    p.add_argument("--keep", action="store_true", help="keep the caches and stores")
    p.add_argument("--child", help=argparse.SUPPRESS)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    report = {"benchmark": "stages", "environment": environment(), **run(args)}
    return finish(report, args.out)


if __name__ == "__main__":
    main()
