"""Turn a ledger into augmentation recipes (concat, stretch): parameters, not video files.

Determinism: rows are taken in key order and every random choice for a clip comes from a
generator seeded by ``(seed, kind, key)`` (SHA-256, not Python's salted ``hash``), so the plan
depends only on the ledger's content and the seed, never on row order, engine or machine.

Rules (``AugmentConfig`` holds every number):
- eligible clips: ``status == ok``, split not in ``exclude_splits`` (``test``), a video path, and a
  window at least ``min_output_s`` long;
- concat ``cat-{keyA}-{keyB}``: A plays ``[0, cut)``, B plays ``[cut, target)``; B is an eligible
  clip of the same split with a different non-empty label and a different source video
  (``youtube_id``); the cut is a point of the ``clip_fps`` grid inside ``concat_span``; B's source
  offset is a grid point too; caption ``"{caption A}{caption_join}{caption B}"`` (default
  ``"A then B"``), label likewise;
- stretch ``{key}-ts{100 r}``: plays ``[s0, s0 + r L)`` of the clip at rate r for an output of
  L = target seconds; a source window shorter than ``r * target`` gives a shorter output
  (L = window / r) whose valid length is ``duration_s`` (``target_s`` keeps the asked length);
  s0 is a grid point when the window is longer than needed.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from augment.config import AugmentConfig, rate_tag
from augment.recipe import Recipe, Segment
from core.keys import is_safe, sanitize

LEDGER_COLUMNS = ("key", "youtube_id", "video_path", "label", "caption", "split", "start_s", "duration_s",
                  "status")
_EPS = 1e-9
_PARTNER_TRIES = 64  # random draws before falling back to scanning every candidate


class LedgerError(ValueError):
    """A ledger the planner cannot use (missing columns, duplicate keys)."""


@dataclass
class PlanSummary:
    """What the planner did with every ledger row, for the CLI's closing report."""

    ledger_rows: int = 0
    eligible: int = 0
    concat: int = 0
    stretch: int = 0
    with_real_cuts: int = 0  # recipes that play a real scene cut of a source (listed in real_cuts_s)
    skipped: Counter = field(default_factory=Counter)  # reason -> count (rows or recipes not planned)

    def lines(self) -> list[str]:
        out = [f"ledger rows {self.ledger_rows}, eligible clips {self.eligible} -> "
               f"{self.concat + self.stretch} recipes (concat {self.concat}, stretch {self.stretch})"]
        if self.with_real_cuts:
            out.append(f"   recipes playing a real scene cut (real_cuts_s): {self.with_real_cuts}")
        out += [f"   {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        return out


def rng_for(seed: int, kind: str, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, kind, key): any worker, any order, same draws."""
    digest = hashlib.sha256(f"{seed}:{kind}:{key}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


def _str(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _grid_floor(x: float, step: float) -> float:
    return math.floor(x / step + _EPS) * step


def _eligible(ledger: pd.DataFrame, cfg: AugmentConfig, summary: PlanSummary) -> pd.DataFrame:
    missing = [c for c in LEDGER_COLUMNS if c not in ledger.columns]
    if missing:
        raise LedgerError(f"ledger lacks columns {', '.join(missing)} (see pipeline/ledger.py)")
    dup = ledger["key"][ledger["key"].duplicated()]
    if len(dup):
        raise LedgerError(f"ledger has duplicate keys, e.g. {dup.iloc[0]!r}")
    df = ledger.sort_values("key", kind="stable").reset_index(drop=True)
    summary.ledger_rows = len(df)
    status = df["status"].map(_str)
    split = df["split"].map(_str)
    dur = pd.to_numeric(df["duration_s"], errors="coerce").fillna(0.0)
    reasons = [
        ("not ok", status != "ok"),
        ("excluded split", split.isin(cfg.exclude_splits)),
        ("no video path", df["video_path"].map(_str) == ""),
        ("window shorter than min_output_s", dur < cfg.min_output_s),
    ]
    keep = pd.Series(True, index=df.index)
    for reason, bad in reasons:
        n = int((keep & bad).sum())
        if n:
            summary.skipped[f"row {reason}"] += n
        keep &= ~bad
    out = df[keep].reset_index(drop=True)
    for col in ("key", "youtube_id", "video_path", "label", "caption", "split"):
        out[col] = out[col].map(_str)
    if "source" not in out.columns:
        out["source"] = ""
    out["source"] = out["source"].map(_str)
    out["start_s"] = pd.to_numeric(out["start_s"], errors="coerce").fillna(0.0)
    out["duration_s"] = pd.to_numeric(out["duration_s"], errors="coerce")
    fps = pd.to_numeric(out["video_fps"], errors="coerce") if "video_fps" in out.columns else None
    out["video_fps"] = fps.fillna(0.0) if fps is not None else 0.0
    # source identity: windows of one video share a youtube_id; without one the file is the video
    out["video_id"] = [y or p for y, p in zip(out["youtube_id"], out["video_path"])]
    out["text"] = [c or lab for c, lab in zip(out["caption"], out["label"])]
    # real scene cuts (clean's scene_cuts, seconds from the window start) as seconds in the file
    cuts = out["scene_cuts"] if "scene_cuts" in out.columns else pd.Series([None] * len(out), index=out.index)
    out["real_cuts"] = [sorted(s + float(c) for c in v) if isinstance(v, (list, tuple, np.ndarray)) else []
                        for s, v in zip(out["start_s"], cuts)]
    summary.eligible = len(out)
    return out


def _grid_offset(rng: np.random.Generator, room_s: float, step: float) -> float:
    """A grid point in ``[0, room_s]`` (0 when there is no room)."""
    n = int(math.floor(room_s / step + _EPS)) if room_s > 0 else 0
    return float(rng.integers(0, n + 1)) * step if n > 0 else 0.0


def _played(cuts: list[float], s0: float, s1: float) -> list[float]:
    """The real cuts strictly inside the source span ``(s0, s1)`` (a cut at ``s0`` starts the span)."""
    return [c for c in cuts if s0 + _EPS < c < s1 - _EPS]


def _cut_free_offset(rng: np.random.Generator, b: dict, length: float, step: float) -> float | None:
    """A grid offset into B's window whose ``length`` s play none of its real cuts (None: there is none)."""
    room = float(b["duration_s"]) - length
    n = int(math.floor(room / step + _EPS)) if room > 0 else 0
    start = float(b["start_s"])
    free = [k * step for k in range(n + 1) if not _played(b["real_cuts"], start + k * step, start + k * step + length)]
    return free[int(rng.integers(len(free)))] if free else None


def _stretch_rates(cfg: AugmentConfig, rng: np.random.Generator) -> list[float]:
    if not cfg.stretch_range:
        return list(cfg.stretch_rates)
    lo, hi = (int(round(x * 100)) for x in cfg.stretch_range)
    values = [v for v in range(lo, hi + 1) if v != 100]
    n = min(cfg.stretch_per_clip, len(values))
    picks = rng.choice(len(values), size=n, replace=False) if n else []
    return sorted(values[int(i)] / 100 for i in picks)


def plan_stretch(row: dict, cfg: AugmentConfig, summary: PlanSummary) -> list[Recipe]:
    rng = rng_for(cfg.seed, "stretch", row["key"])
    out = []
    for r in _stretch_rates(cfg, rng):
        window = float(row["duration_s"])
        length = min(cfg.target_s, window / r)  # output seconds
        if length < cfg.min_output_s:
            summary.skipped["stretch output shorter than min_output_s"] += 1
            continue
        src_len = length * r
        offset = _grid_offset(rng, window - src_len, cfg.grid_s)
        s0 = float(row["start_s"]) + offset
        seg = Segment(source_key=row["key"], video_path=row["video_path"], src_start_s=s0,
                      src_end_s=s0 + src_len, dst_start_s=0.0, rate=r)
        real = tuple(round(float(seg.to_output(c)), 6) for c in _played(row["real_cuts"], s0, s0 + src_len))
        out.append(Recipe(key=f"{row['key']}-{rate_tag(r)}", kind="stretch", caption=row["text"],
                          label=row["label"], split=row["split"], source=row["source"],
                          duration_s=seg.dst_end_s, target_s=cfg.target_s,
                          video_fps=float(row["video_fps"]) * r, segments=(seg,), rate=r,
                          stretch_method=cfg.stretch_method, real_cuts_s=real))
    return out


class _PartnerIndex:
    """Eligible clips per split, for drawing concat partners without an O(n^2) scan."""

    def __init__(self, clips: pd.DataFrame):
        self.pools = {}
        for split, g in clips.groupby("split", sort=True):
            self.pools[split] = (g.to_dict("records"), g["label"].to_numpy(), g["video_id"].to_numpy())

    def draw(self, a: dict, k: int, rng: np.random.Generator) -> list[dict]:
        pool, labels, vids = self.pools[a["split"]]
        chosen: list[int] = []
        tries = 0
        while len(chosen) < k and tries < _PARTNER_TRIES * k:
            i = int(rng.integers(len(pool)))
            tries += 1
            if i not in chosen and labels[i] and labels[i] != a["label"] and vids[i] != a["video_id"]:
                chosen.append(i)
        if len(chosen) < k:  # rare labels or tiny ledgers: scan every candidate
            ok = (labels != a["label"]) & (labels != "") & (vids != a["video_id"])
            ok[chosen] = False
            rest = np.flatnonzero(ok)
            if len(rest):
                extra = rng.choice(len(rest), size=min(k - len(chosen), len(rest)), replace=False)
                chosen += [int(rest[j]) for j in extra]
        return [pool[i] for i in chosen]


def plan_concat(a: dict, partners: _PartnerIndex, cfg: AugmentConfig, summary: PlanSummary) -> list[Recipe]:
    if not a["label"]:
        summary.skipped["concat: clip has no label"] += 1
        return []
    rng = rng_for(cfg.seed, "concat", a["key"])
    cuts = [c for c in cfg.cut_grid() if c <= float(a["duration_s"]) + _EPS]
    if not cuts:
        summary.skipped["concat: clip shorter than the earliest cut"] += 1
        return []
    avoid = cfg.real_cuts == "avoid"
    a0 = float(a["start_s"])
    if avoid and a["real_cuts"]:  # A plays [a0, a0 + cut): the synthetic cut comes before its first real one
        cuts = [c for c in cuts if not _played(a["real_cuts"], a0, a0 + c)]
        if not cuts:
            summary.skipped["concat: a real scene cut before the earliest cut (--real-cuts avoid)"] += 1
            return []
    picked = partners.draw(a, cfg.concat_per_clip, rng)
    if len(picked) < cfg.concat_per_clip:
        summary.skipped["concat: not enough partners (label, source video, split)"] += (
            cfg.concat_per_clip - len(picked))
    out = []
    for b in picked:
        cut = cuts[int(rng.integers(len(cuts)))]
        b_len = min(cfg.target_s - cut, float(b["duration_s"]))
        if avoid and b["real_cuts"]:
            offset = _cut_free_offset(rng, b, b_len, cfg.grid_s)
            if offset is None:
                summary.skipped["concat: real scene cuts leave the partner no cut-free span (--real-cuts avoid)"] += 1
                continue
        else:
            offset = _grid_offset(rng, float(b["duration_s"]) - b_len, cfg.grid_s)
        b0 = float(b["start_s"]) + offset
        seg_a = Segment(a["key"], a["video_path"], a0, a0 + cut, 0.0, 1.0)
        seg_b = Segment(b["key"], b["video_path"], b0, b0 + b_len, cut, 1.0)
        real = tuple(round(float(seg.to_output(c)), 6) for seg, cuts_of in ((seg_a, a), (seg_b, b))
                     for c in _played(cuts_of["real_cuts"], seg.src_start_s, seg.src_end_s))
        key = f"cat-{a['key']}-{b['key']}"
        out.append(Recipe(key=key, kind="concat", caption=f"{a['text']}{cfg.caption_join}{b['text']}",
                          label=f"{a['label']}{cfg.caption_join}{b['label']}", split=a["split"],
                          source=a["source"], duration_s=seg_b.dst_end_s, target_s=cfg.target_s,
                          video_fps=float(a["video_fps"]), segments=(seg_a, seg_b), cut_s=cut,
                          crossfade_s=cfg.crossfade_ms / 1000.0, stretch_method=cfg.stretch_method,
                          real_cuts_s=real))
    return out


def build_plan(ledger: pd.DataFrame, cfg: AugmentConfig, progress: bool = False) -> tuple[list[Recipe], PlanSummary]:
    """Every recipe for ``ledger`` under ``cfg``, sorted by key, plus what was skipped and why."""
    summary = PlanSummary()
    clips = _eligible(ledger, cfg, summary)
    recipes: list[Recipe] = []
    do_concat = cfg.concat_per_clip > 0 and len(clips) > 0
    do_stretch = cfg.stretch_per_clip > 0 and bool(cfg.stretch_range or cfg.stretch_rates)
    partners = _PartnerIndex(clips) if do_concat else None
    for clip in tqdm(clips.to_dict("records"), desc="plan", unit="clip", disable=not progress, dynamic_ncols=True):
        if partners is not None:
            made = plan_concat(clip, partners, cfg, summary)
            summary.concat += len(made)
            recipes += made
        if do_stretch:
            made = plan_stretch(clip, cfg, summary)
            summary.stretch += len(made)
            recipes += made
    recipes.sort(key=lambda r: r.key)
    summary.with_real_cuts = sum(1 for r in recipes if r.real_cuts_s)
    _check_keys(recipes)
    return recipes, summary


def _check_keys(recipes: Iterable[Recipe]) -> None:
    seen: set[str] = set()
    for r in recipes:
        if not is_safe(r.key):
            raise LedgerError(f"recipe key {r.key!r} is not a safe key: ledger key "
                              f"{sanitize(r.key)!r} would be; fix the ledger's keys")
        if r.key in seen:
            raise LedgerError(f"two recipes share the key {r.key!r}")
        seen.add(r.key)


def plan_meta(cfg: AugmentConfig, ledger_path: str, summary: PlanSummary, code_version: str) -> dict:
    """Parameters stored in the plan's schema metadata: enough to reproduce it exactly."""
    return {"config": cfg.to_json(), "ledger": str(ledger_path), "code_version": code_version,
            "counts": {"ledger_rows": summary.ledger_rows, "eligible": summary.eligible,
                       "concat": summary.concat, "stretch": summary.stretch,
                       "with_real_cuts": summary.with_real_cuts,
                       "skipped": dict(sorted(summary.skipped.items()))}}
