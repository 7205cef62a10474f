"""Synthetic datasets with known ground truth, so every command runs on a fresh machine.

A clip shows a bright square that stands still and jumps to a new place exactly on the frame whose
presentation time is an event time, and its audio is silence with a sharp click starting exactly
at that time (plus an optional shift). Audio is stored losslessly (ALAC in mp4/mov, FLAC in mkv)
so there is no encoder priming: audio sample 0 is time 0, the time of the first video frame.
WebM uses VP9 + Opus, whose pre-skip FFmpeg removes on decode.

``generate`` lays such clips out as a VGGSound root (``vggsound.csv`` + ``video/``) or a YouTube
corpus folder, together with the broken inputs the pipeline must survive, and writes
``sample_manifest.json`` saying what every row and file is and what decoding it must give.

    python -m pipeline.sample --out data/vggsound [--kind vggsound|youtube] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import av
import cv2
import numpy as np

from core.cli_config import add_config_args, from_args
from core.config import DEFAULT_SIGNAL, DecodeLimits

MANIFEST_NAME = "sample_manifest.json"
DEFAULT_EVENT_TIMES = (1.0, 2.6, 4.8, 6.2, 8.4)  # irregular: no shift maps the train onto itself

_CLICK_S = 0.025  # length of one click
_CLICK_TAU_S = 0.004  # its exponential decay
_CLICK_PEAK = 0.8
_VFR_TICK = Fraction(1, 90000)  # time base of variable-rate mp4 video
_MS = Fraction(1, 1000)  # Matroska/WebM store timestamps in milliseconds
_COLOURS = [(240, 240, 230), (250, 220, 120), (140, 230, 250), (250, 170, 200)]  # bright: luma > 170
_N_VGG_IDS = 30  # ids drawn per VGGSound sample (more than its rows need)
_YT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

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


# ----------------------------------------------------------------------------- clip writers


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


def _write(path: Path, *, duration_s, fps, size, event_times, audio_shift_s, sample_rate, motion, sound, seed,
           fps_is_variable, with_video, with_audio) -> EventClip:
    suffix = path.suffix.lower()
    if suffix not in _CODECS:
        raise ValueError(f"unsupported container {suffix!r}: use one of {', '.join(_CODECS)}")
    vcodec, acodec, afmt = _CODECS[suffix]
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    w, h = size
    if w % 2 or h % 2 or w < 16 or h < 16:
        raise ValueError(f"size must be even and at least 16x16 (yuv420p), got {size}")
    if with_audio and acodec == "libopus" and sample_rate != 48000:
        raise ValueError("WebM audio is Opus, which needs sample_rate=48000")

    rng = np.random.default_rng(seed)
    rate = _as_fraction(fps)
    tick = _MS if suffix in (".mkv", ".webm") else None
    n_frames = max(1, math.ceil(duration_s * rate - Fraction(1, 10**6)))
    times = _frame_times(n_frames, rate, fps_is_variable, rng)
    event_frames = _snap_events(event_times, times, duration_s)
    video_events = tuple(float(_stored(times[k], tick)) for k in event_frames)

    n_samples = int(round(duration_s * sample_rate)) if with_audio else 0
    click = _click(sample_rate, rng) if with_audio else np.zeros(0, np.float32)
    audio_starts = []
    if with_audio:
        for t in video_events:
            s = int(round((t + audio_shift_s) * sample_rate))
            if s < 0 or s + click.size > n_samples:
                raise ValueError(f"click for event {t:.3f}s shifted by {audio_shift_s:+.3f}s falls outside the audio")
            audio_starts.append(s)

    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w", options={"fflags": "+bitexact"})  # no random ids or dates
    try:
        vstream = astream = None
        if with_video:
            vstream = container.add_stream(vcodec, rate=rate)
            vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
            vstream.options = dict(_VIDEO_OPTIONS[vcodec])
            video_tb = _VFR_TICK if fps_is_variable else 1 / rate
            vstream.codec_context.time_base = video_tb
        if with_audio:
            astream = container.add_stream(acodec, rate=sample_rate, layout="mono")
            astream.format = afmt

        pcm = np.zeros(n_samples, np.float32)
        if sound:
            for s in audio_starts:
                pcm[s: s + click.size] += click
        pcm16 = np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)

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

        audio_next = 0  # next sample to encode: audio is muxed up to the time of each video frame

        def feed_audio(until: int) -> None:
            nonlocal audio_next
            while astream is not None and audio_next < min(until, n_samples):
                end = min(audio_next + 1024, n_samples)
                frame = av.AudioFrame.from_ndarray(pcm16[None, audio_next:end], format="s16p", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = audio_next
                frame.time_base = Fraction(1, sample_rate)
                for packet in astream.encode(frame):
                    container.mux(packet)
                audio_next = end

        if vstream is not None:
            jumps, current, img = 0, -1, None
            for i, t in enumerate(times):
                while motion and jumps < len(event_frames) and event_frames[jumps] <= i:
                    jumps += 1
                if jumps != current:
                    img, current = image(jumps), jumps
                feed_audio(math.floor(t * sample_rate) if astream is not None else 0)
                frame = av.VideoFrame.from_ndarray(img, format="yuv420p")
                frame.pts = int(t / video_tb)
                frame.time_base = video_tb
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        feed_audio(n_samples)
        if astream is not None:
            for packet in astream.encode():
                container.mux(packet)
    except BaseException:
        container.close()
        path.unlink(missing_ok=True)  # never leave a half-written clip that looks like a real one
        raise
    container.close()

    return EventClip(
        path=path,
        event_times=video_events if (motion and with_video) else (),
        audio_event_times=tuple(s / sample_rate for s in audio_starts) if (sound and with_audio) else (),
        fps=float(rate) if with_video else 0.0,
        duration_s=float(duration_s),
        sample_rate=sample_rate if with_audio else 0,
    )


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class SampleConfig:
    """What ``python -m pipeline.sample`` generates."""

    kind: Literal["vggsound", "youtube"] = field(
        default="vggsound", metadata={"help": "dataset layout: a VGGSound root or a YouTube corpus folder"})
    seed: int = field(default=0, metadata={"help": "seed for ids, event times, textures and clicks"})


def youtube_ids(seed: int, n: int, salt: str = "") -> list[str]:
    """``n`` distinct, deterministic 11-character YouTube-style ids."""
    rng = random.Random(f"{seed}:{salt}")
    ids: list[str] = []
    while len(ids) < n:
        yid = "".join(rng.choice(_YT_ALPHABET) for _ in range(11))
        if yid not in ids:
            ids.append(yid)
    return ids


def _event_times(rng: random.Random, rate: Fraction, lo: float, hi: float, count: int, min_gap: float,
                 avoid: Sequence[float] = ()) -> list[float]:
    """``count`` frame-grid times in ``[lo, hi]`` at least ``min_gap`` apart (a shift < gap - 0.2 s can't
    realign them) and 0.5 s away from every ``avoid`` time (window borders of long videos)."""
    for _attempt in range(1000):
        picks = sorted(rng.uniform(lo, hi) for _ in range(count))
        if all(b - a >= min_gap for a, b in zip(picks, picks[1:])) and all(
                abs(t - x) >= 0.5 for t in picks for x in avoid):
            return [float(round(t * rate) / rate) for t in picks]
    step = (hi - lo) / max(count - 1, 1)
    return [float(round((lo + i * step) * rate) / rate) for i in range(count)]


def _clip_record(clip: EventClip, root: Path, offset: float = 0.0, window: float | None = None) -> dict:
    """Event times relative to ``offset`` (the CSV start of an untrimmed file), kept inside the window."""
    def rel(ts):
        out = [round(t - offset, 6) for t in ts]
        return [t for t in out if window is None or 0.0 <= t < window]

    return {
        "file": clip.path.relative_to(root).as_posix(),
        "fps": clip.fps,
        "file_duration_s": clip.duration_s,
        "sample_rate": clip.sample_rate,
        "file_event_times": [round(t, 6) for t in clip.event_times],
        "file_audio_event_times": [round(t, 6) for t in clip.audio_event_times],
        "event_times": rel(clip.event_times),
        "audio_event_times": rel(clip.audio_event_times),
    }


_ALIGNED_LABELS = [
    ("hammering, nailing", "train"), ("dog barking", "train"), ("chopping wood", "train"),
    ("woodpecker pecking tree", "train"), ("bird chirping, tweeting", "test"), ("ice cracking", "test"),
]
_SHIFTS = [("vehicle horn, car horn, honking", "train", 0.32), ("ripping paper", "train", -0.4),
           ("typing on typewriter", "test", 0.52)]


def _generate_vggsound(root: Path, seed: int) -> dict:
    """VGGSound layout: aligned, shifted, static, odd-rate, untrimmed, short and broken clips plus bad CSV rows."""
    rng = random.Random(seed)
    window = DEFAULT_SIGNAL.window_s
    video_dir = root / "video"
    ids = youtube_ids(seed, _N_VGG_IDS, "vggsound")
    id_iter = iter(ids)
    entries: list[dict] = []  # one per CSV row, in the order written later

    def start_seconds() -> int:
        return rng.randrange(0, 300)

    def name(yid: str, start: int, suffix: str = ".mp4") -> Path:
        return video_dir / f"{yid}_{start:06d}{suffix}"

    def add(kind: str, label: str, split: str, expect: str, clip: EventClip | None = None, *, yid=None,
            start=None, av_align: str | None = None, note: str = "", offset: float = 0.0, **extra) -> dict:
        yid = yid or next(id_iter)
        start = start_seconds() if start is None else start
        entry = {"youtube_id": yid, "start_seconds": start, "label": label, "split": split, "kind": kind,
                 "expect": expect, "expect_av_align": av_align, "note": note, **extra}
        if clip is not None:
            entry.update(_clip_record(clip, root, offset=offset, window=window))
        entries.append(entry)
        return entry

    rate = Fraction(25)
    for i, (label, split) in enumerate(_ALIGNED_LABELS):
        yid, start = next(id_iter), start_seconds()
        events = _event_times(rng, rate, 0.6, window - 0.6, 3 + i % 3, 1.0)
        clip = write_event_clip(name(yid, start), duration_s=window, fps=rate, event_times=events,
                                seed=seed * 1000 + i)
        add("aligned", label, split, "ok", clip, yid=yid, start=start, av_align="high",
            note="square jumps and a click sounds on the same frame", audio_shift_s=0.0)
    # same YouTube video, another 10 s window: a different clip with its own key, not a duplicate
    twin = entries[0]
    start2 = (twin["start_seconds"] + 40) % 300
    clip = write_event_clip(name(twin["youtube_id"], start2), duration_s=window, fps=rate,
                            event_times=_event_times(rng, rate, 0.6, window - 0.6, 4, 1.0), seed=seed * 1000 + 50)
    add("aligned", twin["label"], twin["split"], "ok", clip, yid=twin["youtube_id"], start=start2, av_align="high",
        note="same youtube_id as another row with a different start: a distinct clip", audio_shift_s=0.0)

    for j, (label, split, shift) in enumerate(_SHIFTS):
        yid, start = next(id_iter), start_seconds()
        lo, hi = 0.6 + max(0.0, -shift), window - 0.6 - max(0.0, shift)
        events = _event_times(rng, rate, lo, hi, 4, abs(shift) + 0.3)
        clip = write_event_clip(name(yid, start), duration_s=window, fps=rate, event_times=events,
                                audio_shift_s=shift, seed=seed * 1000 + 100 + j)
        add("shifted", label, split, "ok", clip, yid=yid, start=start, av_align="low", audio_shift_s=shift,
            note=f"audio clicks {shift:+.2f}s from the jumps: no click within one frame of a jump")

    yid, start = next(id_iter), start_seconds()
    clip = write_event_clip(name(yid, start), duration_s=window, motion=False, sound=False, seed=seed * 1000 + 200)
    add("static_silent", "wind noise", "train", "ok", clip, yid=yid, start=start, av_align="low",
        note="still square, digital silence: no motion peaks, no onsets (AV-Align 0)", audio_shift_s=0.0)

    # an untrimmed download: the CSV window [start, start+10) lies inside a longer file
    yid, start = next(id_iter), 10
    long_s = 2.5 * window
    events = (_event_times(rng, rate, 0.6, start - 0.6, 3, 1.0)
              + _event_times(rng, rate, start + 0.6, start + window - 0.6, 4, 1.0)
              + _event_times(rng, rate, start + window + 0.6, long_s - 0.6, 2, 1.0))
    clip = write_event_clip(name(yid, start), duration_s=long_s, fps=rate, event_times=events, seed=seed * 1000 + 300)
    add("untrimmed", "hammering, nailing", "train", "ok", clip, yid=yid, start=start, av_align="high",
        offset=float(start), audio_shift_s=0.0, window_start_s=float(start),
        note=f"{long_s:g}s file, CSV start {start}: only [start, start+{window:g}) is the clip; "
             "event_times are relative to the window start")

    odd = Fraction(24000, 1001)
    yid, start = next(id_iter), start_seconds()
    clip = write_event_clip(name(yid, start), duration_s=window, fps=odd,
                            event_times=_event_times(rng, odd, 0.6, window - 0.6, 4, 1.0), seed=seed * 1000 + 400)
    add("odd_fps", "chopping wood", "train", "ok", clip, yid=yid, start=start, av_align="high", audio_shift_s=0.0,
        note="24000/1001 fps: frame i is at i*1001/24000 s")

    yid, start = next(id_iter), start_seconds()
    clip = write_event_clip(name(yid, start), duration_s=window, fps=rate, fps_is_variable=True,
                            event_times=_event_times(rng, rate, 0.6, window - 0.6, 4, 1.0), seed=seed * 1000 + 500)
    add("variable_fps", "dog barking", "train", "ok", clip, yid=yid, start=start, av_align="high", audio_shift_s=0.0,
        note="variable frame rate (frames up to 0.3 frame off the 25 fps grid): use timestamps, not i/fps")

    short_s = round(0.6 * DecodeLimits().min_duration_s, 3)
    yid, start = next(id_iter), start_seconds()
    clip = write_event_clip(name(yid, start), duration_s=short_s, fps=15, event_times=(0.2,), seed=seed * 1000 + 600)
    add("too_short", "ice cracking", "train", "too_short", clip, yid=yid, start=start,
        note=f"{short_s:g}s long: shorter than DecodeLimits.min_duration_s")

    # broken inputs
    yid, start = next(id_iter), start_seconds()
    path = name(yid, start)
    path.write_bytes(b"")
    add("broken_empty", "dog barking", "train", "decode_error", yid=yid, start=start,
        file=path.relative_to(root).as_posix(),
        note="zero-byte file (a failed download)")

    yid, start = next(id_iter), start_seconds()
    path = name(yid, start)
    write_event_clip(path, duration_s=window, seed=seed * 1000 + 700)
    truncate_file(path, 0.5)
    add("broken_truncated", "chopping wood", "train", "decode_error", yid=yid, start=start,
        file=path.relative_to(root).as_posix(), note="a real mp4 cut to half its bytes (moov index lost)")

    yid, start = next(id_iter), start_seconds()
    path = name(yid, start)
    path.write_text("<html><head><title>404 Not Found</title></head><body>Video unavailable</body></html>\n")
    add("broken_not_video", "ripping paper", "train", "decode_error", yid=yid, start=start,
        file=path.relative_to(root).as_posix(), note="an HTML error page saved under a .mp4 name")

    yid, start = next(id_iter), start_seconds()
    clip = write_video_only(name(yid, start), duration_s=window, seed=seed * 1000 + 800)
    add("no_audio", "dog barking", "train", "no_audio_stream", clip, yid=yid, start=start,
        note="h264 video, no audio stream")

    yid, start = next(id_iter), start_seconds()
    clip = write_audio_only(name(yid, start), duration_s=window, seed=seed * 1000 + 900)
    add("no_video", "hammering, nailing", "train", "no_video_stream", clip, yid=yid, start=start,
        note="ALAC audio in mp4, no video stream")

    # CSV-only problems
    yid, start = next(id_iter), start_seconds()
    add("missing_file", "dog barking", "train", "missing_file", yid=yid, start=start,
        note="listed in the CSV, never downloaded")

    rng.shuffle(entries)
    dup_of = next(e for e in entries if e["kind"] == "aligned")
    dup = {k: v for k, v in dup_of.items() if k in ("youtube_id", "start_seconds", "label", "split")}
    dup.update(kind="duplicate", expect="duplicate_id", expect_av_align=None,
               note="repeats an earlier line (same youtube_id and start)")
    entries.insert(entries.index(dup_of) + 1 + rng.randrange(0, len(entries) - entries.index(dup_of)), dup)
    bad_start = {"youtube_id": next(id_iter), "start_seconds": "3O", "label": "dog barking", "split": "train",
                 "kind": "malformed", "expect": "bad_csv_row", "expect_av_align": None,
                 "note": "start_seconds is not a number (letter O)"}
    short_row = {"youtube_id": next(id_iter), "start_seconds": 30, "label": None, "split": None,
                 "kind": "malformed", "expect": "bad_csv_row", "expect_av_align": None,
                 "note": "only two fields"}
    entries.insert(rng.randrange(1, len(entries)), bad_start)
    entries.insert(rng.randrange(1, len(entries)), short_row)

    with open(root / "vggsound.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        for line, e in enumerate(entries, start=1):
            fields = [e["youtube_id"], e["start_seconds"], e["label"], e["split"]]
            writer.writerow([x for x in fields if x is not None])
            e["csv_line"] = line
            e.setdefault("file", None)
    dup["duplicate_of_line"] = dup_of["csv_line"]
    return {"layout": "vggsound", "csv": "vggsound.csv", "video_dir": "video", "window_s": window, "rows": entries}


_YT_VIDEOS = [
    # (subfolder, title or None (no sidecar, file named by id), suffix, seconds, fps, shift, tags, categories)
    ("workshop", "Hammer test v1.2 - nailing a pallet", ".mp4", 30.0, 25, 0.0,
     ["hammer", "nails", "woodworking"], ["Howto & Style"]),
    ("nature", "Woodpecker at dawn [4K]", ".mkv", 35.0, 30, 0.0, ["woodpecker", "birds", "forest"], ["Pets & Animals"]),
    ("nature", None, ".webm", 25.0, 25, 0.0, [], []),
    ("street", "Car horns downtown", ".mp4", 28.0, 25, 0.45, ["traffic", "horn"], ["Autos & Vehicles"]),
]


def _generate_youtube(root: Path, seed: int) -> dict:
    """A corpus folder: long videos in subfolders, some with yt-dlp sidecars, one mkv, one webm, one broken."""
    rng = random.Random(seed + 7)
    ids = youtube_ids(seed, len(_YT_VIDEOS) + 1, "youtube")
    # the first video reuses a VGGSound test-split id of the same seed, so test-leak exclusion has a case
    vgg_ids = youtube_ids(seed, _N_VGG_IDS, "vggsound")  # the aligned rows take the first ids, in order
    vgg_test = [yid for yid, (_label, split) in zip(vgg_ids, _ALIGNED_LABELS) if split == "test"]
    ids[0] = vgg_test[0]
    files = []
    for i, (sub, title, suffix, seconds, fps, shift, tags, cats) in enumerate(_YT_VIDEOS):
        yid = ids[i]
        stem = f"{title} [{yid}]" if title else yid
        path = root / sub / f"{stem}{suffix}"
        rate = Fraction(fps)
        lo, hi = 0.6 + max(0.0, -shift), seconds - 0.6 - max(0.0, shift)
        count = int(seconds // 2.5)
        borders = np.arange(0.0, seconds, DEFAULT_SIGNAL.window_s)
        events = _event_times(rng, rate, lo, hi, count, max(1.0, abs(shift) + 0.3), avoid=borders)
        clip = write_event_clip(path, duration_s=seconds, fps=rate, event_times=events, audio_shift_s=shift,
                                sample_rate=48000 if suffix == ".webm" else 44100, seed=seed * 1000 + 2000 + i)
        rec = {"youtube_id": yid, "title": title, "kind": "aligned" if shift == 0 else "shifted", "expect": "ok",
               "expect_av_align": "high" if shift == 0 else "low", "audio_shift_s": shift,
               "info_json": None, "in_vggsound_test_split": yid in vgg_test, **_clip_record(clip, root)}
        if title:
            rec["info_json"] = _write_info(path, yid, title, tags, cats, seconds, fps, root)
        files.append(rec)
    yid = ids[-1]
    path = root / "street" / f"Street ambience [{yid}].mp4"
    write_event_clip(path, duration_s=30.0, seed=seed * 1000 + 2900)
    truncate_file(path, 0.5)
    files.append({"youtube_id": yid, "title": "Street ambience", "kind": "broken_truncated", "expect": "decode_error",
                  "expect_av_align": None, "file": path.relative_to(root).as_posix(), "in_vggsound_test_split": False,
                  "info_json": _write_info(path, yid, "Street ambience", ["street"], ["Travel & Events"], 30.0, 25,
                                           root),
                  "note": "interrupted download: half the bytes, sidecar present"})
    return {"layout": "youtube", "window_s": DEFAULT_SIGNAL.window_s, "files": files}


def _write_info(video: Path, yid: str, title: str, tags: list[str], categories: list[str], seconds: float,
                fps: int, root: Path) -> str:
    """A yt-dlp style ``{stem}.info.json`` beside the video."""
    info = {
        "id": yid, "title": title, "fulltitle": title, "tags": tags, "categories": categories,
        "duration": int(round(seconds)), "duration_string": f"{int(seconds) // 60}:{int(seconds) % 60:02d}",
        "ext": video.suffix.lstrip("."), "width": 160, "height": 120, "fps": fps,
        "webpage_url": f"https://www.youtube.com/watch?v={yid}", "extractor": "youtube",
        "description": f"Synthetic test video: {title}.",
    }
    sidecar = video.with_name(video.stem + ".info.json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return sidecar.relative_to(root).as_posix()


def _check_target(out: Path) -> None:
    """Only an absent or empty folder, or one holding an earlier sample, may receive a sample."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out} is not empty and holds no {MANIFEST_NAME}: refusing to write sample data into it")


