"""The one muxer: video (encoded from frames, or copied packet for packet) and PCM audio in one file.

Every writer of media in the project goes through ``mux``: the synthetic test clips
(``core.synth``), rendered augmentations (``augment.render.write_mp4``) and the sampler's
soundtrack-on-video (``train.sample.mux``). Audio is interleaved by time: before a video frame
presented at time t is muxed, all audio samples before t are, so a demuxer never has to buffer
one stream far ahead of the other. Audio sample 0 is presented at ``start_pts / sample_rate``;
with a lossless codec (ALAC, FLAC, PCM) there is no encoder priming, so that is exact. AAC's
priming goes into the mp4 edit list, which FFmpeg honours on decode.

The file appears atomically (``core.atomic.atomic_output``): a failed write leaves nothing that
looks like a real clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping

import av
import numpy as np

from core.atomic import atomic_output

_PLANAR_TO_PACKED = {"s16p": "s16", "fltp": "flt", "s32p": "s32"}
# FFmpeg muxer by file suffix (the temporary file's own name says nothing)
_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".m4a": "mp4", ".mov": "mov", ".mkv": "matroska", ".mka": "matroska",
            ".webm": "webm", ".avi": "avi", ".wav": "wav", ".flac": "flac"}


@dataclass(frozen=True)
class VideoTrack:
    """Frames to encode: ``frames`` yields ``(image, time_s)``; ``time_s`` is exact (a Fraction)."""

    frames: Iterable[tuple[np.ndarray, Fraction]]
    size: tuple[int, int]  # (width, height), both even for yuv420p
    rate: Fraction = Fraction(25)
    codec: str = "libx264"
    options: Mapping[str, str] = field(default_factory=dict)
    frame_format: str = "rgb24"  # the layout of the arrays ``frames`` yields (rgb24 or yuv420p)
    time_base: Fraction | None = None  # the encoder's; None: 1 / rate


@dataclass(frozen=True)
class VideoCopy:
    """The first video stream of ``source``, copied packet for packet (lossless, no re-encode)."""

    source: str | Path


@dataclass(frozen=True)
class AudioTrack:
    """``pcm`` is ``[channels, n]``: float in [-1, 1] (clipped and rounded to 16 bit for s16 codecs) or int16."""

    pcm: np.ndarray
    sample_rate: int
    codec: str = "flac"
    sample_format: str | None = None  # the encoder's (e.g. s16p for ALAC, s16 for FLAC); None: its default
    start_pts: int = 0  # sample 0 is presented at start_pts / sample_rate
    chunk: int = 1024  # samples per frame handed to the encoder
    channel_layout: str | None = None  # FFmpeg's name (e.g. "5.1"); None: mono or stereo by channel count

    @property
    def layout(self) -> str:
        return self.channel_layout or {1: "mono", 2: "stereo"}.get(self.pcm.shape[0], f"{self.pcm.shape[0]}c")


def mux(path: str | Path, video: VideoTrack | VideoCopy | None = None, audio: AudioTrack | None = None, *,
        container_format: str | None = None, options: Mapping[str, str] | None = None) -> Path:
    """Write ``path`` with the given streams (video first, then audio) and return it.

    ``options`` are the container's (e.g. ``{"fflags": "+bitexact"}`` for reproducible bytes,
    ``{"movie_timescale": "16000"}`` so an mp4 stores an audio start offset exactly).
    """
    if video is None and audio is None:
        raise ValueError("mux needs a video or an audio track")
    if audio is not None and np.asarray(audio.pcm).ndim != 2:
        raise ValueError(f"audio.pcm must be [channels, samples], got shape {np.shape(audio.pcm)}")
    path = Path(path)
    container_format = container_format or _FORMATS.get(path.suffix.lower())
    if container_format is None:
        raise ValueError(f"cannot tell the container of {path.name}: pass container_format "
                         f"(or use one of {', '.join(sorted(_FORMATS))})")
    with atomic_output(path) as tmp:
        with av.open(str(tmp), "w", format=container_format, options=dict(options or {})) as container:
            if isinstance(video, VideoCopy):
                with av.open(str(video.source)) as src:
                    _write(container, src, video, audio)
            else:
                _write(container, None, video, audio)
    return path


def _write(container, src, video, audio: AudioTrack | None) -> None:
    vin = src.streams.video[0] if src is not None else None
    vstream = None
    if vin is not None:
        vstream = container.add_stream_from_template(vin)
    elif video is not None:
        vstream = _add_video(container, video)
    feeder = _AudioFeeder(container, audio) if audio is not None else None
    if vin is not None:
        for packet in src.demux(vin):
            if packet.dts is None:  # the demuxer's flush packet
                continue
            if feeder is not None:
                feeder.feed_until(packet.dts * vin.time_base)
            packet.stream = vstream
            container.mux(packet)
    elif video is not None:
        tb = vstream.codec_context.time_base
        for image, t in video.frames:
            if feeder is not None:
                feeder.feed_until(t)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=video.frame_format)
            frame.pts, frame.time_base = int(t / tb), tb
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
    if feeder is not None:
        feeder.finish()


def _add_video(container, video: VideoTrack):
    w, h = video.size
    if w % 2 or h % 2:
        raise ValueError(f"video size must be even for yuv420p, got {video.size}")
    rate = Fraction(video.rate)
    stream = container.add_stream(video.codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = dict(video.options)
    stream.codec_context.time_base = video.time_base or 1 / rate
    return stream


class _AudioFeeder:
    """Hands the encoder ``chunk``-sample frames, up to a time, in the stream's own sample format."""

    def __init__(self, container, audio: AudioTrack):
        self.container, self.audio = container, audio
        self.stream = container.add_stream(audio.codec, rate=audio.sample_rate, layout=audio.layout)
        if audio.sample_format:
            self.stream.format = audio.sample_format
        fmt = self.stream.format.name
        self.format = fmt
        self.pcm = _as_pcm(np.asarray(audio.pcm), fmt)
        self.next = 0  # next sample (index into pcm) to encode

    def feed_until(self, t: Fraction | float) -> None:
        """Encode every sample presented before time ``t``."""
        until = math.floor(Fraction(t) * self.audio.sample_rate) - self.audio.start_pts
        self._feed(min(until, self.pcm.shape[1]))

    def finish(self) -> None:
        self._feed(self.pcm.shape[1])
        self.container.mux(self.stream.encode(None))

    def _feed(self, until: int) -> None:
        a = self.audio
        while self.next < until:
            end = min(self.next + a.chunk, self.pcm.shape[1])
            block = self.pcm[:, self.next:end]
            if not self.format.endswith("p"):  # packed: one row of interleaved samples
                block = block.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format=self.format, layout=a.layout)
            frame.sample_rate, frame.time_base = a.sample_rate, Fraction(1, a.sample_rate)
            frame.pts = a.start_pts + self.next
            self.container.mux(self.stream.encode(frame))
            self.next = end


def _as_pcm(pcm: np.ndarray, fmt: str) -> np.ndarray:
    """Samples in the dtype ``fmt`` needs: 16-bit codecs get float clipped at full scale and rounded."""
    base = _PLANAR_TO_PACKED.get(fmt, fmt)
    if base == "s16":
        if pcm.dtype == np.int16:
            return pcm
        return np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
    if base == "flt":
        if pcm.dtype == np.int16:
            return (pcm.astype(np.float32) / 32768.0).astype(np.float32)
        return pcm.astype(np.float32, copy=False)
    raise ValueError(f"unsupported audio sample format {fmt!r} (use an s16 or float codec format)")
