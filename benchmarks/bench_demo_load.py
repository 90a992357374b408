"""Issue 14: ``make demo`` on a busy machine, against the same demo on the idle machine.

Runs the demo (``python -m pipelines.demo``, every step from the synthetic corpus to the
attribution report, each round into an empty folder with its own MLflow store) ``--rounds``
times idle and ``--rounds`` times while another job keeps ``--load-threads`` threads busy
(a torch matrix product on that many intra-op threads: "another 2-thread job"), alternating.
Reports the wall time of each run and of each demo step (the demo's own ``timings:`` line), and
``loaded_over_idle`` (median over median). Target: <= 2.

Usage::

    python -m benchmarks.bench_demo_load --rounds 1 --out benchmarks/results/demo_load.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, environment, finish, median, ratio

TARGET = 2.0
LOAD = (
    "import torch, time\n"
    "torch.set_num_threads({threads})\n"
    "a = torch.randn(1024, 1024)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


def _timings(stdout: str) -> dict[str, float]:
    """The demo's ``timings:`` line as ``{step: seconds}``."""
    for line in stdout.splitlines():
        if line.startswith("timings:"):
            return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", line.split(":", 1)[1])}
    return {}


def run_demo(work: Path, args: argparse.Namespace) -> dict:
    """One demo into an empty ``work`` folder; wall seconds and the demo's step timings."""
    shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    env.pop("OMP_NUM_THREADS", None)  # what `make demo` gets: the demo's own default
    cmd = [sys.executable, "-m", "pipelines.demo", "--out", str(work / "demo"), "--quiet"]
    cmd += ["--n-patients", str(args.n_patients), *args.demo_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 1), "steps": _timings(proc.stdout)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="idle and loaded runs each")
    parser.add_argument("--load-threads", type=int, default=2, help="threads of the other job")
    parser.add_argument("--n-patients", type=int, default=2000, help="demo corpus size")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("demo_args", nargs="*", help="passed to pipelines.demo")
    args = parser.parse_args(argv)
    env = environment()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="demo_load_"))
    runs: dict[str, list[dict]] = {"idle": [], "loaded": []}
    try:
        for _ in range(args.rounds):
            runs["idle"].append(run_demo(work / "idle", args))
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD.format(threads=args.load_threads)],
                env=dict(os.environ, OMP_NUM_THREADS=str(args.load_threads)),
            )
            try:
                time.sleep(2)  # the load is running before the demo starts
                runs["loaded"].append(run_demo(work / "loaded", args))
            finally:
                load.kill()
                load.wait()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    idle = median([r["wall_s"] for r in runs["idle"]])
    loaded = median([r["wall_s"] for r in runs["loaded"]])
    steps = runs["idle"][0]["steps"].keys()
    report = {
        "benchmark": "demo_load",
        "environment": env,
        "params": vars(args),
        "runs": runs,
        "idle_s": idle,
        "loaded_s": loaded,
        "loaded_over_idle": ratio(loaded, idle),
        "step_loaded_over_idle": {
            s: ratio(
                median([r["steps"].get(s, float("nan")) for r in runs["loaded"]]),
                median([r["steps"].get(s, float("nan")) for r in runs["idle"]]),
            )
            for s in steps
        },
        "target": TARGET,
    }
    report["target_met"] = report["loaded_over_idle"] is not None and (
        report["loaded_over_idle"] <= TARGET
    )
    return finish(report, args.out)


if __name__ == "__main__":
    main()
