"""One PyAV pass per clip: audio at every requested rate, frames at every requested rate.

Time is presentation time (``pts * time_base``) of each stream, so variable frame rates,
non-zero start times and odd rates (14.96, 21.5 fps) are handled by timestamps, never by frame
counting. Audio is mixed to mono at its native rate, cut to the window by its timestamps, then
resampled with soxr (``HQ``, the same quality librosa's default ``soxr_hq`` uses).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import soxr

from core.config import DecodeLimits
from core.native_threads import worker_threads

# Planar YUV formats whose first plane is luma: the fast greyscale path reads it directly.
_LUMA_FORMATS = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "yuv420p10le"}


class DecodeError(Exception):
    """A clip that cannot be used; ``reason`` is the ledger reason (e.g. ``no_audio_stream``)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    @property
    def ledger_reason(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class DecodeRequest:
    """What a stage needs from one clip. ``duration_s=None`` means the whole file from ``start_s``."""

    start_s: float = 0.0
    duration_s: float | None = None
    audio_rates: tuple[int, ...] = ()
    gray: bool = False  # every native frame, greyscale
    gray_max_side: int | None = None  # None: native resolution via BGR->GRAY (OpenCV's path)
    rgb_fps: float | None = None  # frames sampled on a fixed grid, RGB
    audio_native: bool = False  # also keep the window's audio at its native rate, channels unmixed, unpadded
    need_audio: bool = True
    need_video: bool = True


@dataclass
class DecodedClip:
    path: str
    start_s: float
    duration_s: float  # length of the window actually covered
    video_fps: float  # native average frame rate
    audio: dict[int, np.ndarray] = field(default_factory=dict)  # rate -> float32 mono
    gray: np.ndarray | None = None  # [N, H, W] uint8
    gray_times: np.ndarray | None = None  # [N] seconds relative to start_s
    gray_scale: float = 1.0  # decoded-size / native-size ratio of gray frames
    rgb: np.ndarray | None = None  # [T, H, W, 3] uint8
    rgb_times: np.ndarray | None = None
    native_sr: int = 0
    # With ``audio_native``: [C, n] float32 at ``native_sr``, for metrics that must reproduce another
    # tool's own downmix (AV-Align's reference WAVs). Never padded: it starts at the first audio sample.
    audio_native: np.ndarray | None = None
    audio_layout: str = ""  # channel layout name of ``audio_native`` (e.g. "stereo")
    audio_lead_s: float = 0.0  # silence prepended to ``audio`` because the audio starts after the window start


@dataclass(frozen=True)
class ProbeInfo:
    duration_s: float
    video_fps: float
    has_audio: bool
    has_video: bool


class _Deadline:
    """Per-clip time limit: checked between packets, and by SIGALRM when on the main thread."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise DecodeError("decode_timeout", f"exceeded {self.seconds:.0f}s")


@contextmanager
def _alarm(seconds: float):
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise DecodeError("decode_timeout", f"exceeded {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds + 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _open(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise DecodeError("missing_file", str(p))
    if p.stat().st_size == 0:
        raise DecodeError("decode_error", "empty file (0 bytes)")
    try:
        return av.open(str(p))
    except av.error.FFmpegError as e:
        raise DecodeError("decode_error", _ffmpeg_message(e)) from e


def _ffmpeg_message(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return " ".join(str(msg).split())[:200]


def _stream_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe(path: str | Path) -> ProbeInfo:
    """Cheap container facts (no decoding), for manifests that must cut long files."""
    with _open(path) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        durations = [d for d in (_stream_duration(c, s) for s in (v, a) if s is not None) if d]
        dur = max(durations) if durations else (c.duration / av.time_base if c.duration else 0.0)
        return ProbeInfo(duration_s=float(dur), video_fps=_fps(v) if v else 0.0,
                         has_audio=a is not None, has_video=v is not None)


def _channels(frame: av.AudioFrame) -> np.ndarray:
    """[C, n] float32, full scale 1.0, whatever the sample format."""
    arr = frame.to_ndarray()
    if arr.dtype.kind in "iu":
        scale = float(np.iinfo(arr.dtype).max) + 1.0
        arr = arr.astype(np.float32) / scale
    else:
        arr = arr.astype(np.float32, copy=False)
    if frame.format.is_planar:
        return arr
    return arr.reshape(-1, len(frame.layout.channels)).T


def _mono(channels: np.ndarray) -> np.ndarray:
    return channels.mean(axis=0) if channels.shape[0] > 1 else channels[0]


def _luma(frame: av.VideoFrame, max_side: int) -> tuple[np.ndarray, float]:
    """Greyscale at reduced size straight from the luma plane (no colour conversion)."""
    if frame.format.name in _LUMA_FORMATS and not frame.format.name.endswith("10le"):
        plane = frame.planes[0]
        y = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    else:
        y = frame.to_ndarray(format="gray")
    h, w = y.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        # halve with a Gaussian first while 4x too big: INTER_AREA alone is slow at odd ratios
        while y.shape[1] >= 4 * size[0] and y.shape[0] >= 4 * size[1]:
            y = cv2.pyrDown(y)
        y = cv2.resize(y, size, interpolation=cv2.INTER_AREA)
        scale = size[0] / w
    return np.ascontiguousarray(y), scale


def _gray_native(frame: av.VideoFrame) -> np.ndarray:
    """OpenCV's own path (decode to BGR, then BGR2GRAY), for the reference metric."""
    return cv2.cvtColor(frame.to_ndarray(format="bgr24"), cv2.COLOR_BGR2GRAY)


def video_threads(limits: DecodeLimits) -> int:
    """FFmpeg threads per video decode: the explicit setting, else the worker's cap (0: FFmpeg's choice)."""
    return limits.decode_threads or worker_threads() or 0


def decode(path: str | Path, req: DecodeRequest, limits: DecodeLimits = DecodeLimits()) -> DecodedClip:
    """Decode one clip in a single demux pass. Raises ``DecodeError`` with a ledger reason."""
    deadline = _Deadline(limits.timeout_s)
    with _alarm(limits.timeout_s):
        container = _open(path)
        try:
            return _decode_open(container, str(path), req, limits, deadline)
        except av.error.FFmpegError as e:
            raise DecodeError("decode_error", _ffmpeg_message(e)) from e
        finally:
            container.close()


def _decode_open(container, path: str, req: DecodeRequest, limits: DecodeLimits, deadline: _Deadline) -> DecodedClip:
    want_video = req.need_video and (req.gray or req.rgb_fps)
    vstream = container.streams.video[0] if container.streams.video else None
    astream = container.streams.audio[0] if container.streams.audio else None
    if req.need_video and vstream is None:
        raise DecodeError("no_video_stream")
    if req.need_audio and astream is None:
        raise DecodeError("no_audio_stream")

    fps = _fps(vstream) if vstream is not None else 0.0
    start = float(req.start_s)
    end = math.inf if req.duration_s is None else start + float(req.duration_s)

    streams = []
    if want_video:
        vstream.thread_type = "AUTO"
        threads = video_threads(limits)
        if threads:
            vstream.thread_count = threads
        streams.append(vstream)
    want_audio = req.need_audio and (bool(req.audio_rates) or req.audio_native)
    if want_audio:
        streams.append(astream)
    if not streams:
        raise DecodeError("decode_error", "nothing requested")

    if start > 1.0:
        seek_stream = vstream if want_video else astream
        container.seek(int(max(0.0, start - 1.0) / seek_stream.time_base), stream=seek_stream, backward=True)

    gray, gray_t = [], []
    gray_scale = 1.0
    rgb, rgb_t = [], []
    rgb_next = 0  # index of the next 2 fps grid point to fill
    prev_frame = None
    prev_time = None
    audio_chunks: list[np.ndarray] = []
    native_chunks: list[np.ndarray] = []
    audio_t0: float | None = None
    native_sr = astream.sample_rate if astream is not None else 0
    audio_done = not want_audio
    video_done = not want_video
    last_video_t = -math.inf

    for packet in container.demux(streams):
        deadline.check()
        if packet.stream.type == "video" and video_done:
            continue
        if packet.stream.type == "audio" and audio_done:
            continue
        for frame in packet.decode():
            if frame.pts is None or frame.time is None:
                continue
            t = float(frame.time)
            if packet.stream.type == "audio":
                if t >= end:
                    audio_done = True
                    break
                channels = _channels(frame)
                if t + channels.shape[1] / frame.sample_rate <= start:
                    continue
                if audio_t0 is None:
                    audio_t0 = t
                audio_chunks.append(_mono(channels))
                if req.audio_native:
                    native_chunks.append(channels)
            else:
                if t >= end:
                    video_done = True
                    break
                if t < start:
                    prev_frame, prev_time = frame, t
                    continue
                if req.gray:
                    if req.gray_max_side:
                        g, gray_scale = _luma(frame, req.gray_max_side)
                    else:
                        g = _gray_native(frame)
                    gray.append(g)
                    gray_t.append(t - start)
                if req.rgb_fps:
                    # a grid point is shown by the last frame whose time is <= it
                    shown_by = prev_frame if prev_frame is not None else frame
                    while start + rgb_next / req.rgb_fps < min(t, end):
                        rgb.append(shown_by.to_ndarray(format="rgb24"))
                        rgb_t.append(rgb_next / req.rgb_fps)
                        rgb_next += 1
                prev_frame, prev_time = frame, t
                last_video_t = max(last_video_t, t)
        if audio_done and video_done:
            break

    clip = DecodedClip(path=path, start_s=start, duration_s=0.0, video_fps=fps, native_sr=native_sr)
    covered = []
    if want_video:
        if not gray_t and not rgb_t and prev_frame is None:
            raise DecodeError("decode_error", "no decodable video frames")
        frame_dur = 1.0 / fps if fps > 0 else 0.0
        video_end = last_video_t + frame_dur if last_video_t > -math.inf else start
        covered.append(min(end, video_end) - start)
        if req.rgb_fps and prev_frame is not None:
            # grid points after the last decoded frame but inside the video keep its last frame
            while start + rgb_next / req.rgb_fps < min(end, video_end):
                rgb.append(prev_frame.to_ndarray(format="rgb24"))
                rgb_t.append(rgb_next / req.rgb_fps)
                rgb_next += 1
        if req.gray:
            clip.gray = np.stack(gray) if gray else np.zeros((0, 1, 1), np.uint8)
            clip.gray_times = np.asarray(gray_t, np.float64)
            clip.gray_scale = gray_scale
        if req.rgb_fps:
            clip.rgb = np.stack(rgb) if rgb else np.zeros((0, 1, 1, 3), np.uint8)
            clip.rgb_times = np.asarray(rgb_t, np.float64)
    if want_audio:
        if not audio_chunks:
            raise DecodeError("decode_error", "no decodable audio in window")
        native = np.concatenate(audio_chunks)
        lead = int(round((audio_t0 - start) * native_sr))
        if req.audio_native:
            unpadded = np.concatenate(native_chunks, axis=1)[:, max(0, -lead):]
            if math.isfinite(end):
                unpadded = unpadded[:, : max(0, int(round((end - start) * native_sr)) - max(0, lead))]
            clip.audio_native = unpadded
            clip.audio_layout = astream.layout.name
        if lead > 0:  # audio starts after the window start: keep it on the clock with silence
            native = np.concatenate([np.zeros(lead, np.float32), native])
            clip.audio_lead_s = lead / native_sr
        elif lead < 0:
            native = native[-lead:]
        if math.isfinite(end):
            native = native[: int(round((end - start) * native_sr))]
        covered.append(native.size / native_sr)
        for rate in req.audio_rates:
            clip.audio[rate] = (
                native.copy() if rate == native_sr
                else soxr.resample(native, native_sr, rate, quality="HQ").astype(np.float32, copy=False)
            )
    clip.duration_s = float(min(covered)) if covered else 0.0
    if clip.duration_s < limits.min_duration_s:
        raise DecodeError("too_short", f"{clip.duration_s:.2f}s < {limits.min_duration_s:.2f}s")
    return clip
