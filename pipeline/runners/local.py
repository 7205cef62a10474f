"""The embedded default runner: a process pool on this machine, no services needed."""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Callable

from core.native_threads import machine_share
from pipeline.runners import RunnerOptions, Sink, StageBuilder, build_chain, run_chain, set_up
from core.stage import Row, Stage

_worker_stages: list[Stage] | None = None


def _init_worker(build: StageBuilder, config: object, threads: int) -> None:
    global _worker_stages
    _worker_stages = build_chain(build, config)
    set_up(_worker_stages, threads)


def _process(batch: list[Row]) -> list[Row]:
    assert _worker_stages is not None, "worker not initialised"
    return run_chain(_worker_stages, batch)


def batches(rows: list[Row], size: int) -> list[list[Row]]:
    size = max(1, size)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def run(rows: list[Row], build: StageBuilder, config: object, sink: Sink, *, batch_size: int,
        options: RunnerOptions = RunnerOptions(), on_batch: Callable[[list[Row]], None] | None = None) -> None:
    """Run the stage chain over ``rows``; ``sink`` gets each finished batch as soon as it is done."""
    work = batches(rows, batch_size)
    if not work:
        return
    workers = min(options.workers or os.cpu_count() or 1, len(work))
    if workers == 1:
        _init_worker(build, config, threads=machine_share(1))
        try:
            for batch in work:
                done = _process(batch)
                sink(done)
                if on_batch:
                    on_batch(done)
        finally:
            for stage in _worker_stages or []:
                stage.teardown()
        return
    threads = machine_share(workers)
    ctx = mp.get_context("spawn")  # fork after torch/OpenMP initialisation can deadlock
    with ctx.Pool(workers, initializer=_init_worker, initargs=(build, config, threads)) as pool:
        for done in pool.imap_unordered(_process, work):
            sink(done)
            if on_batch:
                on_batch(done)
