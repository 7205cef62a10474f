"""Synthetic clips with known ground truth: the one generator tests, benchmarks and the sample use.

A clip shows a bright square that stands still and jumps to a new place exactly on the frame whose
presentation time is an event time, and its audio is a steady mains hum (120 Hz at -50 dBFS RMS, so the clip is not "silent" by the
curation rules, as real recordings never are; being steady, it adds no onset) with a sharp click
starting exactly at that time (plus an optional shift). Audio is stored losslessly (ALAC in mp4/mov, FLAC in mkv)
so there is no encoder priming: audio sample 0 is time 0, the time of the first video frame.
WebM uses VP9 + Opus, whose pre-skip FFmpeg removes on decode. The bytes depend only on the
arguments (single-threaded encoders, bit-exact container), not on the machine.

``pipeline.sample`` lays such clips out as whole datasets (docs/architecture.md).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import cv2
import numpy as np

from core.mux import AudioTrack, VideoTrack, mux

DEFAULT_EVENT_TIMES = (1.0, 2.6, 4.8, 6.2, 8.4)  # irregular: no shift maps the train onto itself

_CLICK_S = 0.025  # length of one click
_CLICK_TAU_S = 0.004  # its exponential decay
_CLICK_PEAK = 0.8
_HUM_HZ, _HUM_DBFS = 120.0, -50.0  # the steady bed under the clicks: above the -60 dBFS near-silence level
_VFR_TICK = Fraction(1, 90000)  # time base of variable-rate mp4 video
_MS = Fraction(1, 1000)  # Matroska/WebM store timestamps in milliseconds
_COLOURS = [(240, 240, 230), (250, 220, 120), (140, 230, 250), (250, 170, 200)]  # bright: luma > 170

# container suffix -> (video codec, audio codec, audio sample format)
_CODECS = {
    ".mp4": ("libx264", "alac", "s16p"),
    ".mov": ("libx264", "alac", "s16p"),
    ".mkv": ("libx264", "flac", "s16"),
    ".webm": ("libvpx-vp9", "libopus", "s16"),
}
_VIDEO_OPTIONS = {
    # one thread: x264/libvpx output then depends only on the input, not on the machine's core count.
    # x264 "veryfast" still writes B-frames, so decoders must reorder by pts as with real downloads.
    "libx264": {"crf": "20", "threads": "1", "preset": "veryfast"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0", "threads": "1"},
}


@dataclass(frozen=True)
class EventClip:
    """What was written: event times are the exact presentation times (seconds from file start)."""

    path: Path
    event_times: tuple[float, ...]  # video: frames on which the square jumps
    audio_event_times: tuple[float, ...]  # audio: first sample of each click (event + shift)
    fps: float  # nominal frame rate (0 for audio-only files)
    duration_s: float
    sample_rate: int  # 0 for video-only files


def write_event_clip(path: str | Path, *, duration_s: float = 10.0, fps: float | Fraction = 25.0,
                     size: tuple[int, int] = (160, 120), event_times: Sequence[float] = DEFAULT_EVENT_TIMES,
                     audio_shift_s: float = 0.0, sample_rate: int = 44100, motion: bool = True,
                     sound: bool = True, seed: int = 0, fps_is_variable: bool = False) -> EventClip:
    """Write a clip whose square jumps at ``event_times`` and whose clicks start at ``event + audio_shift_s``.

    Event times are snapped to the nearest frame time (returned in ``EventClip.event_times``);
    they must be after the first frame and at least two frames apart, so each jump is its own
    peak of motion. ``motion=False`` keeps the square still (``event_times`` comes back empty),
    ``sound=False`` writes digital silence (``audio_event_times`` comes back empty). The container
    follows the suffix (.mp4/.mov/.mkv/.webm); mkv/webm report times rounded to their 1 ms tick.
    """
    return _write(Path(path), duration_s=duration_s, fps=fps, size=size, event_times=event_times,
                  audio_shift_s=audio_shift_s, sample_rate=sample_rate, motion=motion, sound=sound,
                  seed=seed, fps_is_variable=fps_is_variable, with_video=True, with_audio=True)


def write_video_only(path: str | Path, *, duration_s: float = 10.0, fps: float | Fraction = 25.0,
                     size: tuple[int, int] = (160, 120), event_times: Sequence[float] = DEFAULT_EVENT_TIMES,
                     motion: bool = True, seed: int = 0, fps_is_variable: bool = False) -> EventClip:
    """The same video as ``write_event_clip`` with no audio stream at all (``no_audio_stream``)."""
    return _write(Path(path), duration_s=duration_s, fps=fps, size=size, event_times=event_times,
                  audio_shift_s=0.0, sample_rate=0, motion=motion, sound=False, seed=seed,
                  fps_is_variable=fps_is_variable, with_video=True, with_audio=False)


def write_audio_only(path: str | Path, *, duration_s: float = 10.0, event_times: Sequence[float] = DEFAULT_EVENT_TIMES,
                     sample_rate: int = 44100, sound: bool = True, seed: int = 0) -> EventClip:
    """Clicks at ``event_times`` (snapped to a 25 fps grid) in a file with no video stream (``no_video_stream``)."""
    return _write(Path(path), duration_s=duration_s, fps=25.0, size=(160, 120), event_times=event_times,
                  audio_shift_s=0.0, sample_rate=sample_rate, motion=False, sound=sound, seed=seed,
                  fps_is_variable=False, with_video=False, with_audio=True)


_SOUNDFILE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def write_audio_file(path: str | Path, *, duration_s: float = 10.0,
                     event_times: Sequence[float] = DEFAULT_EVENT_TIMES, sample_rate: int = 44100,
                     sound: bool = True, seed: int = 0) -> EventClip:
    """A plain audio file (.wav, .flac, .ogg), as audio corpora ship them: the hum and a click starting
    exactly on each event time (rounded to a sample); ``sound=False`` writes digital silence."""
    import soundfile as sf

    path = Path(path)
    if path.suffix.lower() not in _SOUNDFILE_FORMATS:
        raise ValueError(f"unsupported audio file {path.suffix!r}: use one of {', '.join(_SOUNDFILE_FORMATS)}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sample_rate))
    pcm = np.zeros(n, np.float32)
    starts = [int(round(t * sample_rate)) for t in event_times if 0 <= t < duration_s] if sound else []
    if sound:
        pcm += (np.sin(2 * np.pi * _HUM_HZ * np.arange(n) / sample_rate) * np.sqrt(2.0)
                * 10.0 ** (_HUM_DBFS / 20.0)).astype(np.float32)
        click = _click(sample_rate, rng)
        for s in starts:
            pcm[s: s + click.size] += click[: n - s]
    fmt, subtype = _SOUNDFILE_FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(pcm, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
    return EventClip(path=path, event_times=(), audio_event_times=tuple(s / sample_rate for s in starts), fps=0.0,
                     duration_s=float(duration_s), sample_rate=sample_rate)


def truncate_file(path: str | Path, fraction: float = 0.5) -> int:
    """Cut a file to ``fraction`` of its bytes, like an interrupted download; returns the new size."""
    p = Path(path)
    size = int(p.stat().st_size * fraction)
    os.truncate(p, size)
    return size


def _as_fraction(fps: float | Fraction) -> Fraction:
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _frame_times(n: int, rate: Fraction, variable: bool, rng: np.random.Generator) -> list[Fraction]:
    """Presentation time of every frame as given to the encoder (exact, on the encoder's time base)."""
    times = []
    for i in range(n):
        jitter = Fraction(0) if (not variable or i == 0) else Fraction(int(rng.integers(-30, 31)), 100)
        t = (i + jitter) / rate  # |jitter| <= 0.3 frame keeps frames in order and >= 0.4 frame apart
        times.append(_round_half_up(t / _VFR_TICK) * _VFR_TICK if variable else t)
    return times


def _stored(t: Fraction, tick: Fraction | None) -> Fraction:
    """The time the muxer writes: Matroska rounds every timestamp to its millisecond tick."""
    return t if tick is None else _round_half_up(t / tick) * tick


def _snap_events(event_times: Sequence[float], times: list[Fraction], duration_s: float) -> list[int]:
    """Frame index of each event; an event must move a frame that has a predecessor."""
    grid = np.array([float(t) for t in times])
    frames: list[int] = []
    for t in sorted(float(x) for x in event_times):
        k = int(np.argmin(np.abs(grid - t)))
        if not 0.0 < t < duration_s or k < 1:
            raise ValueError(f"event time {t:.3f}s is not inside the video after its first frame "
                             f"(duration {duration_s:g}s); pass event_times that fit")
        if frames and k - frames[-1] < 2:
            raise ValueError(f"event time {t:.3f}s is less than two frames after the previous event")
        frames.append(k)
    return frames


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Dark, static, low-contrast texture: something for the eye and the codec, nothing that moves."""
    noise = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 3.0)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    ramp = np.linspace(0.0, 10.0, w, dtype=np.float32)[None, :]
    luma = 26.0 + 8.0 * noise + ramp
    rgb = np.stack([luma * 0.9, luma, luma * 1.15], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _positions(n_jumps: int, w: int, h: int, side: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners: each jump lands at least 1.5 sides away, so old and new squares never overlap."""
    def draw():
        return int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))

    pos = [draw()]
    for _ in range(n_jumps):
        for _attempt in range(1000):
            cand = draw()
            if math.dist(cand, pos[-1]) >= 1.5 * side:
                break
        else:  # a frame too small to jump far: mirror the square to the opposite corner
            cand = (w - side - pos[-1][0], h - side - pos[-1][1])
        pos.append(cand)
    return pos


