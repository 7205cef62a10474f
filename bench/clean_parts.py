"""Where the clean stage's CPU goes beyond decoding, part by part, with the options of each part
measured on the frames and audio the stage decodes (``bench/clean.py`` prints it after its table).

Each part is timed alone (CPU seconds, fastest of ``repeat`` passes over the five real clips) and
divided by the decode-only baseline of the same run, so the parts add up to the clean stage's
ratio. The optical-flow options are scored too and go through the same metric guard as the
decode options: keep/drop equal to reference mode's (both revisions) on the real and generated
clips, every score within the tolerance of fast mode before the decode options.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import cv2
import numpy as np

from core.decode import decode
from filters.av_align import (AVAlignConfig, audio_onsets, decode_request_for, reference_audio,
                              score_revisions)
from filters.curation import (VAD_SAMPLE_RATE, VAD_WINDOW, CurationConfig, SpeechDetector, scene_cut_times,
                              silence_scores)

PUBLISHED = AVAlignConfig().farneback  # (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)


def farneback(**change: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    names = ("pyr_scale", "levels", "winsize", "iterations", "poly_n", "poly_sigma", "flags")
    params = tuple(change.get(n, v) for n, v in zip(names, PUBLISHED))
    return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, *params)


def dis_ultrafast() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    return lambda a, b: dis.calc(a, b, None)


# name -> (long side of the frames in px, flow between two frames); the first is fast mode's
FLOW_OPTIONS: dict[str, tuple[int, Callable]] = {
    "flow: Farneback as published, 64 px (the default)": (64, farneback()),
    "flow: Farneback, 2 iterations": (64, farneback(iterations=2)),
    "flow: Farneback, 1 iteration": (64, farneback(iterations=1)),
    "flow: Farneback, winsize 9": (64, farneback(winsize=9)),
    "flow: Farneback on 48 px frames": (48, farneback()),
    "flow: DIS ultrafast, 64 px": (64, dis_ultrafast()),
    "flow: DIS ultrafast on 128 px frames": (128, dis_ultrafast()),
}


def motion(gray: np.ndarray, flow: Callable, scale: float) -> np.ndarray:
    """Mean flow magnitude per frame in native px (first value duplicated), as AV-Align computes it."""
    values = np.empty(len(gray))
    for i in range(1, len(gray)):
        f = flow(gray[i - 1], gray[i])
        values[i] = cv2.mean(cv2.magnitude(f[..., 0], f[..., 1]))[0] / scale
    values[0] = values[1]
    return values


@dataclass
class Clip:
    """One clip as the clean stage decodes it, at every frame size a flow option needs."""

    fps: float
    onsets: np.ndarray
    audio16k: np.ndarray
    audio_native: np.ndarray  # [C, n] at native_sr
    native_sr: int
    frames: dict[int, tuple[np.ndarray, float]]  # long side -> (gray frames, decoded/native scale)
    times: np.ndarray


def load_clips(paths) -> list[Clip]:
    out = []
    for path in paths:
        frames, clip = {}, None
        for side in sorted({side for side, _ in FLOW_OPTIONS.values()}):
            req = replace(decode_request_for(AVAlignConfig(fast_max_side=side)), audio_rates=(VAD_SAMPLE_RATE,))
            clip = decode(str(path), req)
            frames[side] = (clip.gray, clip.gray_scale)
        y = reference_audio(clip.audio_native, clip.native_sr, AVAlignConfig().sample_rate)
        out.append(Clip(clip.video_fps, audio_onsets(y, AVAlignConfig().sample_rate), clip.audio[VAD_SAMPLE_RATE],
                        clip.audio_native, clip.native_sr, frames, clip.gray_times))
    return out


def flow_scores(clips: list[Clip], flow: tuple[int, Callable]) -> list[tuple[float, float]]:
    """(2025, 2023) AV-Align of each clip with this flow option."""
    side, fn = flow
    out = []
    for c in clips:
        gray, scale = c.frames[side]
        r = score_revisions(c.onsets, motion(gray, fn, scale), c.fps)
        out.append((r["2025"].score, r["2023"].score))
    return out


def scene_per_frame(c: Clip, config: CurationConfig) -> list[float]:
    """PySceneDetect's ContentDetector frame by frame, as the scene cuts were computed before."""
    from scenedetect import ContentDetector, FrameTimecode

    gray = c.frames[64][0]
    detector = ContentDetector(threshold=config.scene_threshold, luma_only=True,
                               min_scene_len=max(1, int(round(config.scene_min_len_s * c.fps))))
    cuts = [cut for i, f in enumerate(gray)
            for cut in detector.process_frame(FrameTimecode(i, c.fps), cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))]
    return [round(float(c.times[cut.frame_num]), 4) for cut in cuts]


