"""Where the decode jobs of :mod:`clinical_moe.data.decode_store` run: here, a process pool, or Ray.

``data.engine`` (or ``clinical-moe preprocess --engine``) chooses:

* ``pool`` (default): a local process pool of ``data.workers`` processes;
* ``ray``: Ray tasks on whatever cluster ``ray.init(address=data.ray_address)`` reaches (a local
  Ray instance when the address is None and no cluster is running). Install it with
  ``pip install "clinical-moe[ray]"``. Every node must see ``data.root`` and the decode store at
  the same paths (a shared file system); entries are written atomically, so nodes never clash.

Every engine runs the same :func:`~clinical_moe.data.decode_store.run_job` on the same jobs, so the
store holds the same bytes whichever ran them. Without any engine, ``preprocess --shard I/N`` jobs
(a SLURM or Kubernetes array) fill the store in parts.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm.auto import tqdm

from clinical_moe.data.decode_store import DecodeJob, run_job

logger = logging.getLogger(__name__)

ENGINES = ("pool", "ray")


def run_jobs(
    jobs: Sequence[DecodeJob],
    engine: str = "pool",
    workers: int = 2,
    quiet: bool = False,
    ray_address: str | None = None,
) -> dict[str, int]:
    """Run every job; returns summed counts (``decoded``, ``skipped``, ``present``, ``files``).

    Args:
        jobs: Decode jobs (batches of files).
        engine: ``pool`` or ``ray``.
        workers: Processes of the local pool; for Ray, the CPUs of a local instance that this
            call starts (a running cluster decides its own).
        quiet: No progress bar.
        ray_address: ``ray.init(address=...)``: ``"auto"`` or ``"ray://host:10001"`` for a
            cluster; None starts (or reuses) a local instance.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown data.engine {engine!r}; choose one of {ENGINES}")
    total = Counter(files=sum(len(j.items) for j in jobs), decoded=0, skipped=0, present=0)
    bar = tqdm(total=total["files"], desc="decode", unit="file", disable=quiet or not jobs)
    if not jobs:
        return dict(total)

    def done(job: DecodeJob, counts: dict) -> None:
        total.update(counts)
        bar.update(len(job.items))

    if engine == "ray":
        _run_ray(jobs, workers, ray_address, done)
    elif workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            futures = {pool.submit(run_job, j): j for j in jobs}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    else:
        for j in jobs:
            done(j, run_job(j))
    bar.close()
    return dict(total)


def start_ray(workers: int, address: str | None = None):
    """Connect to ``address`` (a running cluster) or start a local Ray instance of ``workers`` CPUs.

    Ray runs its workers at ``nice 15`` by default, to keep its own daemons responsive; on a busy
    machine that starves decoding (measured: 10-20x slower than the process pool next to a
    training job). A local instance started here runs them at the caller's priority
    (``RAY_worker_niceness=0`` unless set). On a cluster, set it when starting each node:
    ``RAY_worker_niceness=0 ray start ...``.
    """
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            'data.engine=ray needs Ray: pip install "clinical-moe[ray]" (or use engine pool)'
        ) from err
    if not address:
        os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs = {"address": address} if address else {"num_cpus": workers}
    ray.init(**kwargs, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ray


def _run_ray(jobs, workers, address, done) -> None:
    try:
        import ray
    except ImportError:
        ray = None
    started = False
    if ray is None or not ray.is_initialized():
        ray = start_ray(workers, address)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=2)(run_job)
        pending = {remote.remote(j): j for j in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done(
                    pending.pop(ref), ray.get(ref)
                )  # a task's error is raised here, naming the file
    finally:
        if started:
            ray.shutdown()
