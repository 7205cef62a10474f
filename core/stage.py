"""The engine-neutral stage interface every runner (local, Ray, Beam) drives.

A stage turns a batch of row dicts into a batch of row dicts. Per-row failures never raise out
of ``process_batch``: the row comes back with ``status="failed"`` and a reason. Rows that arrive
already decided (``status`` set by the manifest, e.g. ``missing_file``) pass through untouched.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

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

    def setup(self) -> None:
        """Load models or other per-worker state. Called once per worker, never per batch."""

    @abstractmethod
    def process_batch(self, rows: list[Row]) -> list[Row]:
        """Return one output row per input row (same keys), failures recorded in the row."""

    def teardown(self) -> None:
        """Release per-worker state."""


def is_pending(row: Row) -> bool:
    return not row.get("status")


def mark_failed(row: Row, reason: str) -> Row:
    row["status"] = FAILED
    row["reason"] = reason
    return row
