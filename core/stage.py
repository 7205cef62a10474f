"""The engine-neutral stage interface every runner (local, Ray, Beam) drives.

A stage turns a batch of row dicts into a batch of row dicts. Per-row failures never raise out
of ``process_batch``: the row comes back with ``status="failed"`` and a reason. Rows that arrive
already decided (``status`` set by the manifest, e.g. ``missing_file``) pass through untouched.

Each stage declares the row fields it ``reads`` and ``writes`` (``status`` and ``reason`` are
every stage's to set). Fields it writes only for a later stage of the chain (decoded audio,
frames) are also ``transient``: runners drop them at the end of the chain, so they never reach
the ledger or a shard. ``check_chain`` proves at start-up that every transient field is
written before it is read (docs/architecture.md).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

Row = dict[str, Any]

OK = "ok"
FILTERED = "filtered"
FAILED = "failed"
PENDING = ""  # not decided yet: the scoring stage will decide


@dataclass(frozen=True)
class Resources:
    """What one worker of this stage needs; runners map this onto their own scheduling."""

    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 1


class Stage(ABC):
    """Plain-Python processing step: ``setup`` once per worker, then batches, then ``teardown``."""

    name: str = "stage"
    resources: Resources = Resources()
    uses_model: bool = False  # True: setup() loads a model, so engines keep long-lived workers (actors)
    reads: tuple[str, ...] = ()  # row fields process_batch uses (status and reason aside)
    writes: tuple[str, ...] = ()  # row fields it may set (status and reason aside)
    transient: tuple[str, ...] = ()  # of ``writes``, those only later stages use: dropped after the chain

    def setup(self) -> None:
        """Load models or other per-worker state. Called once per worker, never per batch."""

    @abstractmethod
    def process_batch(self, rows: list[Row]) -> list[Row]:
        """Return one output row per input row (same keys), failures recorded in the row."""

    def teardown(self) -> None:
        """Release per-worker state."""


ALWAYS_WRITTEN = ("status", "reason")


class ChainError(ValueError):
    """A stage chain whose declared fields do not fit together."""


def check_chain(stages: Sequence[Stage]) -> None:
    """Raise ``ChainError`` unless the stages' declared fields fit together: each transient field
    is one its stage writes, and a stage reads a transient field only after an earlier stage wrote
    it. (Input fields may be optional, e.g. scores or recipe fields, so they are not checked here.)
    """
    transient = set(transient_fields(stages))
    have: set[str] = set()
    for stage in stages:
        stray = sorted(set(stage.transient) - set(stage.writes))
        if stray:
            raise ChainError(f"stage {stage.name} declares transient fields it does not write: {', '.join(stray)}")
        missing = sorted(set(stage.reads) & transient - have)
        if missing:
            raise ChainError(f"stage {stage.name} reads {', '.join(missing)} before any earlier stage writes it")
        have |= set(stage.writes)


def transient_fields(stages: Iterable[Stage]) -> tuple[str, ...]:
    """Every field some stage of the chain writes for a later one only."""
    return tuple(sorted({f for stage in stages for f in stage.transient}))


def drop_fields(rows: list[Row], fields: Sequence[str]) -> list[Row]:
    """The rows without ``fields`` (the chain's transient ones), ready for the ledger or a shard."""
    if not fields:
        return rows
    return [{k: v for k, v in row.items() if k not in fields} for row in rows]


def is_pending(row: Row) -> bool:
    return not row.get("status")


def mark_failed(row: Row, reason: str) -> Row:
    row["status"] = FAILED
    row["reason"] = reason
    return row
