"""Runner adapters: wire the same engine-neutral stages onto an engine.

Every runner has the same entry point::

    run(rows, build, config, sink, workers=N, options=RunnerOptions(...))

``build(config)`` returns the stage chain (called once per worker), ``sink(rows)`` receives
finished rows (it must be picklable: the Beam runner calls it on workers). Runners hold no stage
logic; stages import no engine.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Callable

from core.cli_config import check_count, check_finite
from core.native_threads import limit_native_threads
from core.stage import Row, Stage, check_chain, drop_fields, mark_failed, transient_fields
from pipeline.runners.faults import inject_faults

RUNNERS = ("local", "ray", "beam")
_log = logging.getLogger(__name__)

StageBuilder = Callable[[object], list[Stage]]
Sink = Callable[[list[Row]], None]


@dataclass(frozen=True)
class RunnerOptions:
    """Engine settings shared by the CLIs (``--runner``, ``--workers``, Ray and Beam options)."""

    runner: str = field(default="local", metadata={"help": "execution engine", "choices": RUNNERS})
    workers: int = field(default=0, metadata={"help": "parallel workers (0: one per CPU core)"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (empty: start local Ray)"})
    beam_runner: str = field(default="", metadata={"help": "Beam runner (empty: in-process FnApiRunner)"})
    beam_option: tuple[str, ...] = field(
        default=(), metadata={"help": "Beam pipeline options key=value, comma-separated"}
    )
    max_error_share: float = field(default=0.5, metadata={
        "help": "stop the run when more than this share of the first --error-window rows are stage_error "
                "(a systematic bug, not a bad file); 1 disables"})
    error_window: int = field(default=64, metadata={"help": "rows the --max-error-share breaker watches"})

    def __post_init__(self) -> None:
        check_count("workers", self.workers)
        check_finite("max_error_share", self.max_error_share, lo=0.0, hi=1.0)
        check_count("error_window", self.error_window, minimum=1)


TRACEBACK = "error_traceback"  # the traceback of a stage_error row, for the breaker; never journaled
STAGE_ERROR = "stage_error"


class FailureRateExceeded(RuntimeError):
    """Too many rows failed with an unexpected error early on: a systematic bug, not bad files."""


class FailureBreaker:
    """Stops a run when more than ``max_error_share`` of its first ``error_window`` finished rows
    (or of all its rows, for a shorter run) are ``stage_error`` rows, with the first traceback.

    Runners call :meth:`observe` on each finished batch on the driver, after the sink journaled it
    (those rows are retried on resume, once the bug is fixed). ``max_error_share`` 1 never trips.
    """

    def __init__(self, options: "RunnerOptions", total_rows: int):
        self.window = max(1, min(options.error_window, total_rows))
        self.share = options.max_error_share
        self.seen = self.errors = 0
        self.first: tuple[str, str] | None = None  # (reason, traceback) of the first stage_error

    def observe(self, rows: list[Row]) -> None:
        for row in rows:
            tb = row.pop(TRACEBACK, None)
            if self.seen >= self.window:
                continue
            self.seen += 1
            if str(row.get("reason", "")).startswith(STAGE_ERROR):
                self.errors += 1
                if self.first is None:
                    self.first = (str(row.get("reason")), tb or "")
        if self.errors > self.share * self.window:
            reason, tb = self.first or ("", "")
            raise FailureRateExceeded(
                f"stopped: {self.errors} of the first {self.seen} rows failed with stage_error (more than "
                f"{self.share:g} of {self.window}); this looks like a bug or a broken set-up, not bad input. "
                f"First error: {reason}\n{tb}".rstrip()
                + "\nThese rows are recorded as failed; a rerun retries them once the cause is fixed "
                  "(--max-error-share 1 disables this check).")


def stage_error_reason(stage: Stage, error: Exception) -> str:
    """Ledger reason for an exception a stage did not turn into a failed row itself."""
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    return f"stage_error: {stage.name}: {type(error).__name__}" + (f": {detail}" if detail else "")


def build_chain(build: StageBuilder, config: object) -> list[Stage]:
    """The stage chain, its declared fields checked (``core.stage.check_chain``) before any row runs."""
    stages = build(config)
    check_chain(stages)
    return stages


def set_up(stages: list[Stage], threads: int) -> None:
    """Set up a worker's stages, then cap its native thread pools to the ``threads`` cores it owns."""
    for stage in stages:
        stage.setup()
    limit_native_threads(threads)


def run_stage(stage: Stage, rows: list[Row]) -> list[Row]:
    """One set-up stage over one batch; a row whose processing raises fails alone.

    Stages record expected per-row failures themselves; this is the backstop for the unexpected
    (a library error on one odd file). The batch is retried row by row from copies taken before
    the call, so only the rows that raise become ``failed`` rows and their neighbours are kept,
    identically under every runner (engine-level error handling would drop or fail whole batches).
    """
    before = [dict(r) for r in rows]
    try:
        inject_faults(stage.name, rows)
        return stage.process_batch(rows)
    except Exception as batch_error:  # isolation boundary: one bad row must not lose its batch
        if len(before) == 1:
            return [_stage_failed(stage, before[0], batch_error)]
    out: list[Row] = []
    for row in before:
        try:
            inject_faults(stage.name, [row])
            out.extend(stage.process_batch([dict(row)]))
        except Exception as e:  # same boundary, now for exactly one row
            out.append(_stage_failed(stage, row, e))
    return out


def _stage_failed(stage: Stage, row: Row, error: Exception) -> Row:
    _log.warning("stage %s failed on %s", stage.name, row.get("key"), exc_info=error)
    mark_failed(row, stage_error_reason(stage, error))
    row[TRACEBACK] = "".join(traceback.format_exception(error))[-4000:]
    return row


def run_chain(stages: list[Stage], rows: list[Row]) -> list[Row]:
    """Push one batch through a set-up stage chain."""
    for stage in stages:
        rows = run_stage(stage, rows)
    return drop_fields(rows, transient_fields(stages))


def get_runner(name: str):
    """The ``run`` function of a runner, imported lazily so unused engines need not be installed."""
    if name == "local":
        from pipeline.runners.local import run
    elif name == "ray":
        from pipeline.runners.ray import run
    elif name == "beam":
        from pipeline.runners.beam import run
    else:
        raise ValueError(f"unknown runner {name!r}; choose one of {', '.join(RUNNERS)}")
    return run
