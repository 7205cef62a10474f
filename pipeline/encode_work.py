"""What ``pipeline.encode`` has to encode: ledger clips and plan recipes as work rows.

The ledger and the plan are checked before anything else happens (the columns encode reads, their
types, the plan's format), so a wrong file stops the command with one clear message. Every work
row gets a safe, unique WebDataset key and the fingerprint of everything its sample is made from:
its ledger row or recipe, the sizes of its source files and the encoder settings. A sample is
reused only under the same fingerprint (docs/formats.md, "the sample cache").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from core.fingerprint import fingerprint
from core.jsonsafe import json_safe
from core.keys import is_safe, sanitize
from core.stage import OK, PENDING, Row
from pipeline.ledger import read_ledger
from shards.encode_stage import KIND_CLIP, RECIPE_FIELDS, SAMPLE_FIELDS, SCORE_COLUMNS
from shards.shard_writer import FINGERPRINT

# ledger columns encode reads, with the kind of value each must hold
LEDGER_STRINGS = ("key", "status", "video_path", "split", "label", "caption", "source")
LEDGER_NUMBERS = ("start_s", "duration_s")
# the fields of a work row that make its sample: what the encode stages read (a ledger column no
# stage reads, such as clean's settings fingerprint or the curation scores, never forces a re-encode)
IN_SAMPLE = (*SAMPLE_FIELDS, *SCORE_COLUMNS, *RECIPE_FIELDS)


class UsageError(Exception):
    """A problem with the command line or its inputs, reported before any work starts."""


@dataclass(frozen=True)
class Work:
    """The rows to encode, the rows failed before encoding, and where they came from."""

    rows: list[Row]
    pre_failed: list[Row]
    n_ledger: int
    n_plan: int  # every recipe, valid or not
    run_meta: dict
    plan_meta: dict | None


def check_ledger(ledger: pd.DataFrame, path: Path) -> None:
    """Stop with one message when the ledger lacks a column encode reads or holds the wrong kind of value."""
    missing = [c for c in LEDGER_STRINGS + LEDGER_NUMBERS if c not in ledger.columns]
    if missing:
        raise UsageError(f"{path} is not a ledger pipeline.encode can read: missing columns {', '.join(missing)} "
                         f"(write it with python -m pipeline.clean; docs/formats.md lists the columns)")
    wrong = [c for c in LEDGER_NUMBERS if not pd.api.types.is_numeric_dtype(ledger[c])]
    wrong += [c for c in LEDGER_STRINGS if not (pd.api.types.is_string_dtype(ledger[c])
                                                or ledger[c].isna().all())]
    if wrong:
        raise UsageError(f"{path}: columns {', '.join(wrong)} hold the wrong kind of value "
                         f"({', '.join(f'{c}: {ledger[c].dtype}' for c in wrong)}); docs/formats.md lists the types")
    empty = ledger["key"].isna() | (ledger["key"].astype(str) == "")
    if empty.any():
        raise UsageError(f"{path}: {int(empty.sum())} row(s) without a key (e.g. row {int(empty.idxmax())})")


def load_ledger(path: Path) -> tuple[pd.DataFrame, dict]:
    if not path.is_file():
        raise UsageError(f"ledger {path} not found (run python -m pipeline.clean first)")
    try:
        ledger, meta = read_ledger(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"{path} is not a readable ledger: {' '.join(str(e).split())[:200]}") from e
    except ValueError as e:  # the ledger reader's own format checks name the file already
        raise UsageError(str(e)) from e
    check_ledger(ledger, path)
    if not meta and (path.parent / "run.json").is_file():
        meta = json.loads((path.parent / "run.json").read_text())
    return ledger, meta


def ledger_rows(ledger: pd.DataFrame) -> list[Row]:
    rows = []
    for rec in ledger[ledger["status"] == OK].to_dict("records"):
        row = json_safe(rec)
        row.update(kind=KIND_CLIP, status=PENDING, reason="", ledger_status=OK)
        rows.append(row)
    return rows


def plan_rows(path: Path) -> tuple[list[Row], list[Row], dict]:
    """Valid recipes as work rows, invalid ones as failed rows (with the planner's reason)."""
    from augment.recipe import PlanError, Recipe, read_plan

    try:
        plan, meta = read_plan(path)
    except PlanError as e:
        raise UsageError(str(e)) from e
    rows, bad = [], []
    for rec in plan.to_dict("records"):
        try:
            row = Recipe.from_row(rec).as_row()
        except PlanError as e:
            bad.append({"key": str(rec.get("key") or ""), "split": str(rec.get("split") or ""),
                        "reason": f"plan_error: {e}"})
            continue
        row.update(status=PENDING, reason="")
        rows.append(row)
    return rows, bad, meta


def assign_keys(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """Make every key a safe WebDataset key; a duplicate (after sanitising) fails, already-safe keys win."""
    seen: set[str] = set()
    kept, dup = [], []
    for row in sorted(rows, key=lambda r: (not is_safe(str(r["key"])), str(r["key"]), str(r.get("kind")))):
        original = str(row["key"])
        key = original if is_safe(original) else sanitize(original)
        if key in seen:
            dup.append({"key": key, "split": row.get("split") or "",
                        "reason": f"duplicate_key: {original!r} collides with an earlier sample key"})
            continue
        seen.add(key)
        if key != original:
            row["original_key"] = original
        row["key"] = key
        kept.append(row)
    return kept, dup


def collect_work(ledger_path: Path, plan_path: Path | None) -> Work:
    """Work rows (ok ledger clips + valid recipes, safe unique keys), rows failed up front, metadata."""
    ledger, run_meta = load_ledger(ledger_path)
    rows = ledger_rows(ledger)
    n_ledger = len(rows)
    pre_failed: list[Row] = []
    plan_meta = None
    if plan_path:
        recipes, bad, plan_meta = plan_rows(plan_path)
        rows += recipes
        pre_failed += bad
    n_plan = len(rows) - n_ledger + len(pre_failed)
    rows, dup = assign_keys(rows)
    for row in rows:
        row["split"] = str(row.get("split") or "train")
    return Work(rows, pre_failed + dup, n_ledger, n_plan, run_meta, plan_meta)


def _source_size(path) -> int | None:
    try:
        return os.stat(path).st_size
    except (OSError, TypeError, ValueError):
        return None


def sample_fingerprint(row: Row, settings_fingerprint: str) -> str:
    """What a sample is made from: its row (ledger row or recipe), its source files' sizes, the encoder settings.

    A source file replaced in place by one of the same size is not noticed (reading every video to
    hash it would cost a full decode); everything else that changes a sample changes this.
    """
    sample = {k: row[k] for k in IN_SAMPLE if k in row}
    paths = [row.get("video_path")] + [s.get("video_path") for s in row.get("segments") or []]
    sizes = [_source_size(p) for p in paths if p]
    return fingerprint({"sample": sample, "source_bytes": sizes, "encoder": settings_fingerprint})


def fingerprint_rows(rows: list[Row], settings: dict) -> dict[str, str]:
    """Set every work row's fingerprint; returns key -> fingerprint."""
    settings_fp = fingerprint(settings)
    for row in rows:
        row[FINGERPRINT] = sample_fingerprint(row, settings_fp)
    return {row["key"]: row[FINGERPRINT] for row in rows}
