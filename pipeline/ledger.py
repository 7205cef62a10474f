"""The ledger: one row per input item, written so that nothing is ever lost or silently mixed.

Scored rows are appended to a journal (``OUT/ledger.parts/part-RUN-SEQ-TOKEN.parquet``), each part
written atomically and durably (``core.atomic``: fsync of the file and its folder), so a run killed
at any moment, even by a power loss, loses at most the batch in flight. "Last record wins" follows
the per-run sequence in the part names (run number, then the writer's own sequence), never wall
clocks, so clock skew between workers cannot keep a stale record. A part that cannot be read (a
torn or empty file) is set aside as ``*.corrupt`` with a warning and its rows are recomputed.

Parts are compacted into one (at finalize, and every ``COMPACT_EVERY`` parts during a long run),
so a resume of 200k rows reads one file, not 25k. ``finalize`` re-applies the thresholds to the
stored scores ("score once, filter many") and writes ``OUT/ledger.parquet`` atomically with its
format version; :func:`read_ledger` checks that version and the columns before anyone uses it.
Every row carries ``settings_fp``, the fingerprint of the scoring settings that produced it
(``core.fingerprint``), so a rerun with other settings can refuse to mix them.
"""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_write_table, atomic_write_text
from core.stage import FAILED, Row
from filters.curation import SPLIT_REASON

LEDGER_FORMAT = "v2a-ledger/1"
COMPACT_EVERY = 512  # parts a driver appends between two compactions
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
    # audiobox-aesthetics axes (1-10; missing unless --aes-model is given)
    ("aes_ce", pa.float64()),
    ("aes_cu", pa.float64()),
    ("aes_pc", pa.float64()),
    ("aes_pq", pa.float64()),
    # AV-Align of each published revision (av_align / video_peaks above are the selected one's)
    ("av_align_2025", pa.float64()),
    ("av_align_2023", pa.float64()),
    ("video_peaks_2025", pa.int32()),
    ("video_peaks_2023", pa.int32()),
    # DeSync (pipeline.clean --desync-max / --desync-score): mean |offset| s, and the two offsets
    ("desync", pa.float64()),
    ("desync_first_s", pa.float64()),
    ("desync_last_s", pa.float64()),
    ("line", pa.int64()),
    ("settings_fp", pa.string()),
    # a part of a window split at its scene cuts (--split-at-cuts): the window's key, else ""
    ("parent_key", pa.string()),
])
COLUMNS = SCHEMA.names
# failures worth retrying on resume: a hung decode or an unexpected error may not repeat
RETRYABLE = ("decode_timeout", "stage_error", "worker_crashed")
# decided by the manifest on every run (a file may have appeared since): never skipped on resume
MANIFEST_REASONS = ("missing_file", "bad_csv_row", "bad_manifest_row", "duplicate_id", "test_leak")
# what every ledger since the first version holds; readers needing more pass ``required``
CORE_COLUMNS = ("key", "source", "video_path", "label", "caption", "split", "start_s", "duration_s", "status",
                "reason")
SCAN_COLUMNS = ["key", "status", "reason", "settings_fp", "parent_key"]
_PART = re.compile(r"^part-(\d{6})-(\d{9})-([A-Za-z0-9]+)\.parquet$")
_STRING_COLUMNS = {f.name for f in SCHEMA if pa.types.is_string(f.type)}


def to_table(rows: Iterable[Row], settings_fp: str = "") -> pa.Table:
    """Rows (dicts) to an Arrow table with the ledger schema; extra keys are dropped."""
    cols: dict[str, list] = {name: [] for name in COLUMNS}
    for row in rows:
        for name in COLUMNS:
            value = row.get(name)
            if name == "settings_fp" and not value:
                value = settings_fp
            if name in _STRING_COLUMNS and value is None:
                value = ""
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def redone(scan: pd.DataFrame, reasons: tuple[str, ...] = RETRYABLE) -> pd.Series:
    """Mask of a journal scan: failures whose reason starts with one of ``reasons``, which a rerun
    redoes whatever its settings."""
    return (scan["status"] == FAILED) & scan["reason"].str.startswith(reasons)


