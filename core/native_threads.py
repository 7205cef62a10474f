"""Cap the native thread pools of a worker process to the cores the runner gave it.

NumPy's OpenBLAS (used by librosa's mel projection), OpenCV, FFmpeg's video decoder and PyTorch
each start one thread per core by default. With one worker per core those threads fight the other
workers: on 2 cores one clean worker kept 1.5-1.7 cores busy for at most 5 % more speed, and two
workers ran only 1.35-1.5x as fast as one. Capped, two workers run 1.7-2x as fast as one
(``bench/engines.py``). Every runner calls :func:`limit_native_threads` in each worker, after the
stages are set up, so the pools of libraries the set-up loaded (torch, for model stages) are
capped too.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# Read by OpenMP, OpenBLAS and MKL when they start: covers libraries loaded after the call.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


_cap: int | None = None  # set by limit_native_threads in this process


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cfs_quota_us``), or None."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or 100000)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup quota (whole cores, >= 1).

    ``os.cpu_count()`` counts the machine's cores, so a batch job given 4 of 64 cores would start 64
    workers. A fractional quota (1.5 cores) rounds down: half a core more would be oversubscribed.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API on this platform
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def visible_gpus() -> list[str]:
    """Device ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else what torch sees)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_threads() -> int | None:
    """This worker's thread cap (FFmpeg decoders read it per clip), or None outside a runner."""
    return _cap


def threads_per_worker(cpus: float) -> int:
    """Whole threads for a worker granted ``cpus`` cores (at least one)."""
    return max(1, int(cpus))


def machine_share(workers: int) -> int:
    """Threads for each of ``workers`` workers that split this machine's cores."""
    return threads_per_worker(available_cpus() / max(1, workers))


def limit_native_threads(threads: int) -> None:
    """Cap BLAS/OpenMP (already loaded or not), OpenCV, FFmpeg decoders and, if imported, PyTorch."""
    from threadpoolctl import threadpool_limits
    import cv2

    global _cap
    threads = _cap = max(1, int(threads))
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    threadpool_limits(limits=threads)
    cv2.setNumThreads(threads)
    torch = sys.modules.get("torch")  # never import torch just to cap it: CPU stages do not need it
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
