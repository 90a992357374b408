"""Shared helpers of the benchmarks: environment record, timing, peak memory, JSON output.

Every benchmark prints one JSON document whose ``environment`` key comes from :func:`environment`:
machine (CPU model, cores, RAM), versions (python, torch, numpy, the package), the git commit and
the load average, so that a figure can always be traced to where and on what it was measured.

The machines these run on are often shared, so absolute times are noisy; the benchmarks report
ratios against a baseline measured in the same run, interleaved with it (:func:`time_interleaved`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from clinical_moe.allocator import retain_freed_memory  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------
# Environment


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the repository, or None when git is unavailable."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: str = "cpu") -> dict:
    """Where and on what a benchmark ran.

    Args:
        device: The torch device the benchmark used (the GPU name is added for CUDA).

    Returns:
        A JSON-ready dict: machine, versions, git commit (and whether the tree had local changes),
        torch threads, load average and a UTC timestamp.
    """
    import numpy
    import psutil
    import torch

    import clinical_moe

    _CPU_SHARES.append(CpuShare())
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_model": cpu_model(),
            "cores_logical": psutil.cpu_count(logical=True),
            "cores_physical": psutil.cpu_count(logical=False),
            "ram_gb": round(psutil.virtual_memory().total / 1024**3, 2),
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "clinical_moe": clinical_moe.__version__,
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "device": device,
        "load_average": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["machine"]["gpu"] = torch.cuda.get_device_name(device)
    return env


class CpuShare:
    """CPU time other processes used while a benchmark ran, in cores (averaged over the run).

    System-wide busy CPU time minus the time of this process and its waited-for descendants. On a
    machine shared with other jobs this says how loaded it was *during* the measurement, which the
    load average (it includes our own work) does not.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.t0 = time.monotonic()
        self.sys0 = self._busy()
        self.own0 = self._own()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others_cores(self) -> float:
        """Average number of cores busy with other processes since construction."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        others = (self._busy() - self.sys0) - (self._own() - self.own0)
        return round(max(0.0, others) / wall, 2)


# One per open benchmark: environment() pushes, finish() pops (run_all nests benchmarks).
_CPU_SHARES: list[CpuShare] = []


# ------------------------------------------------------------------------------------------------
# Timing


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    warmup: int = 1,
    reps: int = 5,
    sync: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Seconds of each ``fn()`` over ``reps`` rounds, after ``warmup`` untimed rounds.

    The functions run round-robin, so a change of machine load during the run hits all of them
    alike and their ratio stays meaningful on a shared machine.

    Args:
        fns: Zero-argument callables (e.g. ours and the baseline).
        warmup: Untimed rounds first.
        reps: Timed rounds.
        sync: Called before reading the clock (e.g. ``torch.cuda.synchronize``).

    Returns:
        One list of ``reps`` durations per function.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    """The median of ``xs`` (NaN when empty)."""
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    """``a / b`` rounded, or None when ``b`` is not positive."""
    return round(a / b, digits) if b and b > 0 else None


# ------------------------------------------------------------------------------------------------
# Memory


def self_peak_rss_mb() -> float:
    """Peak RSS of this process so far, in MiB (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any waited-for descendant process, in MiB (not their sum)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / MIB


class TreeMemorySampler:
    """Peak memory of a process and all its descendants, polled on a thread.

    Worker pools make the peak a sum over processes, which ``ru_maxrss`` does not give. The summed
    RSS counts pages shared between processes (e.g. copy-on-write after ``fork``) once per
    process, so it is an upper bound; the summed PSS (proportional set size, Linux) splits shared
    pages between their users and is the real footprint. Polling can miss a spike shorter than
    ``interval``.

    Args:
        pid: Root process (default: this one).
        interval: Seconds between polls.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak_total = 0
        self.peak_pss_total = 0
        self.peak_processes = 0
        self.peak_by_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one reading now."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = pss = 0
        for p in procs:
            try:
                try:
                    info = p.memory_full_info()
                    pss += getattr(info, "pss", info.rss)
                except psutil.AccessDenied:
                    info = p.memory_info()
                    pss += info.rss
            except psutil.Error:
                continue
            total += info.rss
            self.peak_by_pid[p.pid] = max(self.peak_by_pid.get(p.pid, 0), info.rss)
        self.peak_total = max(self.peak_total, total)
        self.peak_pss_total = max(self.peak_pss_total, pss)
        self.peak_processes = max(self.peak_processes, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self.sample()  # a first reading before the work starts
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        """The largest summed RSS seen, in MiB."""
        return round(self.peak_total / MIB, 1)

    def summary(self) -> dict:
        """Peaks in MiB: summed RSS and PSS, the root process's RSS, the largest other process's."""
        others = [v for k, v in self.peak_by_pid.items() if k != self.pid]
        return {
            "peak_rss_tree_mb": self.peak_mb,
            "peak_pss_tree_mb": round(self.peak_pss_total / MIB, 1),
            "peak_rss_root_mb": round(self.peak_by_pid.get(self.pid, 0) / MIB, 1),
            "peak_rss_largest_child_mb": round(max(others, default=0) / MIB, 1),
            "max_processes": self.peak_processes,
        }


def run_measured(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path | str = REPO,
) -> dict:
    """Run a command, timing it and sampling the summed RSS of its process tree.

    Args:
        cmd: The command line.
        env: Extra environment variables (added to the current ones).
        timeout: Seconds before the command is killed.
        cwd: Working directory (default: the repository root).

    Returns:
        ``seconds``, ``returncode``, the peaks of :meth:`TreeMemorySampler.summary`
        (``peak_rss_tree_mb``, ``peak_pss_tree_mb``, ...), ``stdout`` and the tail of ``stderr``.
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeMemorySampler(proc.pid, interval=0.1) as mem:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return {
        "seconds": time.perf_counter() - t0,
        "returncode": proc.returncode,
        **mem.summary(),
        "stdout": out,
        "stderr_tail": err[-3000:],
    }


def check_ok(result: dict, what: str) -> None:
    """Raise ``RuntimeError`` with the stderr tail when a :func:`run_measured` command failed."""
    if result["returncode"] != 0:
        raise RuntimeError(f"{what} failed (exit {result['returncode']}):\n{result['stderr_tail']}")


def last_json_line(stdout: str) -> dict:
    """The last line of ``stdout`` that parses as a JSON object (what child steps print)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON object in the output: {stdout[-500:]!r}")


# ------------------------------------------------------------------------------------------------
# Command line and output


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--out FILE`` and ``--threads N``, shared by every benchmark.

    Threads default to 1: on a machine shared with other jobs, several intra-op threads per process
    oversubscribe the cores and make timings erratic (10x swings were seen on 2 busy cores).
    """
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 = torch's default)",
    )


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when positive (0 / None keep torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def finish(report: dict, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Add how loaded the machine was, print the report as JSON and write it to ``out``.

    ``machine_loaded`` is True when other processes kept, on average, at least half a core busy
    during the run (``other_processes_cores``). Only where that cannot be measured does it fall
    back to the load average at the start (which also counts a benchmark that just finished).

    Args:
        report: The benchmark's result; gets ``load_average_end``, ``other_processes_cores`` and
            ``machine_loaded``.
        out: Optional file to write (parents created).
        quiet: Do not print (used when a caller aggregates several reports).

    Returns:
        ``report``.
    """
    env = report.get("environment", {})
    report["load_average_end"] = load_average()
    start = env.get("load_average")
    cores = env.get("machine", {}).get("cores_logical") or os.cpu_count() or 1
    others = _CPU_SHARES.pop().others_cores() if _CPU_SHARES else None
    report["other_processes_cores"] = others
    if others is not None:
        report["machine_loaded"] = others >= 0.5
    else:
        report["machine_loaded"] = bool(start and start[0] > 0.5 * cores)
    return emit(report, out, quiet)


def emit(report: dict, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Print ``report`` as JSON (unless ``quiet``) and write it to ``out`` (parents created)."""
    text = json.dumps(report, indent=2, default=str)
    if not quiet:
        print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return report