def _clear_previous(out: Path) -> None:
    """Remove exactly what an earlier generation wrote (its manifest lists it); nothing else."""
    manifest = out / MANIFEST_NAME
    if not manifest.exists():
        return
    old = json.loads(manifest.read_text(encoding="utf-8"))
    written = [out / p for p in old.get("written", [])]
    manifest.unlink()
    for p in written:
        if p.is_file() or p.is_symlink():
            p.unlink()
    for d in sorted({q for p in written for q in p.parents if out in q.parents}, key=lambda q: len(q.parts),
                    reverse=True):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def generate(out_dir: str | Path, kind: str = "vggsound", seed: int = 0) -> Path:
    """Write a sample dataset of ``kind`` into ``out_dir`` and return the path of its manifest.

    Files are built in a hidden sibling folder and moved in at the end, so a failed run leaves
    ``out_dir`` as it was. A folder holding anything but an earlier sample is never touched.
    """
    if kind not in ("vggsound", "youtube"):
        raise ValueError(f"unknown sample kind {kind!r}: use 'vggsound' or 'youtube'")
    out = Path(out_dir)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        body = _generate_vggsound(staging, seed) if kind == "vggsound" else _generate_youtube(staging, seed)
        written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        manifest = {"generator": "pipeline.sample", "kind": kind, "seed": seed, **body, "written": written}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _clear_previous(out)
        out.mkdir(exist_ok=True)
        for entry in sorted(staging.iterdir(), key=lambda q: q.name != MANIFEST_NAME):  # manifest last
            if entry.name != MANIFEST_NAME:
                os.replace(entry, out / entry.name)
        os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / MANIFEST_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data/<kind>)")
    add_config_args(parser, SampleConfig)
    args = parser.parse_args(argv)
    cfg = from_args(SampleConfig, args)
    out = args.out or Path("data") / cfg.kind
    t0 = time.perf_counter()
    try:
        manifest_path = generate(out, cfg.kind, cfg.seed)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    items = manifest["rows"] if cfg.kind == "vggsound" else manifest["files"]
    for item in items:
        where = item.get("file") or "(no file)"
        print(f"  {item['kind']:<17} expect {item['expect']:<16} {where}")
    counts: dict[str, int] = {}
    for item in items:
        counts[item["kind"]] = counts.get(item["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"wrote {cfg.kind} sample (seed {cfg.seed}) to {out}: {len(manifest['written'])} files, "
          f"{len(items)} {'CSV rows' if cfg.kind == 'vggsound' else 'videos'} ({summary}) "
          f"in {time.perf_counter() - t0:.1f}s; ground truth in {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
