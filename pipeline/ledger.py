"""The ledger: one row per input item, written so that nothing is ever lost.

Scored rows are appended to a journal (``OUT/ledger.parts/part-*.parquet``), each part written
under a temporary name and renamed, so a run killed at any moment loses at most the batch in
flight. ``finalize`` merges the journal, re-applies the thresholds to the stored scores ("score
once, filter many") and writes ``OUT/ledger.parquet`` atomically. A rerun with the same output
folder skips every key already in the journal.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_write_table, atomic_write_text
from core.stage import Row

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("youtube_id", pa.string()),
    ("video_path", pa.string()),
    ("label", pa.string()),
    ("caption", pa.string()),
    ("split", pa.string()),
    ("start_s", pa.float64()),
    ("duration_s", pa.float64()),
    ("video_fps", pa.float64()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("clap_score", pa.float64()),
    ("av_align", pa.float64()),
    ("audio_peaks", pa.int32()),
    ("video_peaks", pa.int32()),
    ("speech_score", pa.float64()),
    ("music_score", pa.float64()),
    ("event_score", pa.float64()),
    ("speech_share", pa.float64()),
    ("speech_run_s", pa.float64()),
    ("peak_db", pa.float64()),
    ("rms_db", pa.float64()),
    ("silent_share", pa.float64()),
    ("scene_cuts", pa.list_(pa.float64())),
    ("motion_max", pa.float64()),
    ("motion_mean", pa.float64()),
    # AV-Align of each published revision (av_align / video_peaks above are the selected one's)
    ("av_align_2025", pa.float64()),
    ("av_align_2023", pa.float64()),
    ("video_peaks_2025", pa.int32()),
    ("video_peaks_2023", pa.int32()),
    ("line", pa.int64()),
])
COLUMNS = SCHEMA.names
# failures worth retrying on resume: a hung decode or an unexpected error may not repeat
RETRYABLE = ("decode_timeout", "stage_error")
_STRING_COLUMNS = {f.name for f in SCHEMA if pa.types.is_string(f.type)}


def to_table(rows: Iterable[Row]) -> pa.Table:
    """Rows (dicts) to an Arrow table with the ledger schema; extra keys are dropped."""
    cols: dict[str, list] = {name: [] for name in COLUMNS}
    for row in rows:
        for name in COLUMNS:
            value = row.get(name)
            if name in _STRING_COLUMNS and value is None:
                value = ""
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


class Ledger:
    """Journal of scored rows under ``out_dir`` plus the finalized ``ledger.parquet``."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / "ledger.parts"
        self.path = self.out_dir / "ledger.parquet"
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet"))

    def read_journal(self) -> pd.DataFrame:
        parts = self._parts()
        if not parts:
            return to_table([]).to_pandas()
        table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in parts])
        df = table.to_pandas()
        # a key journaled twice (two runs racing, or a resumed batch) keeps its last record
        return df.drop_duplicates("key", keep="last").reset_index(drop=True)

    def done_keys(self, retry_reasons: tuple[str, ...] = RETRYABLE) -> set[str]:
        """Keys a rerun skips: every journaled key except failures that may pass on a retry."""
        done: set[str] = set()
        for p in self._parts():
            table = pq.read_table(p, columns=["key", "status", "reason"]).to_pydict()
            for key, status, reason in zip(table["key"], table["status"], table["reason"]):
                if status == "failed" and reason.startswith(retry_reasons):
                    done.discard(key)
                else:
                    done.add(key)
        return done

    def append(self, rows: list[Row]) -> None:
        if not rows:
            return
        name = f"part-{pd.Timestamp.now('UTC').strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_table(to_table(rows), self.parts_dir / name)

    def write_final(self, df: pd.DataFrame, meta: dict) -> Path:
        """Write ``ledger.parquet`` (sorted by key) with the run metadata, plus ``run.json``."""
        df = df.sort_values("key", kind="stable").reset_index(drop=True)
        # a column no stage of this run produced (an older journal, a hand-built frame) is missing, not made up
        df = df.assign(**{c: pd.Series([None] * len(df), index=df.index, dtype=object) for c in COLUMNS if c not in df})
        table = pa.Table.from_pandas(df[COLUMNS], schema=SCHEMA, preserve_index=False)
        table = table.replace_schema_metadata({b"v2a_run": json.dumps(meta, sort_keys=True).encode()})
        atomic_write_table(table, self.path)
        atomic_write_text(self.out_dir / "run.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return self.path


def read_ledger(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a finalized ledger and its run metadata."""
    table = pq.read_table(path)
    meta_raw = (table.schema.metadata or {}).get(b"v2a_run")
    return table.to_pandas(), (json.loads(meta_raw) if meta_raw else {})
