"""AV-Align: ``fast`` mode against ``reference`` mode on real clips, in one run.

    python bench/av_align.py [--clips DIR] [--fast-max-side N] [--repeat K] [--cv-threads T]

Per clip it prints both modes' wall time (decode + compute, as ``score_clip`` measures it) and
CPU time (all threads of this process), their ratios, and for each published revision (2025,
2023) the reference score, the fast score and the published number when the clip has one
(``av_align_reference.json`` beside the clips); then, per revision, the Pearson r and whether
fast mode makes the reference's keep/drop decisions at the AV-Align threshold of ``FilterConfig``,
and on how many clips the two revisions' decisions disagree (reference mode). Each clip is scored in both modes back to back, so load on the
machine hits both alike; fast mode runs ``--repeat`` times and its median counts. On a shared
machine the CPU ratio is the steadier figure. OpenCV runs one thread by default, as in a clean
worker (one worker per core).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from filters.av_align import VERSIONS, AVAlignConfig, score_clip, warm_up
from filters.rules import FilterConfig

CLIPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "vggsound" / "video"
PUBLISHED_KEY = {"2025": "score", "2023": "score_2023"}  # the fixture's field per revision


def timed(path: Path, config: AVAlignConfig):
    """(result, wall seconds, CPU seconds) of one ``score_clip`` call."""
    cpu = time.process_time()
    result = score_clip(path, config)
    return result, result.seconds, time.process_time() - cpu


def print_decisions(scores: dict, n: int, threshold: float) -> None:
    """Per revision: fast mode against reference mode and the published numbers; then the revisions'
    disagreements at the threshold."""
    keep = {key: np.asarray(vals, float) > threshold for key, vals in scores.items()}
    for v in VERSIONS:
        ref_s, fast_s, pub_s = (np.asarray(scores[v, m], float) for m in ("ref", "fast", "publ"))
        r = float(np.corrcoef(ref_s, fast_s)[0, 1]) if n > 1 else float("nan")
        known = ~np.isnan(pub_s)
        exact = int(np.sum(np.round(ref_s[known], 6) == pub_s[known]))
        print(f"revision {v}: fast makes {int(np.sum(keep[v, 'fast'] == keep[v, 'ref']))}/{n} of the "
              f"reference's decisions at {threshold}; Pearson r = {r:.3f}; max |fast - reference| = "
              f"{np.max(np.abs(fast_s - ref_s)):.3f}; reference equals the published number (6 decimals) on "
              f"{exact}/{int(known.sum())} clips")
    differ = int(np.sum(keep["2025", "ref"] != keep["2023", "ref"]))
    print(f"revisions 2025 and 2023 disagree on {differ}/{n} keep/drop decisions at {threshold} "
          f"(reference mode; fast mode: {int(np.sum(keep['2025', 'fast'] != keep['2023', 'fast']))}); "
          f"load average now {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=Path, default=CLIPS, help="folder of video files with sound")
    p.add_argument("--fast-max-side", type=int, default=AVAlignConfig().fast_max_side)
    p.add_argument("--repeat", type=int, default=3, help="fast-mode runs per clip (median counts)")
    p.add_argument("--cv-threads", type=int, default=1, help="cv2.setNumThreads for both modes")
    args = p.parse_args(argv)

    files = sorted(f for f in args.clips.iterdir() if f.suffix.lower() in (".mp4", ".mkv", ".webm", ".mov"))
    if not files:
        print(f"no video files in {args.clips}", file=sys.stderr)
        return 2
    published_path = args.clips.parent / "av_align_reference.json"
    published = json.loads(published_path.read_text()) if published_path.is_file() else {}
    cv2.setNumThreads(args.cv_threads)
    threshold = FilterConfig().av_align_min
    ref_cfg = AVAlignConfig(mode="reference")
    fast_cfg = AVAlignConfig(mode="fast", fast_max_side=args.fast_max_side)
    warm_up(fast_cfg)
    score_clip(files[0], fast_cfg)  # and the decoder's first use

    print(f"AV-Align reference vs fast (max side {args.fast_max_side}px), cv2 threads {args.cv_threads}, "
          f"threshold {threshold}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    cols = " ".join(f"{v + ' ' + k:>9s}" for v in VERSIONS for k in ("ref", "fast", "publ."))
    print(f"{'clip':24s} {'ref s':>7s} {'fast s':>6s} {'wall x':>6s} {'ref cpu':>7s} {'fast cpu':>8s} {'cpu x':>5s} "
          f"{cols} {'A':>3s}")
    scores = {(v, m): [] for v in VERSIONS for m in ("ref", "fast", "publ")}
    wall_x, cpu_x = [], []
    totals = np.zeros(4)  # ref wall, fast wall, ref cpu, fast cpu
    for f in files:
        ref, ref_wall, ref_cpu = timed(f, ref_cfg)
        runs = [timed(f, fast_cfg) for _ in range(max(1, args.repeat))]
        fast = runs[0][0]
        fast_wall = statistics.median(r[1] for r in runs)
        fast_cpu = statistics.median(r[2] for r in runs)
        cells = []
        for v in VERSIONS:
            pub = published.get(f.name, {}).get(PUBLISHED_KEY[v])
            for m, value in (("ref", ref.revisions[v].score), ("fast", fast.revisions[v].score), ("publ", pub)):
                scores[v, m].append(np.nan if value is None else value)
                cells.append(f"{'-' if value is None else f'{value:.6f}':>9s}")
        print(f"{f.name:24s} {ref_wall:7.2f} {fast_wall:6.3f} {ref_wall / fast_wall:6.1f} {ref_cpu:7.2f} "
              f"{fast_cpu:8.3f} {ref_cpu / fast_cpu:5.1f} {' '.join(cells)} {ref.audio_peaks:3d}", flush=True)
        wall_x.append(ref_wall / fast_wall)
        cpu_x.append(ref_cpu / fast_cpu)
        totals += (ref_wall, fast_wall, ref_cpu, fast_cpu)

    print(f"\nspeed reference/fast, wall: min {min(wall_x):.1f}x, median {statistics.median(wall_x):.1f}x, "
          f"all clips {totals[0] / totals[1]:.1f}x ({totals[0]:.1f}s vs {totals[1]:.2f}s)")
    print(f"speed reference/fast, CPU:  min {min(cpu_x):.1f}x, median {statistics.median(cpu_x):.1f}x, "
          f"all clips {totals[2] / totals[3]:.1f}x ({totals[2]:.1f}s vs {totals[3]:.2f}s)")
    print_decisions(scores, len(files), threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
