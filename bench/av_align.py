"""AV-Align: ``fast`` mode against ``reference`` mode on real clips, in one run.

    python bench/av_align.py [--clips DIR] [--fast-max-side N] [--repeat K] [--cv-threads T]

Per clip it prints both modes' wall time (decode + compute, as ``score_clip`` measures it) and
CPU time (all threads of this process), their ratios, both scores and whether both modes make the
same keep/drop decision at the AV-Align threshold of ``FilterConfig``; then the Pearson r of the
scores and the ratios overall. Each clip is scored in both modes back to back, so load on the
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

from filters.av_align import AVAlignConfig, score_clip, warm_up
from filters.rules import FilterConfig

CLIPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "vggsound" / "video"


def timed(path: Path, config: AVAlignConfig):
    """(result, wall seconds, CPU seconds) of one ``score_clip`` call."""
    cpu = time.process_time()
    result = score_clip(path, config)
    return result, result.seconds, time.process_time() - cpu


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
    print(f"{'clip':24s} {'ref s':>7s} {'fast s':>6s} {'wall x':>6s} {'ref cpu':>7s} {'fast cpu':>8s} {'cpu x':>5s} "
          f"{'ref':>6s} {'fast':>6s} {'publ.':>6s} {'A/V ref':>7s} {'V fast':>6s} same")
    ref_scores, fast_scores, wall_x, cpu_x, agree = [], [], [], [], []
    totals = np.zeros(4)  # ref wall, fast wall, ref cpu, fast cpu
    for f in files:
        ref, ref_wall, ref_cpu = timed(f, ref_cfg)
        runs = [timed(f, fast_cfg) for _ in range(max(1, args.repeat))]
        fast = runs[0][0]
        fast_wall = statistics.median(r[1] for r in runs)
        fast_cpu = statistics.median(r[2] for r in runs)
        same = (ref.score > threshold) == (fast.score > threshold)
        pub = published.get(f.name, {}).get("score")
        print(f"{f.name:24s} {ref_wall:7.2f} {fast_wall:6.3f} {ref_wall / fast_wall:6.1f} {ref_cpu:7.2f} "
              f"{fast_cpu:8.3f} {ref_cpu / fast_cpu:5.1f} {ref.score:6.3f} {fast.score:6.3f} "
              f"{'' if pub is None else f'{pub:6.3f}':>6s} {f'{ref.audio_peaks}/{ref.video_peaks}':>7s} "
              f"{fast.video_peaks:6d} {'yes' if same else 'NO'}", flush=True)
        ref_scores.append(ref.score)
        fast_scores.append(fast.score)
        wall_x.append(ref_wall / fast_wall)
        cpu_x.append(ref_cpu / fast_cpu)
        agree.append(same)
        totals += (ref_wall, fast_wall, ref_cpu, fast_cpu)

    r = float(np.corrcoef(ref_scores, fast_scores)[0, 1]) if len(files) > 1 else float("nan")
    print(f"\nspeed reference/fast, wall: min {min(wall_x):.1f}x, median {statistics.median(wall_x):.1f}x, "
          f"all clips {totals[0] / totals[1]:.1f}x ({totals[0]:.1f}s vs {totals[1]:.2f}s)")
    print(f"speed reference/fast, CPU:  min {min(cpu_x):.1f}x, median {statistics.median(cpu_x):.1f}x, "
          f"all clips {totals[2] / totals[3]:.1f}x ({totals[2]:.1f}s vs {totals[3]:.2f}s)")
    print(f"decisions at {threshold}: {sum(agree)}/{len(agree)} agree; Pearson r (fast vs reference) = {r:.3f}; "
          f"max |fast - reference| = {max(abs(a - b) for a, b in zip(ref_scores, fast_scores)):.3f}; "
          f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
