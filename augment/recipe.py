"""The augmentation plan's data contract: a recipe says which source span lands where, at which rate.

A recipe is a list of segments; segment ``i`` plays ``[src_start_s, src_end_s)`` of its source
file at ``rate`` from output time ``dst_start_s``, so a source event at time ``s`` (seconds in the
file) lands at ``dst_start_s + (s - src_start_s) / rate`` in the output, in the frames and in the
audio. Segments tile the output from 0 without gaps. ``OUT/plan.parquet`` stores one recipe per
row (``segments`` as a ``list<struct>`` column) and the plan parameters in its schema metadata.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from augment.config import MAX_RATE, MIN_RATE, STRETCH_METHODS
from core.keys import is_safe
from core.atomic import atomic_write_table

KINDS = ("concat", "stretch")
PLAN_META_KEY = b"v2a_augment_plan"
PLAN_FORMAT = "v2a-plan/1"  # in the plan's metadata ("format"); a plan without it predates versioning
_TIME_TOL = 1e-6  # seconds: segments must tile the output to this precision

SEGMENT_TYPE = pa.struct([
    ("source_key", pa.string()),
    ("video_path", pa.string()),
    ("src_start_s", pa.float64()),
    ("src_end_s", pa.float64()),
    ("dst_start_s", pa.float64()),
    ("rate", pa.float64()),
])
PLAN_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("kind", pa.string()),
    ("source", pa.string()),
    ("caption", pa.string()),
    ("label", pa.string()),
    ("split", pa.string()),
    ("duration_s", pa.float64()),  # valid output length (shorter than target_s when the source is short)
    ("target_s", pa.float64()),  # full output length asked for (SignalConfig.window_s)
    ("video_fps", pa.float64()),  # native output frame rate: first source's fps x its rate
    ("rate", pa.float64()),  # stretch rate (null for concat)
    ("cut_s", pa.float64()),  # concat cut time in the output (null for stretch)
    ("crossfade_s", pa.float64()),  # equal-power audio crossfade centred on each cut
    ("stretch_method", pa.string()),  # audio method for segments whose rate is not 1
    ("segments", pa.list_(SEGMENT_TYPE)),
    # real scene cuts of the sources (their ledger scene_cuts) that the output plays, in output
    # seconds; cut_s is the synthetic one. Null in plans made before this column existed.
    ("real_cuts_s", pa.list_(pa.float64())),
])
PLAN_COLUMNS = PLAN_SCHEMA.names
OPTIONAL_COLUMNS = ("real_cuts_s",)  # a plan written before them still reads (as "no real cut recorded")


class PlanError(ValueError):
    """A plan (file, row or segment) that cannot be rendered; the message says which and why."""


@dataclass(frozen=True)
class Segment:
    source_key: str
    video_path: str
    src_start_s: float
    src_end_s: float
    dst_start_s: float
    rate: float

    @property
    def src_len_s(self) -> float:
        return self.src_end_s - self.src_start_s

    @property
    def dst_end_s(self) -> float:
        return self.dst_start_s + self.src_len_s / self.rate

    def to_output(self, s: float | np.ndarray) -> float | np.ndarray:
        """Output time of source time ``s`` (seconds in the source file)."""
        return self.dst_start_s + (s - self.src_start_s) / self.rate

    def to_source(self, t: float | np.ndarray) -> float | np.ndarray:
        """Source time shown at output time ``t``."""
        return self.src_start_s + (t - self.dst_start_s) * self.rate

    def as_dict(self) -> dict:
        return {"source_key": self.source_key, "video_path": self.video_path, "src_start_s": self.src_start_s,
                "src_end_s": self.src_end_s, "dst_start_s": self.dst_start_s, "rate": self.rate}


@dataclass(frozen=True)
class Recipe:
    key: str
    kind: str
    caption: str
    label: str
    split: str
    source: str
    duration_s: float
    target_s: float
    video_fps: float
    segments: tuple[Segment, ...]
    rate: float | None = None
    cut_s: float | None = None
    crossfade_s: float = 0.0
    stretch_method: str = "resample"
    real_cuts_s: tuple[float, ...] = ()

    def map_time(self, source_key: str, s: float) -> float:
        """Output time of source event ``s`` of ``source_key`` (the first segment that plays it)."""
        for seg in self.segments:
            if seg.source_key == source_key and seg.src_start_s <= s < seg.src_end_s:
                return float(seg.to_output(s))
        raise ValueError(f"{self.key}: {source_key} at {s:.3f}s is not played by this recipe")

    def as_row(self) -> dict:
        return {"key": self.key, "kind": self.kind, "source": self.source, "caption": self.caption,
                "label": self.label, "split": self.split, "duration_s": self.duration_s,
                "target_s": self.target_s, "video_fps": self.video_fps, "rate": self.rate, "cut_s": self.cut_s,
                "crossfade_s": self.crossfade_s, "stretch_method": self.stretch_method,
                "segments": [s.as_dict() for s in self.segments], "real_cuts_s": list(self.real_cuts_s)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Recipe:
        """Validate one plan row (a dict, a pandas row or an Arrow row) and build its recipe."""
        key = row.get("key")
        where = f"plan row {key!r}"
        if not isinstance(key, str) or not is_safe(key):
            raise PlanError(f"{where}: key must be a non-empty string of [A-Za-z0-9_-]")
        kind = row.get("kind")
        if kind not in KINDS:
            raise PlanError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        raw = row.get("segments")
        if raw is None or isinstance(raw, (str, bytes)) or len(raw) == 0:
            raise PlanError(f"{where}: segments must be a non-empty list")
        segments = tuple(_segment(where, i, s) for i, s in enumerate(raw))
        t = 0.0
        for i, seg in enumerate(segments):
            if abs(seg.dst_start_s - t) > _TIME_TOL:
                raise PlanError(f"{where}: segment {i} starts at {seg.dst_start_s:.6f}s in the output, "
                                f"expected {t:.6f}s (segments must tile the output in order)")
            t = seg.dst_end_s
        duration = _number(where, "duration_s", row.get("duration_s"))
        if abs(duration - t) > 1e-3:
            raise PlanError(f"{where}: duration_s {duration:.6f} does not match the segments ({t:.6f}s)")
        method = row.get("stretch_method") or "resample"
        if method not in STRETCH_METHODS:
            raise PlanError(f"{where}: stretch_method must be one of {STRETCH_METHODS}, got {method!r}")
        crossfade = _optional(row.get("crossfade_s")) or 0.0
        if crossfade < 0 or not math.isfinite(crossfade):
            raise PlanError(f"{where}: crossfade_s must be >= 0, got {crossfade}")
        fps = _optional(row.get("video_fps")) or 0.0
        raw_cuts = row.get("real_cuts_s")
        real_cuts = tuple(_number(where, "real_cuts_s", c) for c in (() if raw_cuts is None else raw_cuts))
        if any(not 0.0 <= c <= duration + _TIME_TOL for c in real_cuts):
            raise PlanError(f"{where}: real_cuts_s {list(real_cuts)} must lie within the output (0-{duration:.3f}s)")
        return cls(key=key, kind=kind, caption=str(row.get("caption") or ""), label=str(row.get("label") or ""),
                   split=str(row.get("split") or ""), source=str(row.get("source") or ""), duration_s=duration,
                   target_s=_optional(row.get("target_s")) or duration, video_fps=fps, segments=segments,
                   rate=_optional(row.get("rate")), cut_s=_optional(row.get("cut_s")), crossfade_s=crossfade,
                   stretch_method=method, real_cuts_s=real_cuts)


def _optional(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _number(where: str, name: str, value: Any) -> float:
    v = _optional(value)
    if v is None or not math.isfinite(v):
        raise PlanError(f"{where}: {name} must be a finite number, got {value!r}")
    return v


def _segment(where: str, i: int, raw: Any) -> Segment:
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where}: segment {i} must be a mapping with {SEGMENT_TYPE.names}, got {type(raw).__name__}")
    missing = [n for n in SEGMENT_TYPE.names if n not in raw]
    if missing:
        raise PlanError(f"{where}: segment {i} lacks {', '.join(missing)}")
    at = f"{where}: segment {i}"
    seg = Segment(source_key=str(raw["source_key"] or ""), video_path=str(raw["video_path"] or ""),
                  src_start_s=_number(at, "src_start_s", raw["src_start_s"]),
                  src_end_s=_number(at, "src_end_s", raw["src_end_s"]),
                  dst_start_s=_number(at, "dst_start_s", raw["dst_start_s"]),
                  rate=_number(at, "rate", raw["rate"]))
    if not seg.video_path:
        raise PlanError(f"{at}: video_path is empty")
    if seg.src_start_s < 0 or seg.src_end_s <= seg.src_start_s:
        raise PlanError(f"{at}: source span [{seg.src_start_s}, {seg.src_end_s}) is empty or negative")
    if not MIN_RATE <= seg.rate <= MAX_RATE:
        raise PlanError(f"{at}: rate {seg.rate} is outside [{MIN_RATE}, {MAX_RATE}]")
    return seg


def recipes_table(recipes: Iterable[Recipe], meta: dict) -> pa.Table:
    rows = [r.as_row() for r in recipes]
    table = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    meta = {**meta, "format": PLAN_FORMAT}
    return table.replace_schema_metadata({PLAN_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_plan(path: str | Path, recipes: Iterable[Recipe], meta: dict) -> Path:
    """Write the plan atomically (temporary name, then rename): a crash never leaves half a plan."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(recipes_table(recipes, meta), path)
    return path