def vad_streaming(clips: list[Clip], model) -> list[list[float]]:
    """Silero's streaming model on all clips as one batch, one call per 32 ms step (the VAD before)."""
    import torch

    longest = max(c.audio16k.size for c in clips)
    batch = torch.zeros(len(clips), longest)
    for row, c in enumerate(clips):
        batch[row, : c.audio16k.size] = torch.from_numpy(c.audio16k)
    with torch.inference_mode():
        probs = model.audio_forward(batch, VAD_SAMPLE_RATE)
    return [probs[row, : -(-c.audio16k.size // VAD_WINDOW)].tolist() for row, c in enumerate(clips)]


def part_runs(clips: list[Clip], paths) -> dict[str, Callable[[], object]]:
    """Every part of the clean stage beyond the video decode, and each part's options."""
    from silero_vad import load_silero_vad

    config, av_cfg = CurationConfig(), AVAlignConfig()
    speech, streaming = SpeechDetector(config), load_silero_vad()
    speech.load()
    audio_req = replace(decode_request_for(av_cfg), need_video=False, gray=False, audio_rates=(VAD_SAMPLE_RATE,))
    runs: dict[str, Callable[[], object]] = {
        "audio: decode once, native + 16 kHz": lambda: [decode(str(p), audio_req) for p in paths],
        "AV-Align: 22.05 kHz mix + onsets": lambda: [audio_onsets(
            reference_audio(c.audio_native, c.native_sr, av_cfg.sample_rate), av_cfg.sample_rate) for c in clips],
    }
    for name, flow in FLOW_OPTIONS.items():
        runs[name] = lambda flow=flow: [motion(c.frames[flow[0]][0], flow[1], 1.0) for c in clips]
    runs["flow: Farneback as published, 2 OpenCV threads"] = lambda: _threads(
        2, lambda: [motion(c.frames[64][0], farneback(), 1.0) for c in clips])
    runs["VAD: Silero streaming model, one batch (before)"] = lambda: vad_streaming(clips, streaming)
    runs["VAD: Silero sequence model (now)"] = lambda: speech.scores_batch([c.audio16k for c in clips])
    runs["scene cuts: PySceneDetect frame by frame (before)"] = lambda: [scene_per_frame(c, config) for c in clips]
    runs["scene cuts: all frames at once (now)"] = lambda: [
        scene_cut_times(c.frames[64][0], c.times, c.fps, config) for c in clips]
    runs["silence levels"] = lambda: [silence_scores(c.audio16k, VAD_SAMPLE_RATE, config.silent_frame_db)
                                      for c in clips]
    return runs


def _threads(n: int, fn: Callable[[], object]) -> object:
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        return fn()
    finally:
        cv2.setNumThreads(before)


def time_parts(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Fastest CPU seconds of each part over ``repeat`` interleaved passes (first use untimed)."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(max(1, repeat)):
        for name, fn in runs.items():
            t = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t)
    return best


def same_outputs(clips: list[Clip], runs: dict[str, Callable[[], object]]) -> dict[str, bool]:
    """The curation parts that were changed give what they gave before: the same cuts, the same spans."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    scenes = runs["scene cuts: PySceneDetect frame by frame (before)"]() == runs["scene cuts: all frames at once (now)"]()
    spans = []
    for c, probs in zip(clips, runs["VAD: Silero streaming model, one batch (before)"]()):
        ts = get_speech_timestamps_from_probs(probs, sampling_rate=VAD_SAMPLE_RATE,
                                              audio_length_samples=c.audio16k.size)
        runs_s = [(t["end"] - t["start"]) / VAD_SAMPLE_RATE for t in ts]
        spans.append(float(max(runs_s, default=0.0)))
    now = [d["speech_run_s"] for d in runs["VAD: Silero sequence model (now)"]()]
    return {"scene cuts": scenes, "VAD": spans == now}
