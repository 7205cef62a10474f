"""Writing a generated soundtrack: the 16-bit wav, the mp4 with it as the only sound, the JSON record.

Shared by the sampler, the evaluation and the listening test. Light on purpose (PyAV and
soundfile, no torch), so ``python -m train.evaluate|listening_test`` import it without the models.
"""
from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

from core.atomic import atomic_output, atomic_write_text
from core.decode import DecodeRequest, decode, probe
from core.jsonsafe import json_safe
from core.mux import AudioTrack, VideoCopy, VideoTrack
from core.mux import mux as mux_streams


def write_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    with atomic_output(path) as tmp:
        sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")


def _window_fits(video: str, start_s: float, seconds: float) -> bool:
    info = probe(video)
    return start_s == 0.0 and info.duration_s <= seconds + 0.5


def mux(video: str, audio: np.ndarray, sr: int, out: str | Path, start_s: float = 0.0) -> Path:
    """Write ``out`` (mp4): the video window with ``audio`` (AAC) as its only sound.

    The video stream is copied (lossless) when the file is the window itself; otherwise the window
    is re-encoded with x264. AAC's encoder delay goes into the mp4's edit list, so the first
    sample of ``audio`` plays with the first frame.
    """
    seconds = len(audio) / sr
    picture = VideoCopy(video) if _window_fits(video, start_s, seconds) else _window_frames(video, start_s, seconds)
    track = AudioTrack(pcm=np.asarray(audio, np.float32)[None, :], sample_rate=sr, codec="aac")
    return mux_streams(out, picture, track, container_format="mp4")


def _window_frames(video: str, start_s: float, seconds: float) -> VideoTrack:
    """The window's frames, to be re-encoded with x264."""
    fps = probe(video).video_fps or 25.0
    clip = decode(video, DecodeRequest(start_s=start_s, duration_s=seconds, rgb_fps=fps, need_audio=False))
    rate = Fraction(fps).limit_denominator(1001)
    h, w = clip.rgb.shape[1:3]
    w, h = w - w % 2, h - h % 2
    frames = ((rgb[:h, :w], Fraction(i) / rate) for i, rgb in enumerate(clip.rgb))
    return VideoTrack(frames=frames, size=(w, h), rate=rate, options={"crf": "18"})


def random_banner(sources: list[str]) -> str:
    bar = "!" * 96
    return (f"{bar}\n!!! RANDOM WEIGHTS in {', '.join(sources)}: this soundtrack comes from models that were never\n"
            f"!!! trained (or trained for a few demo steps). It shows the data flow and NOTHING about quality.\n{bar}")


def write_record(path: Path, record: dict) -> dict:
    """Write a result's JSON record; say loudly on stderr when random-weight models made it."""
    atomic_write_text(path, json.dumps(json_safe(record), indent=1))
    if record["random_weights"]:
        print(random_banner(record["random_weights"]), file=sys.stderr)
    return record
