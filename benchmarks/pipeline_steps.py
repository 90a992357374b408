"""The measured steps of :mod:`benchmarks.bench_pipeline`: synth and preprocess, one run each.

Each step runs in a child process (``python -m benchmarks.bench_pipeline --child KIND PARAMS``)
so that its peak RSS, summed over its worker processes, is its own; ``in_process=True`` runs it
here instead (smoke tests: no interpreter start-up, but the RSS is this whole process's).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import CpuShare, TreeMemorySampler, check_ok, last_json_line, run_measured

SYNTH_RECORD = "bench_synth.json"


def corpus_dir(work: Path, n: int, image_size, seed: int = 0) -> Path:
    """Where the corpus of ``n`` patients lives (one per size, image size and seed)."""
    return Path(work) / f"corpus-n{n}-img{image_size[0]}x{image_size[1]}-s{seed}"


def child(kind: str, params: dict) -> dict:
    """Run one step in this process and return what it measured (the child's entry point)."""
    if kind == "synth":
        return _synth_here(**params)
    if kind == "preprocess":
        return _preprocess_here(**params)
    raise ValueError(f"unknown step {kind!r}")


def _synth_here(out: str, n: int, seed: int, workers: int, image_size: list[int]) -> dict:
    from clinical_moe.data.synthetic import generate_corpus

    t0 = time.perf_counter()
    summary = generate_corpus(
        out,
        n_patients=n,
        seed=seed,
        workers=workers,
        image_size=tuple(image_size),
        quiet=True,
        overwrite=True,
    )
    return {"seconds": time.perf_counter() - t0, "counts": summary.counts}


def _preprocess_here(root: str, cache: str, workers: int, config: str) -> dict:
    import clinical_moe.data.plan as plan_mod
    from clinical_moe.config import load_config
    from clinical_moe.data.cache import build_cache

    store = Path(f"{cache}.decoded")  # its own, emptied: the whole pass, decoding included
    shutil.rmtree(store, ignore_errors=True)
    cfg = load_config(
        config,
        [
            f"data.root={root}",
            f"data.cache_dir={cache}",
            f"data.decode_store={store}",
            f"data.workers={workers}",
        ],
    )
    original, timing = plan_mod.plan_stays, {}

    def timed_plan(*args, **kwargs):
        t = time.perf_counter()
        result = original(*args, **kwargs)
        timing["plan"] = time.perf_counter() - t
        return result

    plan_mod.plan_stays = timed_plan  # build_cache looks it up at call time
    try:
        t0 = time.perf_counter()
        build_cache(cfg, resume=False, quiet=True)
        seconds = time.perf_counter() - t0
    finally:
        plan_mod.plan_stays = original
    s = json.loads((Path(cache) / "summary.json").read_text())
    return {
        "seconds": seconds,
        "plan_seconds": timing.get("plan"),
        "num_stays": s["num_stays"],
        "dicoms": s.get("cxr", {}).get("paired_images", 0),
        "ecgs": s.get("ecg", {}).get("paired_records", 0),
        "notes": s.get("notes", {}).get("paired_notes", 0),
        "skipped_files": s["skipped_files"]["total"],
        "image_size": cfg.data.image_size,
        "ecg_samples": cfg.data.ecg_samples,
    }


def _run(kind: str, params: dict, in_process: bool) -> dict:
    """One step, measured: the step's own numbers + wall, peak tree RSS, others' CPU use."""
    share = CpuShare()
    if in_process:
        t0 = time.perf_counter()
        with TreeMemorySampler(os.getpid(), interval=0.05) as mem:
            inner = child(kind, params)
        outer = {"wall_seconds": time.perf_counter() - t0, **mem.summary()}
    else:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_pipeline",
            "--child",
            kind,
            json.dumps(params),
        ]
        res = run_measured(cmd)
        check_ok(res, f"{kind} step")
        inner = last_json_line(res["stdout"])
        outer = {"wall_seconds": res["seconds"]}
        outer.update((k, v) for k, v in res.items() if k.startswith(("peak_", "max_")))
    outer["wall_seconds"] = round(outer["wall_seconds"], 2)
    return {
        **inner,
        **outer,
        "seconds": round(inner["seconds"], 2),
        "other_processes_cores": share.others_cores(),
        "in_process": in_process,
    }


def _per_s(count: float, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else float("nan")


def synth(out: Path, n: int, seed: int, workers: int, image_size, in_process: bool) -> dict:
    """Write a corpus of ``n`` patients to ``out``; rates per second of generation."""
    params = {
        "out": str(out),
        "n": n,
        "seed": seed,
        "workers": workers,
        "image_size": list(image_size),
    }
    r = _run("synth", params, in_process)
    c, s = r["counts"], r["seconds"]
    r.update(
        workers=workers,
        patients_per_s=_per_s(n, s),
        stays_per_s=_per_s(c["icustays"], s),
        dicoms_per_s=_per_s(c.get("dicom_files", 0), s),
        ecgs_per_s=_per_s(c.get("ecg_files", 0), s),
    )
    return r


def ensure_corpus(
    root: Path, n: int, seed: int, workers: int, image_size, in_process: bool
) -> dict:
    """The synth measurement of ``root``: stored when the corpus exists, else generate it now."""
    record = root / SYNTH_RECORD
    if (root / "truth" / "effects.json").is_file() and record.is_file():
        return {**json.loads(record.read_text()), "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    result = synth(root, n, seed, workers, image_size, in_process)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "reused": False}


def preprocess(root: Path, cache: Path, workers: int, config: str, in_process: bool) -> dict:
    """Build a fresh cache of ``root`` at ``cache``; rates per second of the whole pass."""
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(f"{cache}.decoded", ignore_errors=True)
    params = {"root": str(root), "cache": str(cache), "workers": workers, "config": config}
    r = _run("preprocess", params, in_process)
    s = r["seconds"]
    r.update(
        workers=workers,
        stays_per_s=_per_s(r["num_stays"], s),
        dicoms_per_s=_per_s(r["dicoms"], s),
        ecgs_per_s=_per_s(r["ecgs"], s),
        cache_mb=disk_mb(cache),
        decode_store_mb=disk_mb(Path(f"{cache}.decoded")),
    )
    if r.get("plan_seconds") is not None:
        r["plan_seconds"] = round(r["plan_seconds"], 2)
        r["plan_share"] = round(r["plan_seconds"] / s, 3) if s > 0 else None
    return r


def disk_mb(path: Path) -> float:
    """Total size of the files under ``path`` in MiB (0 when absent)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                continue
    return round(total / 1024**2, 1)


def size_scaling(sizes: list[dict]) -> list[dict]:
    """Rates per size relative to the smallest size (1.0 = time grows linearly with size)."""
    done = [s for s in sizes if s.get("preprocess")]
    if not done:
        return []
    base = done[0]
    rows = []
    for s in done:
        syn, pre = s["synth"], s["preprocess"]
        rows.append(
            {
                "patients": s["patients"],
                "synth_stays_per_s": syn["stays_per_s"],
                "preprocess_stays_per_s": pre["stays_per_s"],
                "synth_rate_vs_smallest": round(
                    syn["stays_per_s"] / base["synth"]["stays_per_s"], 3
                ),
                "preprocess_rate_vs_smallest": round(
                    pre["stays_per_s"] / base["preprocess"]["stays_per_s"], 3
                ),
                "synth_peak_rss_mb": syn["peak_rss_tree_mb"],
                "preprocess_peak_rss_mb": pre["peak_rss_tree_mb"],
                "preprocess_plan_share": pre.get("plan_share"),
            }
        )
    return rows