def _click(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A one-sided, exponentially decaying noise burst (an impact): strong low frequencies make its
    onset a step that stays within a sample of the event after resampling to 16, 22.05 or 48 kHz."""
    n = max(1, int(round(_CLICK_S * sr)))
    env = np.exp(-np.arange(n) / (_CLICK_TAU_S * sr))
    texture = rng.uniform(0.5, 1.0, n) * rng.choice([-1.0, 1.0], n)
    return (_CLICK_PEAK * env * (0.7 + 0.3 * texture)).astype(np.float32)


def _check_args(suffix: str, duration_s: float, size: tuple[int, int], sample_rate: int, with_audio: bool) -> None:
    if suffix not in _CODECS:
        raise ValueError(f"unsupported container {suffix!r}: use one of {', '.join(_CODECS)}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    w, h = size
    if w % 2 or h % 2 or w < 16 or h < 16:
        raise ValueError(f"size must be even and at least 16x16 (yuv420p), got {size}")
    if with_audio and _CODECS[suffix][1] == "libopus" and sample_rate != 48000:
        raise ValueError("WebM audio is Opus, which needs sample_rate=48000")


def _click_starts(video_events: Sequence[float], shift_s: float, sr: int, click_n: int, n_samples: int) -> list[int]:
    """First sample of each click; every click must fit inside the audio."""
    starts = []
    for t in video_events:
        s = int(round((t + shift_s) * sr))
        if s < 0 or s + click_n > n_samples:
            raise ValueError(f"click for event {t:.3f}s shifted by {shift_s:+.3f}s falls outside the audio")
        starts.append(s)
    return starts


def _frames(times: list[Fraction], event_frames: list[int], motion: bool, size: tuple[int, int],
            rng: np.random.Generator):
    """``(yuv420p image, time)`` per frame: the square moves on each event frame."""
    w, h = size
    side = max(6, (min(w, h) // 6) // 2 * 2)
    bg = _background(w, h, rng)
    spots = _positions(len(event_frames) if motion else 0, w, h, side, rng)
    colour = np.array(_COLOURS[int(rng.integers(len(_COLOURS)))], np.uint8)

    def image(jump: int) -> np.ndarray:
        """The picture after ``jump`` jumps, converted to yuv420p once (swscale is the slow part)."""
        x, y = spots[min(jump, len(spots) - 1)]
        img = bg.copy()
        img[y: y + side, x: x + side] = colour
        return av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p").to_ndarray()

    jumps, current, img = 0, -1, None
    for i, t in enumerate(times):
        while motion and jumps < len(event_frames) and event_frames[jumps] <= i:
            jumps += 1
        if jumps != current:
            img, current = image(jumps), jumps
        yield img, t


def _write(path: Path, *, duration_s, fps, size, event_times, audio_shift_s, sample_rate, motion, sound, seed,
           fps_is_variable, with_video, with_audio) -> EventClip:
    suffix = path.suffix.lower()
    _check_args(suffix, duration_s, size, sample_rate, with_audio)
    vcodec, acodec, afmt = _CODECS[suffix]
    rng = np.random.default_rng(seed)
    rate = _as_fraction(fps)
    tick = _MS if suffix in (".mkv", ".webm") else None
    n_frames = max(1, math.ceil(duration_s * rate - Fraction(1, 10**6)))
    times = _frame_times(n_frames, rate, fps_is_variable, rng)
    event_frames = _snap_events(event_times, times, duration_s)
    video_events = tuple(float(_stored(times[k], tick)) for k in event_frames)

    n_samples = int(round(duration_s * sample_rate)) if with_audio else 0
    click = _click(sample_rate, rng) if with_audio else np.zeros(0, np.float32)
    audio_starts = _click_starts(video_events, audio_shift_s, sample_rate, click.size, n_samples) if with_audio else []
    pcm = np.zeros(n_samples, np.float32)
    if sound:
        hum = np.sin(2 * np.pi * _HUM_HZ * np.arange(n_samples) / sample_rate)
        pcm += (hum * np.sqrt(2.0) * 10.0 ** (_HUM_DBFS / 20.0)).astype(np.float32)
        for s in audio_starts:
            pcm[s: s + click.size] += click

    video = audio = None
    if with_video:
        video = VideoTrack(frames=_frames(times, event_frames, motion, size, rng), size=size, rate=rate,
                           codec=vcodec, options=_VIDEO_OPTIONS[vcodec], frame_format="yuv420p",
                           time_base=_VFR_TICK if fps_is_variable else 1 / rate)
    if with_audio:
        audio = AudioTrack(pcm=pcm[None, :], sample_rate=sample_rate, codec=acodec, sample_format=afmt)
    mux(path, video, audio, options={"fflags": "+bitexact"})  # bitexact: no random ids or dates

    return EventClip(
        path=path,
        event_times=video_events if (motion and with_video) else (),
        audio_event_times=tuple(s / sample_rate for s in audio_starts) if (sound and with_audio) else (),
        fps=float(rate) if with_video else 0.0,
        duration_s=float(duration_s),
        sample_rate=sample_rate if with_audio else 0,
    )
