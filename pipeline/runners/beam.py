"""Apache Beam runner: the same stages as ``local``, on Beam's portable runners.

Locally the pipeline runs on the in-process FnApiRunner with ``--workers`` SDK worker processes
(never Beam's default runner, which downloads the Prism binary). ``--beam-runner`` (FlinkRunner,
SparkRunner, DataflowRunner, ...) and ``--beam-option key=value`` pass through to Beam unchanged.

Each stage is one ``ParDo`` whose ``DoFn.setup`` builds and sets up the stage once per DoFn
instance (Beam reuses instances across bundles), so models load once per worker. When a stage
runs on GPU, the local FnApiRunner starts one SDK worker per visible GPU (or GPU share, as the
local runner), and each worker process pins itself to its own GPU in ``setup`` before anything
loads (``GpuPinning``); on a remote runner, workers of one node spread over the GPUs their
environment names. Per-row
failures become rows inside the DoFn (``run_stage``): an element here is a whole batch, so
Beam's own error outputs would fail every row of it. Finished batches go to ``sink`` on the
workers (the ledger journal is picklable and writes atomic parts on a shared filesystem).

With ``--beam-option temp_location=DIR`` (a shared path: local, ``gs://``, ``hdfs://``) the rows
are staged there as JSON lines and read by the workers instead of being embedded in the job
graph, which is what remote runners need for large manifests.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.jsonsafe import json_safe
from core.native_threads import available_cpus, machine_share, threads_per_worker, visible_gpus
from pipeline.runners import FailureBreaker, RunnerOptions, Sink, StageBuilder, build_chain, run_stage, set_up
from pipeline.runners.gpus import gpu_assignments, gpu_worker_count, pin_worker
from pipeline.runners.local import batches
from core.stage import Row, Stage, drop_fields, transient_fields

METRICS_NAMESPACE = "v2a"


def beam_flags(options: RunnerOptions, default_workers: int = 0) -> list[str]:
    """``--beam-option`` items as Beam command-line flags; local defaults for the FnApiRunner
    (``default_workers``, else one SDK worker per usable core, unless ``--workers`` says)."""
    flags: list[str] = []
    given: set[str] = set()
    for item in options.beam_option:
        key, sep, value = item.strip().lstrip("-").partition("=")
        if not key:
            raise ValueError(f"--beam-option {item!r}: expected key=value")
        given.add(key)
        flags.append(f"--{key}={value}" if sep else f"--{key}")
    if not options.beam_runner:  # the in-process FnApiRunner: real parallel workers, no services
        if "direct_num_workers" not in given:
            flags.append(f"--direct_num_workers={options.workers or default_workers or available_cpus()}")
        if "direct_running_mode" not in given:
            flags.append("--direct_running_mode=multi_processing")
    return flags


def _worker_threads(stage: Stage, options: RunnerOptions, pipeline_options) -> int:
    """Cores per SDK worker: this machine's share locally, the stage's declared CPUs on a cluster."""
    if options.beam_runner:
        return threads_per_worker(stage.resources.cpus)
    return machine_share(pipeline_options.get_all_options().get("direct_num_workers") or 1)


def _this_process() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


@dataclass(frozen=True)
class GpuPinning:
    """How SDK worker processes pin themselves to GPUs (``pipeline.runners.gpus``).

    Locally the driver knows the GPUs and hands every worker slot its own. On a remote runner a
    worker spreads over the GPUs its own environment names in ``CUDA_VISIBLE_DEVICES`` (several
    SDK processes of one node, e.g. a Flink worker pool), slots counted per node; a worker whose
    environment names none or one is left as its runner started it.
    """

    token: str  # names the node-local folder of the slot lock files: one per run
    share: float  # GPUs per worker the stages declare
    assignments: tuple[str, ...]  # locally: CUDA_VISIBLE_DEVICES of worker slot 0, 1, ...; remote: ()
    driver: tuple[str, int]  # DoFns running inside the driver (in-memory or threaded mode) never pin

    @property
    def slots(self) -> str:
        return os.path.join(tempfile.gettempdir(), f"v2a-beam-gpus-{self.token}")

    def pin(self) -> str | None:
        if _this_process() == self.driver:
            return None
        assignments = list(self.assignments)
        if not assignments:
            own = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if len(own) < 2 or own[0] == "-1":
                return None
            assignments = gpu_assignments(self.share, own, gpu_worker_count(self.share, own))
        return pin_worker(self.slots, assignments)


def gpu_pinning(stages: list[Stage], options: RunnerOptions) -> tuple[GpuPinning | None, int]:
    """Pinning for a run whose stages use GPUs, and the local default SDK worker count (one per
    GPU or GPU share, as the local runner); (None, 0) when no stage uses a GPU or none is visible."""
    share = max((s.resources.gpus for s in stages), default=0.0)
    if share <= 0:
        return None, 0
    token = uuid.uuid4().hex
    if options.beam_runner:  # the workers' GPUs are not the driver's: each worker looks at its own
        return GpuPinning(token, share, (), _this_process()), 0
    gpus = visible_gpus()
    if not gpus:
        return None, 0
    default = gpu_worker_count(share, gpus)
    assignments = tuple(gpu_assignments(share, gpus, options.workers or default))
    return GpuPinning(token, share, assignments, _this_process()), default


def _stage_dofn(build: StageBuilder, config: object, index: int, drop: tuple[str, ...], threads: int,
                pinning: GpuPinning | None = None):
    import apache_beam as beam

    class StageFn(beam.DoFn):
        def __init__(self):
            super().__init__()
            self.build, self.config, self.index, self.drop = build, config, index, drop
            self.threads, self.pinning = threads, pinning
            self.stage = None

        def setup(self):
            if self.pinning is not None:  # before the stage loads anything onto a GPU
                self.pinning.pin()
            self.stage = self.build(self.config)[self.index]
            set_up([self.stage], self.threads)

        def process(self, batch: list[Row]):
            rows = run_stage(self.stage, list(batch))
            yield drop_fields(rows, self.drop)

        def teardown(self):
            if self.stage is not None:
                self.stage.teardown()

    return StageFn()


def _sink_dofn(sink: Sink, progress_dir: str):
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    class SinkFn(beam.DoFn):
        """Journal a finished batch on the worker; count it; tell a driver on this machine."""

        def __init__(self):
            super().__init__()
            self.sink, self.progress_dir = sink, progress_dir

        def process(self, rows: list[Row]):
            self.sink(rows)
            for row in rows:
                Metrics.counter(METRICS_NAMESPACE, f"rows_{row.get('status') or 'pending'}").inc()
            if self.progress_dir and os.path.isdir(self.progress_dir):
                _write_progress(Path(self.progress_dir), rows)

    return SinkFn()


def _write_progress(folder: Path, rows: list[Row]) -> None:
    name = uuid.uuid4().hex
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, folder / f"{name}.done")


def _drain_progress(folder: Path, on_batch: Callable[[list[Row]], None]) -> None:
    for path in sorted(folder.glob("*.done")):
        rows = pickle.loads(path.read_bytes())  # written by this run's own workers just now
        path.unlink()
        on_batch(rows)


def _stage_input(rows: list[Row], batch_size: int, temp_location: str) -> str:
    """Write the batches as JSON lines under ``temp_location`` so workers read them there."""
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(temp_location, f"v2a-input-{uuid.uuid4().hex}.jsonl")
    with FileSystems.create(path) as f:
        for batch in batches(rows, batch_size):
            f.write(json.dumps(json_safe(batch, keep_nan=True)).encode() + b"\n")
    return path


def run(rows: list[Row], build: StageBuilder, config: object, sink: Sink, *, batch_size: int,
        options: RunnerOptions = RunnerOptions(), on_batch: Callable[[list[Row]], None] | None = None) -> None:
    """Run the stage chain over ``rows`` as a Beam pipeline; ``sink`` runs on the workers.

    ``on_batch`` is called on the driver, in this thread, for batches finished by workers on this
    machine (the local FnApiRunner); on a remote runner progress shows in that runner's UI. The
    failure-rate breaker watches the same batches, so it acts on local runs only.
    """
    if not rows:
        return
    if on_batch is not None:
        breaker, shown = FailureBreaker(options, len(rows)), on_batch

        def on_batch(done: list[Row]) -> None:
            breaker.observe(done)
            shown(done)

    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    stages = build_chain(build, config)  # on the driver only to name the steps; set up in DoFn.setup
    pinning, default_workers = gpu_pinning(stages, options)
    pipeline_options = PipelineOptions(beam_flags(options, default_workers))
    temp_location = pipeline_options.get_all_options().get("temp_location") or ""
    progress_dir = tempfile.mkdtemp(prefix="v2a-beam-progress-") if on_batch else ""
    staged = _stage_input(rows, batch_size, temp_location) if temp_location else ""
    if staged:
        print(f"beam: {len(rows)} rows staged in {staged} for the workers", file=sys.stderr, flush=True)
    try:
        pipeline = beam.Pipeline(runner=options.beam_runner or FnApiRunner(), options=pipeline_options)
        if staged:
            pcoll = (pipeline | "read rows" >> beam.io.ReadFromText(staged) | "parse" >> beam.Map(json.loads)
                     | "spread" >> beam.Reshuffle())
        else:
            pcoll = pipeline | "rows" >> beam.Create(batches(rows, batch_size))  # Create reshuffles itself
        drop = transient_fields(stages)
        for index, stage in enumerate(stages):
            pcoll = pcoll | f"{index}:{stage.name}" >> beam.ParDo(
                _stage_dofn(build, config, index, drop if index == len(stages) - 1 else (),
                            _worker_threads(stage, options, pipeline_options), pinning))
        pcoll | "sink" >> beam.ParDo(_sink_dofn(sink, progress_dir))
        _run_with_progress(pipeline, Path(progress_dir) if progress_dir else None, on_batch)
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
        if pinning is not None:
            shutil.rmtree(pinning.slots, ignore_errors=True)
        if staged:
            FileSystems.delete([staged])


def _run_with_progress(pipeline, progress_dir: Path | None, on_batch) -> None:
    """Run the pipeline in a thread while this thread hands finished batches to ``on_batch``."""
    outcome: dict[str, BaseException] = {}

    def execute() -> None:
        try:
            pipeline.run().wait_until_finish()
        except BaseException as e:  # re-raised in the calling thread below
            outcome["error"] = e

    worker = threading.Thread(target=execute, name="beam-pipeline", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=0.5)
        if progress_dir is not None:
            _drain_progress(progress_dir, on_batch)
    if progress_dir is not None:
        _drain_progress(progress_dir, on_batch)
    if "error" in outcome:
        raise outcome["error"]
