"""What the curation scores cost next to the decode they share, on real clips, in one run.

    python bench/curation.py [--clips DIR] [--repeat K]

Part 1, for each clip: the clean stage's decode (fast AV-Align frames, native and 16 kHz audio) as the
baseline, then AV-Align fast, Silero VAD, the silence levels and PySceneDetect's cuts on the
decoded frames, each in CPU seconds and as a ratio to the decode measured in the same run (median
of ``--repeat``). Torch and OpenCV run one thread, as in a clean worker.

Part 2 (``--speech``, needs espeak-ng): the VAD's voiced share and longest run on each clip as it
is and with espeak-ng speech mixed in at 20, 10, 0 and -5 dB SNR, and the default rule's verdict.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.decode import decode  # noqa: E402
from filters.av_align import AVAlignConfig, decode_request_for, score_decoded, warm_up  # noqa: E402
from filters.curation import (VAD_SAMPLE_RATE, CurationConfig, SpeechDetector, scene_cut_times,  # noqa: E402
                              silence_scores)
from dataclasses import replace  # noqa: E402

CLIPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "vggsound" / "video"


def cpu_time(fn, repeat: int):
    """(last result, median CPU seconds) of ``fn()`` over ``repeat`` calls."""
    times, result = [], None
    for _ in range(repeat):
        t = time.process_time()
        result = fn()
        times.append(time.process_time() - t)
    return result, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=Path, default=CLIPS)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--speech", action="store_true", help="also print the VAD table (needs espeak-ng)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    av_cfg, cfg = AVAlignConfig(), CurationConfig()
    warm_up(av_cfg)
    vad = SpeechDetector(cfg)
    vad.load()
    req = replace(decode_request_for(av_cfg), audio_rates=(VAD_SAMPLE_RATE,))
    parts = ("AV-Align fast", "VAD", "silence", "scene cuts")
    totals = {k: 0.0 for k in ("decode",) + parts}
    batch_audio = []
    print(f"{'clip':26s} {'decode s':>9s} " + " ".join(f"{k:>14s}" for k in parts))
    for path in sorted(args.clips.glob("*.mp4")):
        clip, t_dec = cpu_time(lambda: decode(str(path), req), args.repeat)
        audio = clip.audio[VAD_SAMPLE_RATE]
        batch_audio.append(audio)
        costs = {
            "AV-Align fast": cpu_time(lambda: score_decoded(clip, av_cfg), args.repeat)[1],
            "VAD": cpu_time(lambda: vad.scores(audio), args.repeat)[1],
            "silence": cpu_time(lambda: silence_scores(audio, VAD_SAMPLE_RATE, cfg.silent_frame_db), args.repeat)[1],
            "scene cuts": cpu_time(lambda: scene_cut_times(clip.gray, clip.gray_times, clip.video_fps, cfg),
                                   args.repeat)[1],
        }
        totals["decode"] += t_dec
        for k, v in costs.items():
            totals[k] += v
        print(f"{path.name:26s} {t_dec:9.3f} " + " ".join(f"{costs[k]:7.3f} {costs[k] / t_dec:5.2f}x" for k in parts))
    print(f"{'all clips':26s} {totals['decode']:9.3f} "
          + " ".join(f"{totals[k]:7.3f} {totals[k] / totals['decode']:5.2f}x" for k in parts))
    _, batched = cpu_time(lambda: vad.scores_batch(batch_audio), args.repeat)
    print(f"VAD batched as the clean stage runs it (all {len(batch_audio)} clips in one pass): {batched:.3f} CPU-s "
          f"= {batched / totals['decode']:.2f}x the decode ({totals['VAD'] / batched:.1f}x less than clip by clip)")
    extra = batched + totals["silence"] + totals["scene cuts"]
    print(f"curation scores together (batched VAD): {extra:.3f} CPU-s = {extra / totals['decode']:.2f}x the decode, "
          f"{extra / (totals['decode'] + totals['AV-Align fast']):.2f}x decode + AV-Align fast")
    if args.speech:
        speech_table(sorted(args.clips.glob("*.mp4")), vad)
    return 0


SNRS = (20, 10, 0, -5)
SENTENCE = ("Hello everyone and welcome back to the channel. Today I will show you how to fix a "
            "bicycle tire in less than ten minutes, so let us get started right away.")


def speech_table(paths: list[Path], vad: SpeechDetector) -> None:
    import subprocess
    import tempfile

    import numpy as np
    import pandas as pd
    import soundfile as sf
    import soxr

    from core.decode import DecodeRequest
    from filters.curation import CurationFilters, curation_reasons

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), SENTENCE], check=True, timeout=60)
        x, sr = sf.read(str(wav), dtype="float32")
    speech = soxr.resample(x, sr, VAD_SAMPLE_RATE).astype(np.float32)
    print(f"\nVAD (Silero, threshold {vad.config.vad_threshold}): voiced share / longest run (s) / verdict "
          f"(speech when share > {CurationFilters().speech_share_max} or run > {CurationFilters().speech_run_max_s} s)")
    print(f"{'clip':26s} {'as is':>18s} " + " ".join(f"{f'speech at {snr} dB':>18s}" for snr in SNRS))
    for path in paths:
        a = decode(str(path), DecodeRequest(audio_rates=(VAD_SAMPLE_RATE,), need_video=False)).audio[VAD_SAMPLE_RATE]
        a = a[: 10 * VAD_SAMPLE_RATE]
        clips = [a]
        for snr in SNRS:
            mixed, start = a.copy(), VAD_SAMPLE_RATE
            n = min(speech.size, a.size - start)
            mixed[start:start + n] += np.sqrt(np.mean(a ** 2) / np.mean(speech[:n] ** 2) * 10 ** (snr / 10)) * speech[:n]
            clips.append(mixed)
        scores = vad.scores_batch(clips)
        verdicts = curation_reasons(pd.DataFrame(scores), CurationFilters(), "youtube")
        cells = [f"{s['speech_share']:.2f} {s['speech_run_s']:4.1f} {v or 'keep':>6s}" for s, v in zip(scores, verdicts)]
        print(f"{path.name:26s} " + " ".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
