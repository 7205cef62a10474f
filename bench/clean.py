"""Clean-stage throughput, option by option, against a decode-only baseline measured in the same run.

Baseline: PyAV demuxes and decodes every video and audio frame of each clip the usual way (one
FFmpeg thread, as a worker that owns one core; no conversion, no scoring): what "decode
everything" costs. Each row then runs either a decode-only variant (decoder discard settings,
threads, the fast request's small frames) or the clean stage (``DecodeScoreStage``: decode,
AV-Align fast and the curation scores, CLAP off) with one decode option changed, on the same five
real VGGSound clips, in-process. The rows are interleaved pass by pass, so load on a shared
machine hits them alike, and each row's fastest pass counts (the one least disturbed by other
jobs); CPU time is the steadier figure there, and the goal is checked on it.

Every clean-stage row is checked against the metric: its keep/drop decisions at the AV-Align
threshold must equal reference mode's for both published revisions (the published numbers of the
five real clips, and reference mode run here on generated clips), and its scores must stay within
``TOLERANCE`` of the fast mode before these options. A second table (``clean_parts.py``) times
each part of the stage beyond the video decode alone - audio, onsets, the optical flow and its
options (guarded the same way), the VAD and scene cuts against what they replaced - and adds them
up to the stage's ratio. Then ``pipeline.clean --workers 2`` end to end, as video-seconds per
CPU-second. Goal: the clean stage (default options) within 1.2x of the baseline in CPU time
(stretch: below 1.0x).

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
from filters.av_align import AVAlignConfig, decode_request_for, score_clip, warm_up  # noqa: E402
from filters.rules import FilterConfig  # noqa: E402
from pipeline.clean_stages import CleanStageConfig, DecodeScoreStage  # noqa: E402
from pipeline.manifest import vggsound_rows  # noqa: E402
from core.synth import write_event_clip  # noqa: E402
from clean_parts import FLOW_OPTIONS, flow_scores, load_clips, part_runs, same_outputs, time_parts  # noqa: E402

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
    scores: list[tuple[float, float]] | None = None  # (2025, 2023 revision) per clip

    def time(self) -> None:
        cpu, t0 = time.process_time(), time.perf_counter()
        out = self.run()
        self.walls = (self.walls or []) + [time.perf_counter() - t0]
        self.cpus = (self.cpus or []) + [time.process_time() - cpu]
        if self.config is not None:
            failed = [r for r in out if r["status"] != "ok"]
            assert not failed, failed
            self.scores = [(float(r["av_align_2025"]), float(r["av_align_2023"])) for r in out]


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
        Row("decode only: skip_frame=noref (drops B-frames)", each(lambda p: decode_only(
            p, options={"skip_loop_filter": "all", "skip_frame": "noref"}))),
        Row("decode only: 2 FFmpeg threads", each(lambda p: decode_only(p, threads=2))),
        Row("decode only: the fast request's 64 px luma frames", each(lambda p: decode(p, replace(
            decode_request_for(default), need_audio=False, audio_native=False)))),
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


@dataclass
class Guard:
    """The metric guard: reference decisions and fast mode before the options, real + generated clips."""

    real_ref: list[tuple[float, float]]  # published (2025, 2023) scores of the real clips
    gen_paths: list[Path]
    gen_ref: list[tuple[float, float]]  # reference mode on the generated clips
    real_before: list[tuple[float, float]]
    gen_before: list[tuple[float, float]]
    threshold: float

    @classmethod
    def build(cls, real_ref, before_row: Row, gen_paths: list[Path], threshold: float) -> "Guard":
        both = lambda r: (r.revisions["2025"].score, r.revisions["2023"].score)  # noqa: E731
        gen_ref = [both(score_clip(p, AVAlignConfig(mode="reference"))) for p in gen_paths]
        gen_before = [both(score_clip(p, BEFORE)) for p in gen_paths]
        return cls(real_ref, gen_paths, gen_ref, before_row.scores, gen_before, threshold)

    def check(self, real: list[tuple[float, float]], gen: list[tuple[float, float]]) -> str:
        """Keep/drop equal to reference on real + generated clips (both revisions), and max |score - before|."""
        same = lambda got, ref: sum(all((a > self.threshold) == (b > self.threshold)  # noqa: E731
                                        for a, b in zip(x, y)) for x, y in zip(got, ref))
        same_real, same_gen = same(real, self.real_ref), same(gen, self.gen_ref)
        delta = max(abs(a - b) for x, y in zip(real + gen, self.real_before + self.gen_before) for a, b in zip(x, y))
        ok = same_real == len(real) and same_gen == len(gen) and delta <= TOLERANCE
        return f"{same_real}/{len(real)} + {same_gen}/{len(gen)}  {delta:5.3f}  {'pass' if ok else 'FAIL'}"


def decisions(rows: list[Row], guard: Guard) -> dict[str, str]:
    """Per clean row: the guard on its scores (real clips from the timed passes, generated ones here)."""
    both = lambda r: (r.revisions["2025"].score, r.revisions["2023"].score)  # noqa: E731
    return {row.name: guard.check(row.scores, [both(score_clip(p, row.config)) for p in guard.gen_paths])
            for row in rows if row.config is not None}


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
    ratio = min(goal.cpus) / cpu0
    print(f"\nclean stage (defaults) / decode-only baseline: {min(goal.walls) / wall0:.2f}x wall, "
          f"{ratio:.2f}x CPU   (goal <= {GOAL}x, stretch < 1.0x)")
    return ratio


def print_parts(parts: dict[str, float], cpu0: float, flow_checks: dict[str, str], same: dict[str, bool],
                stage_cpu: float, video_cpu: float) -> None:
    """The clean stage's parts beyond the video decode, each option's CPU and metric check."""
    print(f"\nwhere the clean stage's CPU goes (each part alone, fastest pass, x = of the baseline's {cpu0:.2f} s)")
    print(f"{'part':52s} {'cpu s':>6s} {'cpu x':>6s}  check")
    for name, cpu in parts.items():
        check = flow_checks.get(name, "")
        for part, ok in same.items():
            if name.startswith(part) and "(now)" in name:
                check = f"same {'cuts' if part == 'scene cuts' else 'spans'} as before: {'yes' if ok else 'NO'}"
        print(f"{name:52s} {cpu:6.2f} {cpu / cpu0:6.2f}  {check}")
    used = ["audio: decode once, native + 16 kHz", "AV-Align: 22.05 kHz mix + onsets",
            next(iter(FLOW_OPTIONS)), "VAD: Silero sequence model (now)", "scene cuts: all frames at once (now)",
            "silence levels"]
    total = video_cpu + sum(parts[n] for n in used)
    print(f"sum: the fast request's video decode ({video_cpu / cpu0:.2f}x) + the parts the stage runs = "
          f"{total / cpu0:.2f}x; the clean stage measured {stage_cpu / cpu0:.2f}x")


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
    real_ref = [(published[Path(p).name]["score"], published[Path(p).name]["score_2023"]) for p in paths]
    table = build_rows(rows, paths)
    for row in table:  # first use of each decoder and stage outside the timing
        row.run()
    for _ in range(max(1, args.repeat)):
        for row in table:
            row.time()
    video_s = sum(DecodeScoreStage(CleanStageConfig()).process_row(dict(r))["duration_s"] for r in rows)
    threshold = FilterConfig().av_align_min
    with tempfile.TemporaryDirectory(prefix="bench-clean-gen-") as tmp:
        gen_paths = generated_clips(Path(tmp))
        guard = Guard.build(real_ref, next(r for r in table if r.config == BEFORE), gen_paths, threshold)
        checks = decisions(table, guard)
        real_clips, gen_clips = load_clips(paths), load_clips(gen_paths)
    ratio = print_table(table, checks, len(paths), video_s, args.repeat)
    runs = part_runs(real_clips, paths)
    parts = time_parts(runs, args.repeat)
    flow_checks = {name: guard.check(flow_scores(real_clips, flow), flow_scores(gen_clips, flow))
                   for name, flow in FLOW_OPTIONS.items()}
    cpu = {row.name: min(row.cpus) for row in table}
    print_parts(parts, cpu[table[0].name], flow_checks, same_outputs(real_clips, runs), cpu[table[-1].name],
                cpu["decode only: the fast request's 64 px luma frames"])
    if not args.skip_e2e:
        end_to_end(args.workers, len(paths), video_s)
    return 0 if ratio <= GOAL and all(c.endswith("pass") for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
