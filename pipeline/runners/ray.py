"""Ray Data runner: the same stages as ``local``, on local Ray or a Ray cluster (``--ray-address``).

Each stage becomes one ``map_batches`` step: stages that load a model (``Stage.uses_model``, or
GPU stages) run in an actor pool (``ActorPoolStrategy``, ``num_gpus``), so ``setup`` runs once per
actor; the others run as Ray tasks with ``num_cpus``, set up once per task worker process.
Finished blocks stream back to the driver (``iter_batches``), which hands each to ``sink`` as it
arrives, so a killed run keeps every batch it finished. Joining a cluster (``--ray-address``)
ships this checkout's packages to the workers (``runtime_env`` ``py_modules``), so every node runs
the driver's code; the nodes need only the third-party dependencies.

Rows travel as ``{key, row}`` where ``row`` is the row dict serialised with pickle, exactly as
the local process pool and Beam move rows between processes. Arrow columns would coerce the rows
(``None`` ints to NaN floats in pandas, variable-length audio arrays, columns that one failed row
lacks), and every runner must hand the sink the same row dicts, which the ledger then types with
its own schema. The bytes live only inside one job's object store, never on disk.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import pickle
import uuid
from typing import Callable

import pyarrow as pa

from core.native_threads import threads_per_worker
from pipeline.runners import FailureBreaker, RunnerOptions, Sink, StageBuilder, build_chain, run_stage, set_up
from core.stage import Row, Stage, drop_fields, transient_fields

_ROW = "row"
_SCHEMA = pa.schema([("key", pa.string()), (_ROW, pa.binary())])
_SHIPPED_PACKAGES = ("core", "pipeline", "filters", "augment", "shards")
BLOCKS_PER_WORKER = 4
MAX_BATCHES_PER_BLOCK = 16
# (run token, stage index) -> set-up stage, for stages that run as Ray tasks: a task worker
# process serves many tasks, so the stage is built and set up once per process, not per batch.
_task_stages: dict[tuple[str, int], Stage] = {}


def _envelope(row: Row) -> dict:
    return {"key": str(row.get("key", "")), _ROW: pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)}


def encode_rows(rows: list[Row]) -> pa.Table:
    """Row dicts to the two-column table Ray moves between steps."""
    return pa.Table.from_pylist([_envelope(r) for r in rows], schema=_SCHEMA)


def decode_rows(table: pa.Table) -> list[Row]:
    return [pickle.loads(b) for b in table.column(_ROW).to_pylist()]


def _process(stage: Stage, batch: pa.Table, drop: tuple[str, ...]) -> pa.Table:
    """``drop``: after the last stage, the chain's transient fields (decoded audio never travels back)."""
    return encode_rows(drop_fields(run_stage(stage, decode_rows(batch)), drop))


def _built_stage(build: StageBuilder, config: object, index: int) -> Stage:
    stage = build(config)[index]
    set_up([stage], threads_per_worker(stage.resources.cpus))  # the num_cpus Ray grants it
    return stage


class StageActor:
    """A model stage in an actor pool: built and set up once per actor, torn down when it exits."""

    def __init__(self, build: StageBuilder, config: object, index: int, drop: tuple[str, ...]):
        self.stage = _built_stage(build, config, index)
        self.drop = drop

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _process(self.stage, batch, self.drop)

    def __del__(self):  # Ray Data drops the UDF when the actor shuts down gracefully
        stage = getattr(self, "stage", None)
        if stage is not None:
            stage.teardown()


def stage_task(batch: pa.Table, build: StageBuilder, config: object, index: int, drop: tuple[str, ...],
               token: str) -> pa.Table:
    """A stateless stage as a Ray task; its set-up instance is cached per worker process and run."""
    stage = _task_stages.get((token, index))
    if stage is None:
        for old in [k for k in _task_stages if k[0] != token]:  # an earlier run in this process
            del _task_stages[old]
        stage = _task_stages[(token, index)] = _built_stage(build, config, index)
    return _process(stage, batch, drop)


def _map_step(ds, stage: Stage, build: StageBuilder, config: object, index: int, drop: tuple[str, ...],
              options: RunnerOptions, token: str):
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    common = dict(batch_format="pyarrow", zero_copy_batch=True, batch_size=max(1, stage.resources.batch_size),
                  num_cpus=stage.resources.cpus)
    if stage.uses_model or stage.resources.gpus > 0:
        pool = (ActorPoolStrategy(size=options.workers) if options.workers
                else ActorPoolStrategy(min_size=1, max_size=None))
        gpus = {"num_gpus": stage.resources.gpus} if stage.resources.gpus > 0 else {}
        return ds.map_batches(StageActor, fn_constructor_args=(build, config, index, drop), compute=pool,
                              **gpus, **common)
    pool = TaskPoolStrategy(size=options.workers) if options.workers else None
    return ds.map_batches(stage_task, fn_args=(build, config, index, drop, token), compute=pool, **common)


def _project_packages() -> list:
    """This project's stage packages, shipped to a cluster's workers so they run the driver's code."""
    return [importlib.import_module(name) for name in _SHIPPED_PACKAGES
            if importlib.util.find_spec(name) is not None]


def _connect(options: RunnerOptions) -> bool:
    """Join the given cluster, reuse an initialised Ray, or start local Ray; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    if options.ray_address:  # remote nodes need the third-party dependencies installed, not this checkout
        ray.init(address=options.ray_address, log_to_driver=True,
                 runtime_env={"py_modules": _project_packages()})
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


def _block_count(n_rows: int, batch_size: int, parallelism: int) -> int:
    """At least BLOCKS_PER_WORKER blocks per worker slot, none over MAX_BATCHES_PER_BLOCK batches.

    Ray Data runs one task per block: one block would run on one worker whatever the cluster
    size; one block per batch pays Ray's per-task cost (scheduling, worker lease, about 0.1-0.2 s
    between tasks) for every few clips. A few blocks per worker keeps every worker busy until the
    end and that cost small. A block's rows come back to the driver (and into the journal) only
    when the whole block is done, so the cap bounds what a killed run loses: 200k rows on two
    workers would otherwise be eight blocks of hours each.
    """
    batches = math.ceil(n_rows / max(1, batch_size))
    spread = min(batches, BLOCKS_PER_WORKER * max(1, parallelism))
    return max(1, spread, math.ceil(batches / MAX_BATCHES_PER_BLOCK))


def run(rows: list[Row], build: StageBuilder, config: object, sink: Sink, *, batch_size: int,
        options: RunnerOptions = RunnerOptions(), on_batch: Callable[[list[Row]], None] | None = None) -> None:
    """Run the stage chain over ``rows`` on Ray Data; ``sink`` gets each finished block on the driver."""
    if not rows:
        return
    import ray
    from ray.data import DataContext

    stages = build_chain(build, config)  # on the driver only to read names and resources; set up on workers
    started = _connect(options)
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI's own bar counts rows as they come back
        blocks = _block_count(len(rows), batch_size, options.workers or int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items([_envelope(r) for r in rows], override_num_blocks=blocks)
        token = uuid.uuid4().hex
        breaker = FailureBreaker(options, len(rows))
        drop = transient_fields(stages)
        for index, stage in enumerate(stages):
            ds = _map_step(ds, stage, build, config, index, drop if index == len(stages) - 1 else (), options, token)
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            done = decode_rows(table)
            if not done:
                continue
            sink(done)
            breaker.observe(done)
            if on_batch:
                on_batch(done)
    finally:
        if started:
            ray.shutdown()
