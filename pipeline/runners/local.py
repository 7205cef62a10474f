"""The embedded default runner: worker processes on this machine, no services needed.

Each worker is a spawned process that builds and sets up the stage chain once, then takes one
batch at a time over a pipe. The driver waits on the result pipes and the processes' sentinels
together, so a worker that dies (an OOM kill, a decoder segfault) is noticed at once: the rows of
the batch it held become ``failed: worker_crashed`` (retried when ``pipeline.clean`` or
``pipeline.encode`` is rerun), a fresh worker takes its place, and the run goes on. A worker that dies or raises before its set-up finished stops the run:
a broken set-up would only fail again.

Workers: ``--workers``, else one per usable core (affinity and cgroup quota), or, when a stage
runs on GPUs, one per visible GPU share, each worker seeing only its own GPU(s).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Callable

from core.native_threads import available_cpus, machine_share, visible_gpus
from core.stage import Row, Stage, mark_failed
from pipeline.runners import FailureBreaker, RunnerOptions, Sink, StageBuilder, build_chain, run_chain, set_up
from pipeline.runners.gpus import gpu_assignments, gpu_worker_count

WORKER_CRASHED = "worker_crashed"


def batches(rows: list[Row], size: int) -> list[list[Row]]:
    size = max(1, size)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _worker_main(conn, build: StageBuilder, config: object, threads: int) -> None:
    """A worker process: set up once, then batches until the driver says stop or goes away."""
    try:
        stages = build_chain(build, config)
        set_up(stages, threads)
    except BaseException:  # reported to the driver, which stops the run with this traceback
        conn.send(("setup_error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                batch = conn.recv()
            except EOFError:  # the driver is gone
                break
            if batch is None:
                break
            conn.send(("done", run_chain(stages, batch)))
    finally:
        for stage in stages:
            stage.teardown()


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """Set environment variables while the block runs (a child spawned inside inherits them: e.g.
    its CUDA_VISIBLE_DEVICES), then restore them."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Worker:
    def __init__(self, ctx, build: StageBuilder, config: object, threads: int, env: dict[str, str]):
        self.conn, child = ctx.Pipe()
        with environ(env):
            self.process = ctx.Process(target=_worker_main, args=(child, build, config, threads), daemon=True)
            self.process.start()
        child.close()
        self.env = env
        self.ready = False
        self.batch: list[Row] | None = None

    def stop(self, graceful: bool) -> None:
        """Let an idle worker tear its stages down; a busy one (the run is being stopped) is killed."""
        if graceful and self.batch is None:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _exit_description(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def crashed_rows(batch: list[Row], process) -> list[Row]:
    """The rows a dead worker held, as failures that a resume retries."""
    detail = f"{WORKER_CRASHED}: worker process {process.pid} {_exit_description(process)} during this batch"
    return [mark_failed(dict(r), detail) for r in batch]  # as handed out: no stage output yet


def plan_workers(stages: list[Stage], options: RunnerOptions, n_batches: int) -> list[dict[str, str]]:
    """One environment per worker: how many workers, and which GPUs each sees."""
    gpu_share = max((s.resources.gpus for s in stages), default=0.0)
    gpus = visible_gpus() if gpu_share > 0 else []
    if gpus:  # a model stage on GPU: one worker per GPU (or per GPU share), each pinned to its own
        workers = min(options.workers or gpu_worker_count(gpu_share, gpus), n_batches)
        return [{"CUDA_VISIBLE_DEVICES": d} for d in gpu_assignments(gpu_share, gpus, workers)]
    return [{} for _ in range(min(options.workers or available_cpus(), n_batches))]


def run(rows: list[Row], build: StageBuilder, config: object, sink: Sink, *, batch_size: int,
        options: RunnerOptions = RunnerOptions(), on_batch: Callable[[list[Row]], None] | None = None) -> None:
    """Run the stage chain over ``rows``; ``sink`` gets each finished batch as soon as it is done."""
    work = deque(batches(rows, batch_size))
    if not work:
        return
    envs = plan_workers(build_chain(build, config), options, len(work))
    threads = machine_share(len(envs))
    breaker = FailureBreaker(options, len(rows))
    ctx = mp.get_context("spawn")  # fork after torch/OpenMP initialisation can deadlock
    pool = [_Worker(ctx, build, config, threads, env) for env in envs]

    def deliver(done: list[Row]) -> None:
        sink(done)
        breaker.observe(done)
        if on_batch:
            on_batch(done)

    finished = False
    try:
        while work or any(w.batch is not None for w in pool):
            for w in pool:
                if w.ready and w.batch is None and work:
                    _hand_out(w, work)
            waiting = {w.conn: w for w in pool} | {w.process.sentinel: w for w in pool}
            for handle in wait(list(waiting)):
                w = waiting[handle]
                if handle is w.conn and w.process.is_alive():
                    _receive(w, deliver)
            for i, w in enumerate(pool):
                if not w.process.is_alive():
                    while w.conn.poll() and _receive(w, deliver):  # what it sent before it died
                        pass
                    pool[i] = _replace(ctx, w, build, config, threads, deliver)
        finished = True
    finally:
        for w in pool:
            w.stop(graceful=finished)


def _hand_out(w: _Worker, work: deque) -> None:
    w.batch = work.popleft()
    try:
        w.conn.send(w.batch)
    except OSError:  # it died just now: the batch goes back, the sentinel replaces the worker
        work.appendleft(w.batch)
        w.batch = None


def _receive(w: _Worker, deliver: Callable[[list[Row]], None]) -> bool:
    """Handle one message from a worker; False when its pipe is closed (the worker is gone)."""
    try:
        kind, payload = w.conn.recv()
    except (EOFError, OSError):  # died mid-message: handled with its sentinel
        return False
    if kind == "ready":
        w.ready = True
    elif kind == "setup_error":
        raise RuntimeError(f"a worker failed to set up its stages:\n{payload}")
    else:
        w.batch = None
        deliver(payload)
    return True


def _replace(ctx, w: _Worker, build: StageBuilder, config: object, threads: int,
             deliver: Callable[[list[Row]], None]) -> _Worker:
    """A dead worker's batch becomes failed rows; a fresh worker takes its place."""
    w.process.join()
    if not w.ready:
        raise RuntimeError(f"a worker process {_exit_description(w.process)} before its stages were set up")
    if w.batch is not None:
        deliver(crashed_rows(w.batch, w.process))
    w.conn.close()
    return _Worker(ctx, build, config, threads, w.env)
