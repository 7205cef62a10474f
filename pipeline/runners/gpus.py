"""Which GPU each runner worker sees: one worker per visible GPU (or per GPU share), each pinned.

The local runner sets ``CUDA_VISIBLE_DEVICES`` in the environment it spawns each worker with. Beam
starts its SDK worker processes itself, so a Beam worker pins itself in ``DoFn.setup``, before any
stage touches CUDA: it claims the lowest free worker slot under a folder of lock files (``flock``
on ``slot-N``, held while the process lives, so a dead worker's slot is taken by its replacement)
and sets its own ``CUDA_VISIBLE_DEVICES`` to that slot's GPU(s). Every DoFn of one process shares
the process's slot. CUDA reads the variable when it initialises, so pinning after CUDA started in
that process is impossible and is reported.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

MAX_SLOTS = 4096
_claimed: dict[str, tuple[int, int]] = {}  # slot folder -> (slot index, lock file descriptor) of this process
_claim_lock = threading.Lock()


def gpu_worker_count(gpu_share: float, gpus: list[str]) -> int:
    """Default workers for a stage that needs ``gpu_share`` GPUs each: one per GPU (or per share)."""
    return max(1, int(len(gpus) / gpu_share))


def gpu_assignments(gpu_share: float, gpus: list[str], workers: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each of ``workers`` workers, spread over ``gpus``."""
    if gpu_share >= 1:
        per = int(gpu_share)
        return [",".join(gpus[(i * per + j) % len(gpus)] for j in range(per)) for i in range(workers)]
    return [gpus[int(i * gpu_share) % len(gpus)] for i in range(workers)]


def claim_slot(folder: str) -> int:
    """This process's worker slot under ``folder``: the lowest index no live process holds."""
    with _claim_lock:
        if folder in _claimed:
            return _claimed[folder][0]
        os.makedirs(folder, exist_ok=True)
        for index in range(MAX_SLOTS):
            fd = os.open(os.path.join(folder, f"slot-{index}"), os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live worker holds it
                os.close(fd)
                continue
            _claimed[folder] = (index, fd)  # held (never closed) while this process lives
            return index
    raise RuntimeError(f"more than {MAX_SLOTS} workers claimed a GPU slot under {folder}")


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def pin_worker(folder: str, assignments: list[str]) -> str | None:
    """Pin this worker process to its slot's GPU(s); returns its ``CUDA_VISIBLE_DEVICES``."""
    if not assignments:
        return None
    devices = assignments[claim_slot(folder) % len(assignments)]
    if os.environ.get("CUDA_VISIBLE_DEVICES") == devices:
        return devices
    if _cuda_started():
        log.warning("CUDA was initialised in worker %d before it could be pinned to GPU %s; it uses %s",
                    os.getpid(), devices, os.environ.get("CUDA_VISIBLE_DEVICES", "every GPU"))
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    return devices