def done_keys(scan: pd.DataFrame, retry_reasons: tuple[str, ...] = RETRYABLE,
              settings_fp: str | None = None) -> set[str]:
    """Keys of a journal scan that a rerun skips: journaled, not ``redone``, and (when
    ``settings_fp`` is given) made with those settings."""
    skip = redone(scan, retry_reasons)
    if settings_fp is not None:
        skip |= scan["settings_fp"] != settings_fp
    return set(scan.loc[~skip, "key"])


def _order(path: Path) -> tuple:
    """Journal order: run number, then sequence, then writer token; old timestamp names first."""
    m = _PART.match(path.name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else (-1, 0, path.name)


def set_aside(path: Path, problem: str) -> Path:
    """Rename an unreadable journal part out of the way (kept for inspection) and warn."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    warnings.warn(f"journal part {path} cannot be read ({problem}); set aside as {target.name}, "
                  f"its rows will be recomputed", RuntimeWarning, stacklevel=3)
    return target


class Ledger:
    """Journal of scored rows under ``out_dir`` plus the finalized ``ledger.parquet``.

    ``settings_fp`` is stamped on every appended row that carries none. Pickled to remote workers
    (Beam), a copy appends under its own token; only the process that created the ledger compacts.
    """

    def __init__(self, out_dir: str | Path, settings_fp: str = "", compact_every: int = COMPACT_EVERY):
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / "ledger.parts"
        self.path = self.out_dir / "ledger.parquet"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.settings_fp = settings_fp
        self.compact_every = compact_every
        self.run = max((_order(p)[0] for p in self._parts()), default=0) + 1
        self._owner = os.getpid()
        self._seq = 0
        self._since_compact = 0
        self._compactions = 0
        self._token_pid = -1
        self._token = ""

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet"), key=_order)

    def _writer_token(self) -> str:
        if self._token_pid != os.getpid():  # a pickled copy in another process: its own name space
            self._token_pid, self._token, self._seq = os.getpid(), uuid.uuid4().hex[:12], 0
        return self._token

    def _read_parts(self, columns: list[str] | None = None) -> tuple[list[Path], list[pa.Table]]:
        paths, tables = [], []
        for p in self._parts():
            try:
                table = pq.read_table(p, columns=columns, schema=SCHEMA)
            except (pa.ArrowInvalid, OSError) as e:
                if p.exists():
                    set_aside(p, " ".join(str(e).split())[:200])
                continue
            paths.append(p)
            tables.append(table)
        return paths, tables

    def _merged(self, columns: list[str] | None = None) -> tuple[list[Path], pd.DataFrame]:
        paths, tables = self._read_parts(columns)
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        df = table.to_pandas()
        for name in df.columns.intersection(list(_STRING_COLUMNS)):  # parts from before a column existed
            df[name] = df[name].fillna("")
        # a key journaled twice (a retried failure, a resumed batch) keeps its latest record
        return paths, df.drop_duplicates("key", keep="last").reset_index(drop=True)

    def read_journal(self) -> pd.DataFrame:
        return self._merged()[1]

    def scan(self) -> pd.DataFrame:
        """``key, status, reason, settings_fp`` of every journaled key (latest record), read cheaply."""
        return self._merged(SCAN_COLUMNS)[1]

    def done_keys(self, retry_reasons: tuple[str, ...] = RETRYABLE, settings_fp: str | None = None) -> set[str]:
        """Keys a rerun skips (see ``done_keys``)."""
        return done_keys(self.scan(), retry_reasons, settings_fp)

    def append(self, rows: list[Row]) -> None:
        if not rows:
            return
        token = self._writer_token()
        self._seq += 1
        name = f"part-{self.run:06d}-{self._seq:09d}-{token}.parquet"
        atomic_write_table(to_table(rows, self.settings_fp), self.parts_dir / name)
        if os.getpid() == self._owner:
            self._since_compact += 1
            if self.compact_every and self._since_compact >= self.compact_every:
                self.compact()

    def compact(self) -> pd.DataFrame:
        """Merge every readable part into one (latest record per key); returns the merged journal.

        The merged part is written durably before the parts it replaces are removed, and it sorts
        after every earlier run and before this run's later parts, so a crash in between changes
        nothing.
        """
        paths, df = self._merged()
        self._since_compact = 0
        if len(paths) <= 1:
            return df
        self._compactions += 1
        name = f"part-{self.run:06d}-{0:09d}-c{self._compactions:06d}{self._writer_token()}.parquet"
        target = self.parts_dir / name
        atomic_write_table(pa.Table.from_pandas(df[COLUMNS], schema=SCHEMA, preserve_index=False), target)
        for p in paths:
            if p != target:
                p.unlink(missing_ok=True)
        return df

    def write_final(self, df: pd.DataFrame, meta: dict) -> Path:
        """Write ``ledger.parquet`` (sorted by key) with the run metadata, plus ``run.json``."""
        df = df.sort_values("key", kind="stable").reset_index(drop=True)
        # a column no stage of this run produced (an older journal, a hand-built frame) is missing, not made up
        df = df.assign(**{c: pd.Series([None] * len(df), index=df.index, dtype=object) for c in COLUMNS if c not in df})
        meta = {**meta, "ledger_format": LEDGER_FORMAT}
        table = pa.Table.from_pandas(df[COLUMNS], schema=SCHEMA, preserve_index=False)
        table = table.replace_schema_metadata({b"v2a_run": json.dumps(meta, sort_keys=True).encode()})
        atomic_write_table(table, self.path)
        atomic_write_text(self.out_dir / "run.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return self.path


def current_rows(journal: pd.DataFrame, keys: set[str], settings_fp: str) -> pd.DataFrame:
    """The journal rows of the manifest's ``keys``, plus the parts of each window whose latest
    record is a split made with these settings. Parts of an earlier split (a window rescored since,
    or scored with other settings) are left out: they are not this run's result."""
    top = journal[journal["key"].isin(keys)]
    split = top["reason"].str.startswith(SPLIT_REASON) & (top["settings_fp"] == settings_fp)
    parts = journal[journal["parent_key"].isin(set(top.loc[split, "key"]))
                    & (journal["settings_fp"] == settings_fp) & ~journal["key"].isin(keys)]
    return pd.concat([top, parts]) if len(parts) else top


class LedgerError(ValueError):
    """A ledger file that this version cannot use (wrong format, missing columns, unreadable)."""


def read_ledger(path: str | Path, required: Iterable[str] = CORE_COLUMNS) -> tuple[pd.DataFrame, dict]:
    """Read a finalized ledger and its run metadata, after checking its format version and columns."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise LedgerError(f"{path} is not a readable ledger ({' '.join(str(e).split())[:200]}); "
                          f"rerun python -m pipeline.clean to rebuild it from its journal") from e
    meta_raw = (table.schema.metadata or {}).get(b"v2a_run")
    try:
        meta = json.loads(meta_raw) if meta_raw else {}
    except json.JSONDecodeError as e:
        raise LedgerError(f"{path}: its run metadata is not valid JSON ({e})") from e
    found = meta.get("ledger_format")
    if found is not None and found != LEDGER_FORMAT:
        raise LedgerError(f"{path} is ledger format {found!r}; this version reads {LEDGER_FORMAT!r}: "
                          f"rerun python -m pipeline.clean with this version to rewrite it")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise LedgerError(f"{path} is missing columns {', '.join(missing)} "
                          f"(format {found or 'unversioned'}); it was not written by pipeline.clean of this "
                          f"version: rerun python -m pipeline.clean to rewrite it")
    return table.to_pandas(), meta
