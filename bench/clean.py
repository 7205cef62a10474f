"""Clean-stage throughput against a decode-only baseline measured in the same run.

Baseline: PyAV demuxes and decodes every video and audio frame of each clip (no conversion, no
scoring): the floor no pipeline can go below. Then the clean stage (``DecodeScoreStage``: decode
to small greyscale + audio resampling + AV-Align in fast mode, CLAP off) on the same clips,
in-process, and finally ``pipeline.clean`` end to end with the local process pool. Goal: clean
without CLAP costs at most 3x the decode-only time.

    python bench/clean.py [--repeat 2] [--workers 2]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filters.av_align import warm_up  # noqa: E402
from pipeline.clean_stages import CleanStageConfig, DecodeScoreStage  # noqa: E402
from pipeline.manifest import vggsound_rows  # noqa: E402
from core.native_threads import limit_native_threads  # noqa: E402

REAL = ROOT / "tests" / "data" / "vggsound"


def decode_only(path: str) -> None:
    with av.open(path) as c:
        streams = list(c.streams.video[:1]) + list(c.streams.audio[:1])
        if c.streams.video:  # as core.decode does in a worker that owns one core
            c.streams.video[0].thread_type = "AUTO"
            c.streams.video[0].thread_count = 1
        for packet in c.demux(streams):
            for _ in packet.decode():
                pass


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    limit_native_threads(1)  # both passes on one core, as one worker of the clean runner has
    warm_up()
    rows = [r for r in vggsound_rows(REAL / "vggsound.csv", REAL / "video") if not r["status"]]
    paths = [r["video_path"] for r in rows]

    t0 = time.perf_counter()
    for _ in range(args.repeat):
        for path in paths:
            decode_only(path)
    t_decode = (time.perf_counter() - t0) / args.repeat

    stage = DecodeScoreStage(CleanStageConfig())
    stage.setup()
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        out = stage.process_batch([dict(r) for r in rows])
    t_clean = (time.perf_counter() - t0) / args.repeat
    failed = [r for r in out if r["status"] != "ok"]
    assert not failed, failed
    video_s = sum(r["duration_s"] for r in out)

    print(f"{len(paths)} real VGGSound clips ({video_s:.1f} s of video), mean of {args.repeat} passes, one process")
    print(f"  decode-only baseline (PyAV, every frame) : {t_decode:7.2f} s  {len(paths) / t_decode:6.2f} clips/s")
    print(f"  clean stage (decode + AV-Align fast)     : {t_clean:7.2f} s  {len(paths) / t_clean:6.2f} clips/s")
    print(f"  clean / decode-only                      : {t_clean / t_decode:7.2f}x   (goal <= 3x)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-clean-"))
    try:
        from pipeline.clean import main as clean_main

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        code = clean_main(["--dataset", "vggsound", "--root", str(REAL), "--out", str(tmp / "out"),
                           "--clap-model", "none", "--workers", str(args.workers), "--batch-size", "1"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        assert code == 0
        print(f"\npipeline.clean --workers {args.workers} (process pool, start-up included): "
              f"{wall:.2f} s wall, {len(paths) / wall:.2f} clips/s, "
              f"{video_s / cpu:.1f} video-seconds per CPU-second")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
