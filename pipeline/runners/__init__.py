"""Runner adapters: wire the same engine-neutral stages onto an engine.

Every runner has the same entry point::

    run(rows, build, config, sink, workers=N, options=RunnerOptions(...))

``build(config)`` returns the stage chain (called once per worker), ``sink(rows)`` receives
finished rows (it must be picklable: the Beam runner calls it on workers). Runners hold no stage
logic; stages import no engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.stage import Row, Stage

RUNNERS = ("local", "ray", "beam")

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


def strip_private(row: Row) -> Row:
    """Drop fields that only travel between stages (``_audio_clap`` etc.)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def run_chain(stages: list[Stage], rows: list[Row]) -> list[Row]:
    """Push one batch through a set-up stage chain."""
    for stage in stages:
        rows = stage.process_batch(rows)
    return [strip_private(r) for r in rows]


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
