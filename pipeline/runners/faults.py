"""Fault injection for tests and drills: make a stage fail on chosen rows, under any runner.

``V2A_INJECT_FAULT=STAGE:KEY[:ACTION][,...]`` (docs/testing.md): before a stage processes a batch,
each row whose key matches the glob ``KEY`` in a stage named ``STAGE`` (``*`` for any stage)
either raises :class:`InjectedFault` (``raise``, the default: the row becomes a ``stage_error``
row, as an unexpected library error would make it) or SIGKILLs the worker process (``kill``: what
an OOM kill or a decoder segfault does; only the local runner's workers are separate processes, so
use it there). Workers inherit the variable from the command's environment, so a run with it set
fails exactly those rows and a rerun without it is a run in which the fault has gone away: this is
how the tests prove that retryable failures are retried. Unset (always, in production), it costs
one environment lookup per batch.
"""
from __future__ import annotations

import os
import signal
from fnmatch import fnmatchcase

from core.stage import Row

FAULT_ENV = "V2A_INJECT_FAULT"
ACTIONS = ("raise", "kill")


class InjectedFault(RuntimeError):
    """The failure ``V2A_INJECT_FAULT`` asked for."""


def parse_faults(spec: str) -> list[tuple[str, str, str]]:
    """``STAGE:KEY[:ACTION]`` items as (stage glob, key glob, action); a malformed item is an error."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ValueError(f"{FAULT_ENV} item {item!r}: expected STAGE:KEY[:raise|kill]")
        action = parts[2] if len(parts) == 3 else "raise"
        if action not in ACTIONS:
            raise ValueError(f"{FAULT_ENV} item {item!r}: action must be one of {', '.join(ACTIONS)}")
        faults.append((parts[0], parts[1], action))
    return faults


def inject_faults(stage_name: str, rows: list[Row]) -> None:
    """Raise or die as ``V2A_INJECT_FAULT`` asks for the first matching row of this batch."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for stage_glob, key_glob, action in parse_faults(spec):
        if not fnmatchcase(stage_name, stage_glob):
            continue
        for row in rows:
            key = str(row.get("key", ""))
            if fnmatchcase(key, key_glob):
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise InjectedFault(f"{FAULT_ENV} {stage_glob}:{key_glob} matched {key}")
