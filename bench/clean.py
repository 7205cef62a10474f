"""Clean-stage throughput, option by option, against a decode-only baseline measured in the same run.

Baseline: PyAV demuxes and decodes every video and audio frame of each clip the usual way (one
FFmpeg thread, as a worker that owns one core; no conversion, no scoring): what "decode
everything" costs. Each row then runs either a decode-only variant (decoder discard settings,
threads) or the clean stage (``DecodeScoreStage``: decode + AV-Align fast, CLAP off) with one
decode option changed, on the same five real VGGSound clips, in-process. The rows are
interleaved pass by pass, so load on a shared machine hits them alike, and each row's fastest
pass counts (the one least disturbed by other jobs); CPU time is the steadier figure there.

Every clean-stage row is checked against the metric: its keep/drop decisions at the AV-Align
threshold must equal reference mode's (the published numbers of the five real clips, and
reference mode run here on generated clips), and its scores must stay within ``TOLERANCE`` of
the fast mode before these options. Then ``pipeline.clean --workers 2`` end to end, as
video-seconds per CPU-second. Goal: the clean stage (default options) within 1.2x of the
baseline (stretch: below 1.0x).

    python bench/clean.py [--repeat 3] [--workers 2] [--skip-e2e]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import DecodeLimits  # noqa: E402
from core.decode import DecodeRequest, decode  # noqa: E402
from core.native_threads import limit_native_threads  # noqa: E402
from filters.av_align import AVAlignConfig, score_clip, warm_up  # noqa: E402
from filters.rules import FilterConfig  # noqa: E402
from pipeline.clean_stages import CleanStageConfig, DecodeScoreStage  # noqa: E402
from pipeline.manifest import vggsound_rows  # noqa: E402
from core.synth import write_event_clip  # noqa: E402

REAL = ROOT / "tests" / "data" / "vggsound"
TOLERANCE = 0.03  # an option may move a clip's fast-mode score by at most this (docs/benchmarks.md)
BEFORE = AVAlignConfig(fast_skip_loop_filter=False, fast_scaler="opencv")  # fast mode before these options
GOAL = 1.2


def decode_only(path: str, threads: int = 1, options: dict | None = None) -> None:
    """Every video and audio frame, nothing else: the floor of any pipeline that decodes it all."""
    with av.open(path) as c:
        streams = list(c.streams.video[:1]) + list(c.streams.audio[:1])
        if c.streams.video:
            c.streams.video[0].thread_type = "AUTO"
            c.streams.video[0].thread_count = threads
            c.streams.video[0].codec_context.options = dict(options or {})
        for packet in c.demux(streams):
            for _ in packet.decode():
                pass


def audio_per_rate(path: str, rates: tuple[int, ...], once: bool) -> None:
    """The audio a clean worker with CLAP needs (22.05 and 48 kHz): one decode, or one per rate."""
    if once:
        decode(path, DecodeRequest(audio_rates=rates, audio_native=True, need_video=False))
    else:
        for rate in rates:
            decode(path, DecodeRequest(audio_rates=(rate,), audio_native=True, need_video=False))


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


@dataclass
class Row:
    name: str
    run: Callable[[], object]
    config: AVAlignConfig | None = None  # clean-stage rows: what is checked against the metric
    walls: list[float] | None = None
    cpus: list[float] | None = None
    scores: list[float] | None = None

    def time(self) -> None:
        cpu, t0 = time.process_time(), time.perf_counter()
        out = self.run()
        self.walls = (self.walls or []) + [time.perf_counter() - t0]
        self.cpus = (self.cpus or []) + [time.process_time() - cpu]
        if self.config is not None:
            failed = [r for r in out if r["status"] != "ok"]
            assert not failed, failed
            self.scores = [float(r["av_align"]) for r in out]


def stage_runner(rows: list[dict], config: AVAlignConfig, threads: int = 1) -> Callable[[], list[dict]]:
    stage = DecodeScoreStage(CleanStageConfig(av_align=config, limits=DecodeLimits(decode_threads=threads)))
    stage.setup()
    return lambda: stage.process_batch([dict(r) for r in rows])


def build_rows(rows: list[dict], paths: list[str]) -> list[Row]:
    each = lambda fn: (lambda: [fn(p) for p in paths])  # noqa: E731
    default = AVAlignConfig()
    return [
        Row("decode only: every frame, the usual way (baseline)", each(decode_only)),
        Row("decode only: skip_loop_filter=all", each(lambda p: decode_only(p, options={"skip_loop_filter": "all"}))),
        Row("decode only: + flags2=fast", each(lambda p: decode_only(
            p, options={"skip_loop_filter": "all", "flags2": "fast"}))),
        Row("decode only: skip_idct=all (ignored by H.264)", each(lambda p: decode_only(p, options={"skip_idct": "all"}))),
        Row("decode only: 2 FFmpeg threads", each(lambda p: decode_only(p, threads=2))),
        Row("audio 22.05+48 kHz: one decode per rate", each(lambda p: audio_per_rate(p, (22050, 48000), False))),
        Row("audio 22.05+48 kHz: one decode, resampled twice", each(lambda p: audio_per_rate(p, (22050, 48000), True))),
        Row("clean: fast before (luma + OpenCV pyramid)", stage_runner(rows, BEFORE), BEFORE),
        Row("clean: swscale fast_bilinear gray", stage_runner(rows, replace(BEFORE, fast_scaler="fast_bilinear")),
            replace(BEFORE, fast_scaler="fast_bilinear")),
        Row("clean: swscale area gray", stage_runner(rows, replace(BEFORE, fast_scaler="area")),
            replace(BEFORE, fast_scaler="area")),
        Row("clean: skip_loop_filter + swscale fast_bilinear",
            stage_runner(rows, AVAlignConfig(fast_scaler="fast_bilinear")), AVAlignConfig(fast_scaler="fast_bilinear")),
        Row("clean: defaults, 2 FFmpeg threads", stage_runner(rows, default, threads=2), default),
        Row("clean: + skip_loop_filter (the defaults)", stage_runner(rows, default), default),
    ]


def generated_clips(folder: Path) -> list[Path]:
    """Event clips made here (H.264 with deblocking, B-frames): aligned, shifted, still, odd rates."""
    times = (1.0, 2.2, 3.0, 4.4, 5.2)
    specs = [("aligned25", dict(fps=25.0)), ("shifted25", dict(fps=25.0, audio_shift_s=0.5)),
             ("aligned30", dict(fps=30.0, size=(320, 240))), ("shifted30", dict(fps=30.0, audio_shift_s=0.3)),
             ("aligned1496", dict(fps=14.96)), ("still", dict(fps=25.0, motion=False))]
    return [write_event_clip(folder / f"{name}.mp4", duration_s=6.0, event_times=times, **kw).path
            for name, kw in specs]


def decisions(rows: list[Row], real_ref: list[float], gen_paths: list[Path], threshold: float) -> dict[str, str]:
    """Per clean row: keep/drop equal to reference on real + generated clips, and max |score - before|."""
    gen_ref = [score_clip(p, AVAlignConfig(mode="reference")).score for p in gen_paths]
    before = next(r for r in rows if r.config == BEFORE)
    before_gen = [score_clip(p, BEFORE).score for p in gen_paths]
    out = {}
    for row in rows:
        if row.config is None:
            continue
        gen = [score_clip(p, row.config).score for p in gen_paths]
        same_real = sum((a > threshold) == (b > threshold) for a, b in zip(row.scores, real_ref))
        same_gen = sum((a > threshold) == (b > threshold) for a, b in zip(gen, gen_ref))
        delta = max(abs(a - b) for a, b in zip(row.scores + gen, before.scores + before_gen))
        ok = same_real == len(real_ref) and same_gen == len(gen_ref) and delta <= TOLERANCE
        out[row.name] = (f"{same_real}/{len(real_ref)} + {same_gen}/{len(gen_ref)}  {delta:5.3f}  "
                         f"{'pass' if ok else 'FAIL'}")
    return out


def print_table(rows: list[Row], checks: dict[str, str], n_clips: int, video_s: float, repeat: int) -> float:
    base = rows[0]
    wall0, cpu0 = min(base.walls), min(base.cpus)
    print(f"{n_clips} real VGGSound clips ({video_s:.1f} s of video), fastest of {repeat} interleaved passes, "
          f"one process; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'option':52s} {'wall s':>7s} {'cpu s':>6s} {'wall x':>6s} {'cpu x':>6s}  same keep/drop  "
          f"max|d|  metric (tol {TOLERANCE})")
    for row in rows:
        wall, cpu = min(row.walls), min(row.cpus)
        print(f"{row.name:52s} {wall:7.2f} {cpu:6.2f} {wall / wall0:6.2f} {cpu / cpu0:6.2f}  {checks.get(row.name, '')}")
    goal = rows[-1]
    ratio = min(goal.walls) / wall0
    print(f"\nclean stage (defaults) / decode-only baseline: {ratio:.2f}x wall, "
          f"{min(goal.cpus) / cpu0:.2f}x CPU   (goal <= {GOAL}x, stretch < 1.0x)")
    return ratio


def end_to_end(workers: int, n_clips: int, video_s: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-clean-"))
    try:
        from pipeline.clean import main as clean_main

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        code = clean_main(["--dataset", "vggsound", "--root", str(REAL), "--out", str(tmp / "out"),
                           "--clap-model", "none", "--workers", str(workers), "--batch-size", "1"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        assert code == 0
        print(f"\npipeline.clean --workers {workers} (process pool, start-up included): "
              f"{wall:.2f} s wall, {n_clips / wall:.2f} clips/s, {video_s / cpu:.1f} video-seconds per CPU-second")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-e2e", action="store_true", help="skip the pipeline.clean end-to-end run")
    args = p.parse_args()

    limit_native_threads(1)  # every pass on one core, as one worker of the clean runner has
    warm_up()
    rows = [r for r in vggsound_rows(REAL / "vggsound.csv", REAL / "video") if not r["status"]]
    paths = [r["video_path"] for r in rows]
    published = json.loads((REAL / "av_align_reference.json").read_text())
    real_ref = [published[Path(p).name]["score"] for p in paths]
    table = build_rows(rows, paths)
    for row in table:  # first use of each decoder and stage outside the timing
        row.run()
    for _ in range(max(1, args.repeat)):
        for row in table:
            row.time()
    video_s = sum(DecodeScoreStage(CleanStageConfig()).process_row(dict(r))["duration_s"] for r in rows)
    with tempfile.TemporaryDirectory(prefix="bench-clean-gen-") as tmp:
        checks = decisions(table, real_ref, generated_clips(Path(tmp)), FilterConfig().av_align_min)
    ratio = print_table(table, checks, len(paths), video_s, args.repeat)
    if not args.skip_e2e:
        end_to_end(args.workers, len(paths), video_s)
    return 0 if ratio <= GOAL and all(c.endswith("pass") for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
