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

import os
import sys

# Read by OpenMP, OpenBLAS and MKL when they start: covers libraries loaded after the call.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


_cap: int | None = None  # set by limit_native_threads in this process


def worker_threads() -> int | None:
    """This worker's thread cap (FFmpeg decoders read it per clip), or None outside a runner."""
    return _cap


def threads_per_worker(cpus: float) -> int:
    """Whole threads for a worker granted ``cpus`` cores (at least one)."""
    return max(1, int(cpus))


def machine_share(workers: int) -> int:
    """Threads for each of ``workers`` workers that split this machine's cores."""
    return threads_per_worker((os.cpu_count() or 1) / max(1, workers))


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
