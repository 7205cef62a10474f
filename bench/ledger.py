"""Benchmark: resuming and re-filtering a ``pipeline.clean`` journal of VGGSound scale, in one run.

Builds a journal of ``--rows`` rows in the real format, as a long run killed at its worst moment
leaves it: everything up to the last periodic compaction in one compacted part, then
``COMPACT_EVERY - 1`` durable one-batch parts (``Ledger.append`` of ``--batch-size`` rows each);
scored rows with a fingerprint, some failures. Then times what a rerun does before any decoding and
at the end:

- resume scan: ``Ledger.scan()`` plus the done-key set (what ``pipeline.clean`` reads to resume);
- re-filter: ``Ledger.compact()`` (the merged journal) plus ``apply_filters`` with new thresholds.

Baselines, measured in the same run on the same data: the scan over every uncompacted part (what
each resume read before compaction; measured on a slice of ``--baseline-parts`` parts and scaled
to all of them), and the row-by-row rules (``df.loc`` per row, the old ``apply_filters``) on
``--baseline-rows`` rows, scaled. Goal here: resume scan and re-filter each under 5 s at 200k rows.

    .venv/bin/python bench/ledger.py --rows 200000 [--batch-size 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.stage import FILTERED, OK  # noqa: E402
from filters.rules import FilterConfig, apply_filters  # noqa: E402
from pipeline.ledger import COMPACT_EVERY, SCHEMA, Ledger, to_table  # noqa: E402

FP = "0123456789abcdef"


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        failed = i % 50 == 0
        rows.append({"key": f"vggsound-{i:011d}-000030", "source": "vggsound", "youtube_id": f"{i:011d}",
                     "video_path": f"/data/vggsound/video/{i:011d}_000030.mp4", "label": "dog barking",
                     "caption": "dog barking", "split": "train", "start_s": 30.0, "duration_s": 10.0,
                     "video_fps": 25.0, "status": "failed" if failed else OK,
                     "reason": "decode_error: truncated" if failed else "",
                     "clap_score": None if failed else float(rng.uniform(-0.1, 0.7)),
                     "av_align": None if failed else float(rng.uniform(0, 0.8)),
                     "audio_peaks": 12, "video_peaks": 9, "line": i + 1})
    return rows


def build_journal(out: Path, rows: list[dict], batch_size: int) -> tuple[Ledger, float]:
    """The compacted head (written in large parts, then compacted), then the uncompacted tail."""
    ledger = Ledger(out, settings_fp=FP, compact_every=0)
    tail = min(len(rows), (COMPACT_EVERY - 1) * batch_size)
    head = len(rows) - tail
    t0 = time.perf_counter()
    for i in range(0, head, 10_000):
        ledger.append(rows[i:min(i + 10_000, head)])
    ledger.compact()
    for i in range(head, len(rows), batch_size):
        ledger.append(rows[i:i + batch_size])
    return ledger, time.perf_counter() - t0


def resume_scan(ledger: Ledger) -> int:
    return len(ledger.done_keys(settings_fp=FP))


def refilter(ledger: Ledger) -> pd.DataFrame:
    return apply_filters(ledger.compact(), FilterConfig(av_align_min=0.25, clap_min=0.35))


def baseline_scan(folder: Path, rows: list[dict], batch_size: int, parts: int) -> float:
    """Seconds to read ``parts`` one-batch parts one by one (the pre-compaction resume), per part."""
    for i in range(parts):
        pq.write_table(to_table(rows[i * batch_size:(i + 1) * batch_size], FP), folder / f"p{i:06d}.parquet")
    t0 = time.perf_counter()
    for p in sorted(folder.glob("p*.parquet")):
        pq.read_table(p, columns=["key", "status", "reason"], schema=SCHEMA).to_pydict()
    return (time.perf_counter() - t0) / parts


def baseline_filter(df: pd.DataFrame, cfg: FilterConfig) -> float:
    """Seconds per row of the old rules: one ``df.loc[idx]`` dict per scored row."""
    t0 = time.perf_counter()
    for idx in df.index[df["status"] == OK]:
        row = df.loc[idx].to_dict()
        reasons = []
        if row["label"] and row["clap_score"] <= cfg.clap_min:
            reasons.append("clap")
        if row["av_align"] <= cfg.av_align_min:
            reasons.append("av")
        if reasons:
            df.at[idx, "status"] = FILTERED
    return (time.perf_counter() - t0) / len(df)


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """First and best-of-``repeat`` seconds (the first re-filter also compacts the tail parts)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times[0], min(times), result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline-parts", type=int, default=2000)
    p.add_argument("--baseline-rows", type=int, default=5000)
    args = p.parse_args()
    rows = make_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        ledger, build_s = build_journal(Path(tmp) / "out", rows, args.batch_size)
        n_parts = -(-args.rows // args.batch_size)
        left = len(list(ledger.parts_dir.glob("part-*.parquet")))
        print(f"journal: {args.rows} rows ({n_parts} batches of {args.batch_size}) as {left} parts on disk "
              f"(one compacted, then the batches since the last periodic compaction), built in {build_s:.1f}s")
        _, scan_s, done = timed(lambda: resume_scan(ledger), args.repeat)
        first_refilter_s, refilter_s, final = timed(lambda: refilter(ledger), args.repeat)
        refilter_s = max(refilter_s, first_refilter_s)  # the finalize of a run pays the compaction once
        kept = int((final["status"] == OK).sum())
        per_part = baseline_scan(Path(tmp), rows, args.batch_size, min(args.baseline_parts, n_parts))
        per_row = baseline_filter(pd.DataFrame(rows[: args.baseline_rows]).astype({"clap_score": float}),
                                  FilterConfig(av_align_min=0.25, clap_min=0.35))
        old_scan, old_filter = per_part * n_parts, per_row * args.rows
        print(f"resume scan: {scan_s:.3f}s ({done} done keys)   baseline (every part read): ~{old_scan:.1f}s "
              f"-> {old_scan / scan_s:.0f}x faster   goal < 5s: {'met' if scan_s < 5 else 'NOT met'}")
        print(f"re-filter:   {refilter_s:.3f}s incl. compaction ({kept} kept)   baseline (row-by-row rules): ~{old_filter:.1f}s "
              f"-> {old_filter / refilter_s:.0f}x faster   goal < 5s: {'met' if refilter_s < 5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
