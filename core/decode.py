"""One PyAV pass per clip: audio at every requested rate, frames at every requested rate.

Time is presentation time (``pts * time_base``) of each stream, so variable frame rates,
non-zero start times and odd rates (14.96, 21.5 fps) are handled by timestamps, never by frame
counting. Audio is mixed to mono at its native rate, cut to the window by its timestamps, then
resampled by ``core.resample`` with the request's ``resampler`` (default soxr ``HQ``, the quality
librosa's default ``soxr_hq`` uses; ``torchaudio`` for AudioLDM's mel input).

A request asks only for the work its consumer needs: small greyscale frames made from the luma
plane (or by libswscale inside FFmpeg), the deblocking filter skipped for frames that are shrunk
anyway, RGB frames resized to the encoder's input as they are decoded. ``docs/benchmarks.md``
measures what each option costs and saves.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from core import storage
from core.config import DecodeLimits
from core.frames import resize_crop, short_side_size
from core.native_threads import worker_threads
from core.resample import resample

# Planar YUV formats whose first plane is luma: the fast greyscale path reads it directly.
_LUMA_FORMATS = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "yuv420p10le"}
# ``gray_scaler`` values: OpenCV on the luma plane, or a libswscale algorithm inside FFmpeg.
GRAY_SCALERS = ("opencv",) + tuple(m.name.lower() for m in Interpolation)
# With ``rgb_size``, a frame whose short side is over this many times the size is first shrunk to
# it inside FFmpeg (area averaging), so no full-size RGB copy of a huge frame is ever made.
RGB_PRESHRINK = 4


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
    # how frames shrink to ``gray_max_side``: "opencv" (luma plane, Gaussian pyramid + INTER_AREA)
    # or a libswscale algorithm ("fast_bilinear", "area", ...) converting and scaling in FFmpeg
    gray_scaler: str = "opencv"
    # FFmpeg's skip_loop_filter=all: no deblocking (H.264, HEVC): cheaper, blockier frames, for
    # consumers that shrink the frames anyway; it applies to every frame of the video decode
    skip_loop_filter: bool = False
    rgb_fps: float | None = None  # frames sampled on a fixed grid, RGB
    # which frame shows a grid point: "last" = the last frame at or before it; "nearest" = the last
    # frame before the point plus half a grid step, i.e. FFmpeg's fps filter (round=near), which
    # torio/torchvision-based readers use (av-benchmark's DeSync)
    rgb_grid: str = "last"
    rgb_size: int | None = None  # RGB frames resized (short side) and centre-cropped to this, as decoded
    audio_native: bool = False  # also keep the window's audio at its native rate, channels unmixed, unpadded
    need_audio: bool = True
    need_video: bool = True
    resampler: str = "soxr_hq"  # how audio_rates are made from the native rate (core.resample.RESAMPLERS)

    def __post_init__(self) -> None:
        if self.rgb_grid not in ("last", "nearest"):
            raise ValueError(f"rgb_grid must be last or nearest, not {self.rgb_grid!r}")
        if self.gray_scaler not in GRAY_SCALERS:
            raise ValueError(f"gray_scaler must be one of {', '.join(GRAY_SCALERS)}, not {self.gray_scaler!r}")
        for name in ("gray_max_side", "rgb_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 px, not {value}")


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


def sub_clip(clip: DecodedClip, t0: float, t1: float) -> DecodedClip:
    """The part ``[t0, t1)`` (seconds from the clip's start) of a decoded clip, from the arrays it
    already holds: a window split at its scene cuts is scored without decoding the file again.
    Frames keep their decode times (shifted to the part's start); audio is cut at the nearest sample."""
    t1 = min(t1, clip.duration_s)
    if not 0.0 <= t0 < t1:
        raise ValueError(f"empty or out-of-range part [{t0}, {t1}) of a {clip.duration_s:.3f}s clip")

    def frames(arr: np.ndarray | None, times: np.ndarray | None) -> tuple:
        if arr is None or times is None:
            return arr, times
        keep = (times >= t0 - 1e-9) & (times < t1 - 1e-9)
        return arr[keep], times[keep] - t0

    gray, gray_times = frames(clip.gray, clip.gray_times)
    rgb, rgb_times = frames(clip.rgb, clip.rgb_times)
    audio = {rate: a[int(round(t0 * rate)): int(round(t1 * rate))] for rate, a in clip.audio.items()}
    native = clip.audio_native
    if native is not None:  # it starts at the first audio sample, audio_lead_s after the window start
        sr, lead = clip.native_sr, clip.audio_lead_s
        native = native[..., max(0, int(round((t0 - lead) * sr))): max(0, int(round((t1 - lead) * sr)))]
    return replace(clip, start_s=clip.start_s + t0, duration_s=t1 - t0, audio=audio, gray=gray,
                   gray_times=gray_times, rgb=rgb, rgb_times=rgb_times, audio_native=native,
                   audio_lead_s=max(0.0, clip.audio_lead_s - t0))


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
    """SIGALRM after ``seconds`` (+1 s) on the main thread; the caller's own timer and handler are
    restored afterwards, with the time this decode took already counted off."""
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise DecodeError("decode_timeout", f"exceeded {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, _raise)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds + 1.0)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if old_delay > 0:  # the caller's timer was running: it fires when it would have (at once if due)
            remaining = old_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), old_interval)


@contextmanager
def _open(path: str | Path):
    """The open container of a local file or an object-storage URL (read through fsspec).

    A local file is always opened by its absolute path: a relative "pipe:0.mp4" would otherwise be
    read by FFmpeg as a protocol.
    """
    if not storage.is_url(path):
        path = os.path.abspath(path)
    try:
        nbytes = storage.size(path)
    except FileNotFoundError:
        raise DecodeError("missing_file", str(path)) from None
    except storage.backend_errors() as e:  # a store that refuses (credentials, endpoint) fails this clip
        raise DecodeError("decode_error", f"cannot read {path}: {e}") from e
    if nbytes == 0:
        raise DecodeError("decode_error", "empty file (0 bytes)")
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(storage.open_file(path, "rb")) if storage.is_url(path) else str(path)
        try:
            container = av.open(source)
        except av.error.FFmpegError as e:
            raise DecodeError("decode_error", _ffmpeg_message(e)) from e
        stack.callback(container.close)
        yield container


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


def _small_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """(w, h) with the long side at most ``max_side``; None when the frame is already that small."""
    scale = max_side / max(width, height)
    if scale >= 1.0:
        return None
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def _luma(frame: av.VideoFrame, max_side: int) -> tuple[np.ndarray, float]:
    """Greyscale at reduced size straight from the luma plane (no colour conversion)."""
    if frame.format.name in _LUMA_FORMATS and not frame.format.name.endswith("10le"):
        plane = frame.planes[0]
        y = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    else:
        y = frame.to_ndarray(format="gray")
    h, w = y.shape
    size = _small_size(w, h, max_side)
    if size is None:
        return np.ascontiguousarray(y), 1.0
    # halve with a Gaussian first while 4x too big: INTER_AREA alone is slow at odd ratios
    while y.shape[1] >= 4 * size[0] and y.shape[0] >= 4 * size[1]:
        y = cv2.pyrDown(y)
    return cv2.resize(y, size, interpolation=cv2.INTER_AREA), size[0] / w


def _sws_gray(sws: VideoReformatter, frame: av.VideoFrame, max_side: int, scaler: str,
              threads: int) -> tuple[np.ndarray, float]:
    """Greyscale at reduced size converted and scaled by libswscale (one cached context per decode)."""
    size = _small_size(frame.width, frame.height, max_side) or (frame.width, frame.height)
    small = sws.reformat(frame, width=size[0], height=size[1], format="gray",
                         interpolation=Interpolation[scaler.upper()], threads=threads)
    return small.to_ndarray(), size[0] / frame.width


def _rgb_sized(sws: VideoReformatter, frame: av.VideoFrame, size: int, threads: int) -> np.ndarray:
    """One RGB frame at the encoder's input (short side ``size``, centre crop), never full size
    when it is huge: such frames are area-shrunk inside FFmpeg to ``RGB_PRESHRINK * size`` first."""
    w, h = frame.width, frame.height
    if min(w, h) > RGB_PRESHRINK * size:
        h2, w2 = short_side_size(h, w, RGB_PRESHRINK * size)
        frame = sws.reformat(frame, width=w2, height=h2, format="rgb24", interpolation=Interpolation.AREA,
                             threads=threads)
    return resize_crop(frame.to_ndarray(format="rgb24")[None], size)[0]


def _gray_native(frame: av.VideoFrame) -> np.ndarray:
    """OpenCV's own path (decode to BGR, then BGR2GRAY), for the reference metric."""
    return cv2.cvtColor(frame.to_ndarray(format="bgr24"), cv2.COLOR_BGR2GRAY)


def video_threads(limits: DecodeLimits) -> int:
    """FFmpeg threads per video decode: the explicit setting, else the worker's cap (0: FFmpeg's choice)."""
    return limits.decode_threads or worker_threads() or 0


def decode(path: str | Path, req: DecodeRequest, limits: DecodeLimits = DecodeLimits()) -> DecodedClip:
    """Decode one clip in a single demux pass. Raises ``DecodeError`` with a ledger reason."""
    deadline = _Deadline(limits.timeout_s)
    with _alarm(limits.timeout_s), _open(path) as container:
        try:
            return _decode_open(container, str(path), req, limits, deadline)
        except av.error.FFmpegError as e:
            raise DecodeError("decode_error", _ffmpeg_message(e)) from e


@dataclass
class _Plan:
    """The streams a request reads and the window it covers."""

    vstream: object | None
    astream: object | None
    start: float
    end: float
    fps: float


def _plan(container, req: DecodeRequest) -> _Plan:
    vstream = container.streams.video[0] if container.streams.video else None
    astream = container.streams.audio[0] if container.streams.audio else None
    if req.need_video and vstream is None:
        raise DecodeError("no_video_stream")
    if req.need_audio and astream is None:
        raise DecodeError("no_audio_stream")
    want_video = req.need_video and (req.gray or req.rgb_fps)
    want_audio = req.need_audio and (bool(req.audio_rates) or req.audio_native)
    if not (want_video or want_audio):
        raise DecodeError("decode_error", "nothing requested")
    start = float(req.start_s)
    end = math.inf if req.duration_s is None else start + float(req.duration_s)
    return _Plan(vstream if want_video else None, astream if want_audio else None, start, end,
                 _fps(vstream) if vstream is not None else 0.0)


def _configure_video(stream, req: DecodeRequest, threads: int) -> None:
    """Threads and decoder discard settings; FFmpeg reads them when the decoder opens (first packet)."""
    stream.thread_type = "AUTO"
    if threads:
        stream.thread_count = threads
    if req.skip_loop_filter:
        stream.codec_context.options = {**stream.codec_context.options, "skip_loop_filter": "all"}


class _VideoFrames:
    """Collects what the request wants from the video frames of the window, in decode order."""

    def __init__(self, req: DecodeRequest, start: float, end: float, threads: int):
        self.req, self.start, self.end, self.threads = req, start, end, threads
        self.sws = VideoReformatter()  # one cached libswscale context per decode
        self.gray: list[np.ndarray] = []
        self.gray_t: list[float] = []
        self.gray_scale = 1.0
        self.rgb: list[np.ndarray] = []
        self.rgb_t: list[float] = []
        self.prev = None  # the last frame seen (it shows until the next frame's time)
        self.last_t = -math.inf
        self._converted = (None, None)  # (frame, its RGB array): a frame shown on several grid points

    def add(self, frame, t: float) -> bool:
        """Take one decoded frame at time ``t``; True once the window is past."""
        if t >= self.end:
            return True
        if t >= self.start:
            if self.req.gray:
                self._add_gray(frame, t)
            if self.req.rgb_fps:  # grid points before this frame takes over are shown by the previous one
                self._fill_grid(self.prev if self.prev is not None else frame, min(t, self.end), self._shift())
            self.last_t = max(self.last_t, t)
        self.prev = frame
        return False

    def _add_gray(self, frame, t: float) -> None:
        req = self.req
        if not req.gray_max_side:
            g = _gray_native(frame)
        elif req.gray_scaler == "opencv":
            g, self.gray_scale = _luma(frame, req.gray_max_side)
        else:
            g, self.gray_scale = _sws_gray(self.sws, frame, req.gray_max_side, req.gray_scaler, self.threads)
        self.gray.append(g)
        self.gray_t.append(t - self.start)

    def _rgb(self, frame) -> np.ndarray:
        if self._converted[0] is not frame:
            arr = (frame.to_ndarray(format="rgb24") if self.req.rgb_size is None
                   else _rgb_sized(self.sws, frame, self.req.rgb_size, self.threads))
            self._converted = (frame, arr)
        return self._converted[1]

    def _shift(self) -> float:
        """How far before a grid point a frame takes it over: 0 ("last"), half a grid step ("nearest")."""
        return 0.5 / self.req.rgb_fps if self.req.rgb_grid == "nearest" else 0.0

    def _fill_grid(self, shown_by, until: float, shift: float = 0.0) -> None:
        """Grid points up to ``until`` get ``shown_by``: those before it ("last"), or, with ``shift``, those
        whose point + shift is at or before it (FFmpeg rounds a tie to the later frame's point)."""
        fps = self.req.rgb_fps
        while ((self.start + len(self.rgb_t) / fps + shift <= until + 1e-9) if shift
               else (self.start + len(self.rgb_t) / fps < until)):
            self.rgb.append(self._rgb(shown_by))
            self.rgb_t.append(len(self.rgb_t) / fps)

    def finish(self, clip: DecodedClip, fps: float) -> float:
        """Store the frames on ``clip``; returns the seconds of the window the video covers."""
        if not self.gray_t and not self.rgb_t and self.prev is None:
            raise DecodeError("decode_error", "no decodable video frames")
        frame_dur = 1.0 / fps if fps > 0 else 0.0
        video_end = self.last_t + frame_dur if self.last_t > -math.inf else self.start
        if self.req.rgb_fps and self.prev is not None:
            # grid points after the last decoded frame but inside the video keep its last frame
            self._fill_grid(self.prev, min(self.end, video_end))
        if self.req.gray:
            clip.gray = np.stack(self.gray) if self.gray else np.zeros((0, 1, 1), np.uint8)
            clip.gray_times = np.asarray(self.gray_t, np.float64)
            clip.gray_scale = self.gray_scale
        if self.req.rgb_fps:
            empty = (0, self.req.rgb_size or 1, self.req.rgb_size or 1, 3)
            clip.rgb = np.stack(self.rgb) if self.rgb else np.zeros(empty, np.uint8)
            clip.rgb_times = np.asarray(self.rgb_t, np.float64)
        return min(self.end, video_end) - self.start


class _AudioChunks:
    """The audio frames of the window, channels kept; mixed and resampled once at the end."""

    def __init__(self, start: float, end: float):
        self.start, self.end = start, end
        self.chunks: list[np.ndarray] = []
        self.t0: float | None = None

    def add(self, frame, t: float) -> bool:
        """Take one decoded frame at time ``t``; True once the window is past."""
        if t >= self.end:
            return True
        channels = _channels(frame)
        if t + channels.shape[1] / frame.sample_rate > self.start:
            if self.t0 is None:
                self.t0 = t
            self.chunks.append(channels)
        return False

    def _window(self, samples: np.ndarray, lead: int, sr: int) -> np.ndarray:
        """Samples from the window start (``lead`` > 0: the audio starts later) to its end."""
        out = samples[..., max(0, -lead):]
        if math.isfinite(self.end):
            out = out[..., : max(0, int(round((self.end - self.start) * sr)) - max(0, lead))]
        return out

    def finish(self, clip: DecodedClip, req: DecodeRequest, stream) -> float:
        """Store the audio on ``clip``; returns the seconds of the window the audio covers."""
        if not self.chunks:
            raise DecodeError("decode_error", "no decodable audio in window")
        sr = clip.native_sr
        lead = int(round((self.t0 - self.start) * sr))
        same_layout = len({c.shape[0] for c in self.chunks}) == 1
        if req.audio_native:
            if not same_layout:
                raise DecodeError("decode_error", "audio channel count changes within the window")
            clip.audio_native = self._window(np.concatenate(self.chunks, axis=1), lead, sr)
            clip.audio_layout = stream.layout.name
        mono = (_mono(np.concatenate(self.chunks, axis=1)) if same_layout
                else np.concatenate([_mono(c) for c in self.chunks]))
        mono = self._window(mono, lead, sr)
        if lead > 0:  # audio starts after the window start: keep it on the clock with silence
            mono = np.concatenate([np.zeros(lead, np.float32), mono])
            clip.audio_lead_s = lead / sr
        for rate in req.audio_rates:
            clip.audio[rate] = resample(mono, sr, rate, req.resampler)
        return mono.size / sr


def _demux(container, plan: _Plan, video: _VideoFrames | None, audio: _AudioChunks | None,
           deadline: _Deadline) -> None:
    """One pass over the packets of the wanted streams until both are past the window."""
    if plan.start > 1.0:
        seek_stream = plan.vstream if plan.vstream is not None else plan.astream
        container.seek(int(max(0.0, plan.start - 1.0) / seek_stream.time_base), stream=seek_stream, backward=True)
    sinks = {"video": video, "audio": audio}
    done = {kind: sink is None for kind, sink in sinks.items()}
    for packet in container.demux([s for s in (plan.vstream, plan.astream) if s is not None]):
        deadline.check()
        kind = packet.stream.type
        if done.get(kind, True):
            continue
        for frame in packet.decode():
            if frame.pts is not None and frame.time is not None and sinks[kind].add(frame, float(frame.time)):
                done[kind] = True
                break
        if all(done.values()):
            break


def _decode_open(container, path: str, req: DecodeRequest, limits: DecodeLimits, deadline: _Deadline) -> DecodedClip:
    plan = _plan(container, req)
    threads = video_threads(limits)
    video = audio = None
    if plan.vstream is not None:
        _configure_video(plan.vstream, req, threads)
        video = _VideoFrames(req, plan.start, plan.end, threads)
    if plan.astream is not None:
        audio = _AudioChunks(plan.start, plan.end)
    _demux(container, plan, video, audio, deadline)

    native_sr = container.streams.audio[0].sample_rate if container.streams.audio else 0
    clip = DecodedClip(path=path, start_s=plan.start, duration_s=0.0, video_fps=plan.fps, native_sr=native_sr)
    covered = []
    if video is not None:
        covered.append(video.finish(clip, plan.fps))
    if audio is not None:
        covered.append(audio.finish(clip, req, plan.astream))
    clip.duration_s = float(min(covered)) if covered else 0.0
    if clip.duration_s < limits.min_duration_s:
        raise DecodeError("too_short", f"{clip.duration_s:.2f}s < {limits.min_duration_s:.2f}s")
    return clip