def read_plan(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read ``plan.parquet`` and its parameters, checking its format and columns; rows are validated
    when turned into recipes."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file not found: {p}")
    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise PlanError(f"{p} is not a readable parquet plan: {e}") from e
    missing = [c for c in PLAN_COLUMNS if c not in table.column_names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise PlanError(f"{p} is not an augmentation plan: missing columns {', '.join(missing)}")
    raw = (table.schema.metadata or {}).get(PLAN_META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{p}: unreadable plan metadata: {e}") from e
    fmt = meta.get("format", PLAN_FORMAT) if isinstance(meta, dict) else None
    if fmt != PLAN_FORMAT:
        raise PlanError(f"{p} is a plan of format {fmt!r}; this code reads {PLAN_FORMAT!r} "
                        f"(re-plan it with python -m pipeline.augment plan, or use the code that wrote it)")
    types = {f.name: table.schema.field(f.name).type for f in PLAN_SCHEMA if f.name in table.column_names}
    wrong = [f"{f.name}: {types[f.name]} (expected {f.type})" for f in PLAN_SCHEMA
             if f.name in types and not types[f.name].equals(f.type) and not pa.types.is_null(types[f.name])]
    if wrong:
        raise PlanError(f"{p} is not an augmentation plan: column types {'; '.join(wrong)}")
    return table.to_pandas(), meta


def find_recipe(plan: pd.DataFrame, key: str) -> Recipe:
    hits = plan.index[plan["key"] == key]
    if len(hits) == 0:
        near = ", ".join(plan["key"].head(5).tolist())
        raise PlanError(f"no recipe {key!r} in the plan ({len(plan)} recipes, e.g. {near})")
    return Recipe.from_row(plan.loc[hits[0]].to_dict())
