"""Play a recipe: decoded frames and audio of the augmented sample, or an mp4 a person can watch.

``render(recipe, RenderRequest(...))`` returns a ``core.decode.DecodedClip`` whose times are
output times, so the encode stage treats real and augmented clips alike. Each segment is decoded
once (``core.decode.decode``) and mapped with ``t = dst_start + (s - src_start) / rate``:

- frames are chosen by mapped time, never interpolated: the frame shown at output time t is the
  source frame shown at ``src_start + (t - dst_start) * rate``. RGB frames come from the
  decoder's own frame grid, placed so that its points are exactly those mapped times; greyscale
  frames (every output frame, for AV-Align) are picked from the decoded native frames;
- audio is decoded at each requested rate (mono) and, with ``audio_native``, at the first source's
  own rate and channels; each segment is played at its rate (``augment.stretch``) and placed
  sample-exactly; where two segments meet, an equal-power crossfade of ``crossfade_s`` centred on
  the cut (moved to one side when a source has no audio beyond the cut). A first source whose
  audio track starts late keeps that offset (``audio_lead_s``), as ``core.decode`` reports it;
- frames of later segments with another size are scaled to cover the first segment's size and
  centre-cropped (aspect kept).

Source trouble raises ``DecodeError`` (ledger reasons ``missing_file``, ``decode_error``,
``too_short``...) with the recipe key and segment in its detail; a malformed recipe raises
``PlanError``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import soxr

from augment.config import STRETCH_METHODS
from augment.recipe import PlanError, Recipe, Segment
from augment.stretch import stretch_audio
from core.config import DEFAULT_SIGNAL, DecodeLimits, SignalConfig
from core.decode import DecodedClip, DecodeError, DecodeRequest, decode, probe
from core.mux import AudioTrack, VideoTrack, mux

_NUDGE_S = 1e-6  # a frame whose time equals a mapped time is the frame shown then
_GRAY_MARGIN_S = 0.25  # decode this much before a segment so the frame shown at its start is included
_AUDIO_CONTEXT_S = 0.05  # source audio around a stretched segment, so filters see no edge
_COVER_SLACK_S = 0.1  # a source may fall this short of its segment (last frame held, silence padded)


@dataclass(frozen=True)
class RenderRequest:
    """What the caller needs from an augmented sample (mirrors ``DecodeRequest``)."""

    audio_rates: tuple[int, ...] = ()  # mono (channel mean), as core.decode gives it
    audio_native: bool = False  # also the first source's own rate and channels (audio_native, audio_layout)
    rgb_fps: float | None = None  # RGB frames on the grid k / rgb_fps of output time (CLIP: 2 fps)
    gray: bool = False  # greyscale frames on the grid k / gray_fps (AV-Align)
    gray_fps: float | None = None  # None: the recipe's native output rate (video_fps)
    gray_max_side: int | None = None  # as in DecodeRequest: None keeps native resolution
    stretch_method: str | None = None  # None: the recipe's own method
    resampler: str = "soxr_hq"  # how audio_rates are made from the source rate, as DecodeRequest.resampler


def as_recipe(recipe: Recipe | Mapping[str, Any]) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.from_row(recipe)


def native_fps(recipe: Recipe) -> float:
    """The output frame rate that shows every source frame of the first segment once."""
    if recipe.video_fps > 0:
        return recipe.video_fps
    seg = recipe.segments[0]
    return probe(seg.video_path).video_fps * seg.rate


def _grid(fps: float, duration: float) -> np.ndarray:
    n = max(0, math.ceil(duration * fps - 1e-9))
    return np.arange(n, dtype=np.float64) / fps


def _cover(frame: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scale to cover ``shape`` (H, W) and centre-crop: aspect ratio kept, nothing stretched."""
    h, w = frame.shape[:2]
    th, tw = shape[:2]
    if (h, w) == (th, tw):
        return frame
    scale = max(th / h, tw / w)
    nh, nw = max(th, int(math.ceil(h * scale))), max(tw, int(math.ceil(w * scale)))
    resized = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y0, x0 = (nh - th) // 2, (nw - tw) // 2
    return resized[y0: y0 + th, x0: x0 + tw]


@dataclass
class _Played:
    """One decoded segment, in output time."""

    seg: Segment
    clip: DecodedClip
    dec_start: float
    audio_t0: float  # output time of audio sample 0
    pre_s: float  # output seconds of real audio available before dst_start
    post_s: float  # and after dst_end
    rgb_first: int  # index in clip.rgb of the frame for the segment's first output grid point
    audio: dict = dataclasses.field(default_factory=dict)  # rate or NATIVE -> stretched [C, n] audio


NATIVE = "native"  # key of the native-rate, all-channel audio in _Played.audio


def _decode_segment(recipe: Recipe, i: int, req: RenderRequest, limits: DecodeLimits) -> _Played:
    seg = recipe.segments[i]
    last = len(recipe.segments) - 1
    r, s0, s1, d0 = seg.rate, seg.src_start_s, seg.src_end_s, seg.dst_start_s
    xf = recipe.crossfade_s
    pre, post = (xf if i > 0 else 0.0), (xf if i < last else 0.0)
    want_audio = bool(req.audio_rates) or req.audio_native
    ctx = _AUDIO_CONTEXT_S if abs(r - 1.0) > 1e-12 else 0.0
    starts, ends = [s1], [s1]
    if want_audio:
        starts.append(s0 - pre * r - ctx)
        ends.append(s1 + post * r + ctx)
    if req.gray:
        starts.append(s0 - _GRAY_MARGIN_S)
    if req.rgb_fps:
        starts.append(s0)
    start = min(starts)
    rgb_first = 0
    src_rgb_fps = None
    if req.rgb_fps:
        # put the decoder's RGB grid (start + j / src_rgb_fps) exactly on the mapped output grid
        step = r / req.rgb_fps
        k0 = math.ceil(d0 * req.rgb_fps - 1e-9)
        s_first = seg.to_source(k0 / req.rgb_fps)
        rgb_first = max(0, math.ceil((s_first - start) / step - 1e-9))
        start = s_first - rgb_first * step + _NUDGE_S
        src_rgb_fps = req.rgb_fps / r
    end = max(ends)
    dreq = DecodeRequest(start_s=start, duration_s=end - start, audio_rates=tuple(req.audio_rates),
                         audio_native=req.audio_native, gray=req.gray, gray_max_side=req.gray_max_side,
                         rgb_fps=src_rgb_fps, need_audio=want_audio, need_video=bool(req.gray or req.rgb_fps),
                         resampler=req.resampler)
    try:
        clip = decode(seg.video_path, dreq, dataclasses.replace(limits, min_duration_s=0.0))
    except DecodeError as e:
        raise DecodeError(e.reason, f"{recipe.key} segment {i} ({seg.source_key}, {seg.video_path}): "
                                    f"{e.detail or e.reason}") from e
    covered_to = start + clip.duration_s
    if covered_to < s1 - _COVER_SLACK_S:
        raise DecodeError("too_short", f"{recipe.key} segment {i} ({seg.source_key}): {seg.video_path} "
                                       f"ends at {covered_to:.2f}s, the recipe plays it to {s1:.2f}s")
    pre_s = post_s = 0.0
    if want_audio:
        audio_s = (clip.audio[req.audio_rates[0]].size / req.audio_rates[0] if req.audio_rates
                   else clip.audio_lead_s + clip.audio_native.shape[1] / clip.native_sr)
        pre_s = min(pre, max(0.0, s0) / r)  # nothing exists before file time 0
        post_s = min(post, max(0.0, (start + audio_s - s1) / r))
    return _Played(seg, clip, start, seg.to_output(start), pre_s, post_s, rgb_first)


def _native_channels(played: _Played, rate: int, channels: int) -> np.ndarray:
    """A segment's own channels on the window clock (leading silence restored) at ``rate``, as
    ``channels`` channels: equal counts pass through, otherwise the mean goes to every channel."""
    clip = played.clip
    x = clip.audio_native
    lead = int(round(clip.audio_lead_s * clip.native_sr))
    if lead > 0:
        x = np.concatenate([np.zeros((x.shape[0], lead), np.float32), x], axis=1)
    if clip.native_sr != rate:
        x = np.atleast_2d(soxr.resample(x.T, clip.native_sr, rate, quality="HQ").T)
    if x.shape[0] != channels:
        x = np.repeat(x.mean(axis=0, keepdims=True), channels, axis=0)
    return np.ascontiguousarray(x, np.float32)


def _stretch_segments(played: list[_Played], req: RenderRequest, method: str) -> tuple[int, int, str]:
    """Play every segment's audio at its rate; returns the native rate, channels and layout used."""
    first = played[0].clip
    native = (first.native_sr, first.audio_native.shape[0], first.audio_layout) if req.audio_native else (0, 0, "")
    for p in played:
        r = p.seg.rate
        for rate in req.audio_rates:
            p.audio[rate] = stretch_audio(p.clip.audio[rate], rate, r, method)[None, :]
        if req.audio_native:
            x = _native_channels(p, native[0], native[1])
            p.audio[NATIVE] = np.stack([stretch_audio(ch, native[0], r, method) for ch in x])
    return native


def _take(played: _Played, key, rate: int, k_lo: int, k_hi: int) -> np.ndarray:
    """Output samples ``[k_lo, k_hi)`` of one segment's audio (zeros where it has none)."""
    y = played.audio[key]
    shift = int(round(played.audio_t0 * rate))
    lo, hi = k_lo - shift, k_hi - shift
    out = np.zeros((y.shape[0], k_hi - k_lo), np.float32)
    a, b = max(lo, 0), min(hi, y.shape[1])
    if b > a:
        out[:, a - lo: b - lo] = y[:, a:b]
    return out


def _mix_audio(played: list[_Played], key, rate: int, duration: float, crossfade: float) -> np.ndarray:
    """[C, n] output audio: segments placed sample-exactly, equal-power crossfades at the cuts."""
    total = int(round(duration * rate))
    out = np.zeros((played[0].audio[key].shape[0], total), np.float32)
    bounds = [int(round(p.seg.dst_start_s * rate)) for p in played] + [total]
    for j, p in enumerate(played):
        out[:, bounds[j]: bounds[j + 1]] = _take(p, key, rate, bounds[j], bounds[j + 1])
    for j in range(len(played) - 1):
        prev, nxt = played[j], played[j + 1]
        # fade over [cut - u, cut + v]: the next segment needs audio before the cut, the previous after
        length = crossfade
        u = min(nxt.pre_s, max(length / 2, length - prev.post_s))
        v = min(prev.post_s, length - u)
        k_cut = bounds[j + 1]
        k_lo, k_hi = k_cut - int(round(u * rate)), k_cut + int(round(v * rate))
        k_lo, k_hi = max(k_lo, 0), min(k_hi, total)
        if k_hi - k_lo < 2:
            continue
        theta = (np.arange(k_hi - k_lo) + 0.5) / (k_hi - k_lo) * (np.pi / 2)
        out[:, k_lo:k_hi] = (_take(prev, key, rate, k_lo, k_hi) * np.cos(theta)
                             + _take(nxt, key, rate, k_lo, k_hi) * np.sin(theta)).astype(np.float32)
    return out


def _segment_of(played: list[_Played], t: np.ndarray) -> np.ndarray:
    starts = np.array([p.seg.dst_start_s for p in played])
    return np.clip(np.searchsorted(starts, t + 1e-9, side="right") - 1, 0, len(played) - 1)


def _source_indices(p: _Played, kind: str, times: np.ndarray, ks: np.ndarray, n: int) -> np.ndarray:
    """Which decoded source frame each output grid point ``times[ks]`` of segment ``p`` shows."""
    if kind == "rgb":  # decoded on the output grid already: consecutive frames from the segment's first
        return np.minimum(p.rgb_first + (ks - ks[0]), n - 1)  # past the video's end: last frame held
    src_times = p.dec_start + p.clip.gray_times
    wanted = p.seg.to_source(times[ks])
    return np.clip(np.searchsorted(src_times, wanted + _NUDGE_S, side="right") - 1, 0, n - 1)


def _frames_on_grid(played: list[_Played], fps: float, duration: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Output frames (``kind``: ``rgb`` or ``gray``) at ``fps``, each chosen by its mapped source time."""
    times = _grid(fps, duration)
    which = _segment_of(played, times)
    frames = []
    shape = None
    for j, p in enumerate(played):
        ks = np.flatnonzero(which == j)
        if not len(ks):
            continue
        source = getattr(p.clip, kind)
        if source is None or len(source) == 0:
            raise DecodeError("decode_error", f"segment {j} ({p.seg.source_key}): no frames decoded")
        for i in _source_indices(p, kind, times, ks, len(source)):
            shape = shape or source[i].shape
            frames.append(_cover(source[i], shape))
    if not frames:
        return np.zeros((0, 1, 1, 3) if kind == "rgb" else (0, 1, 1), np.uint8), times
    return np.stack(frames), times


def render(recipe: Recipe | Mapping[str, Any], req: RenderRequest, limits: DecodeLimits = DecodeLimits()) -> DecodedClip:
    """Decode the augmented sample a recipe describes; all times in the result are output times."""
    recipe = as_recipe(recipe)
    if not (req.audio_rates or req.audio_native or req.rgb_fps or req.gray):
        raise ValueError("RenderRequest asks for nothing: set audio_rates, audio_native, rgb_fps or gray")
    method = req.stretch_method or recipe.stretch_method
    if method not in STRETCH_METHODS:
        raise PlanError(f"{recipe.key}: unknown stretch method {method!r}")
    played = [_decode_segment(recipe, i, req, limits) for i in range(len(recipe.segments))]
    first = played[0]
    fps = recipe.video_fps if recipe.video_fps > 0 else first.clip.video_fps * first.seg.rate
    out = DecodedClip(path=f"augment:{recipe.key}", start_s=0.0, duration_s=recipe.duration_s,
                      video_fps=req.gray_fps or fps, native_sr=first.clip.native_sr)
    native_sr, _, layout = _stretch_segments(played, req, method)
    # as in core.decode: a source track that starts late is padded with silence in ``audio``
    # (``audio_lead_s`` says how much) and starts at its first real sample in ``audio_native``
    first_sample = float(first.seg.to_output(first.dec_start + first.clip.audio_lead_s))
    out.audio_lead_s = max(0.0, first_sample) if (req.audio_rates or req.audio_native) else 0.0
    for rate in req.audio_rates:
        out.audio[rate] = _mix_audio(played, rate, rate, recipe.duration_s, recipe.crossfade_s)[0]
    if req.audio_native:
        native = _mix_audio(played, NATIVE, native_sr, recipe.duration_s, recipe.crossfade_s)
        lead = max(0, int(round(first_sample * native_sr)))
        out.audio_native, out.audio_layout, out.audio_lead_s = native[:, lead:], layout, lead / native_sr
    if req.rgb_fps:
        out.rgb, out.rgb_times = _frames_on_grid(played, req.rgb_fps, recipe.duration_s, "rgb")
    if req.gray:
        out.gray, out.gray_times = _frames_on_grid(played, out.video_fps, recipe.duration_s, "gray")
        out.gray_scale = first.clip.gray_scale
    return out


def render_row(row: Mapping[str, Any], *, audio_rates: tuple[int, ...] | None = None, rgb_fps: float | None = None,
               gray: bool = False, gray_max_side: int | None = None, signal: SignalConfig = DEFAULT_SIGNAL,
               limits: DecodeLimits = DecodeLimits(), resampler: str = "soxr_hq") -> DecodedClip:
    """Render a plan row (as stored, or as a runner passes it): the encode stage's entry point.

    Unset rates default to the feature signal: audio at ``signal.feature_sr``, RGB at ``signal.clip_fps``;
    ``resampler`` makes them from the source rate (the encode stage passes its mel's).
    """
    req = RenderRequest(audio_rates=tuple(audio_rates) if audio_rates is not None else (signal.feature_sr,),
                        rgb_fps=rgb_fps if rgb_fps is not None else signal.clip_fps, gray=gray,
                        gray_max_side=gray_max_side, resampler=resampler)
    return render(Recipe.from_row(row), req, limits)


def write_mp4(clip: DecodedClip, path: str | Path, fps: float, sample_rate: int | None = None,
              crf: int = 18) -> Path:
    """H.264 video (every ``clip.rgb`` frame at ``fps``) with lossless FLAC audio.

    The audio is ``clip.audio_native`` (the source's own rate and channels, its track starting
    ``clip.audio_lead_s`` after the picture as the source's did) when ``sample_rate`` is None, else
    the mono ``clip.audio[sample_rate]`` from time 0. FLAC, not AAC: AAC's encoder delay (1024
    priming samples, 64 ms at 16 kHz) would move the sound against the picture. Frame k is
    presented at k / fps, audio sample 0 at time 0.
    """
    if clip.rgb is None or not len(clip.rgb):
        raise ValueError("write_mp4 needs RGB frames: render with rgb_fps set")
    if sample_rate is None:
        if clip.audio_native is None:
            raise ValueError("write_mp4 without sample_rate needs native audio: render with audio_native=True")
        audio, sample_rate, layout = clip.audio_native, clip.native_sr, clip.audio_layout
        first_pts = int(round(clip.audio_lead_s * sample_rate))  # the audio track starts where the source's did
    elif sample_rate in clip.audio:
        audio, layout, first_pts = clip.audio[sample_rate][None, :], "mono", 0
    else:
        raise ValueError(f"write_mp4 needs audio at {sample_rate} Hz: render with audio_rates=({sample_rate},)")
    rate = Fraction(fps).limit_denominator(1001)
    h, w = clip.rgb.shape[1] // 2 * 2, clip.rgb.shape[2] // 2 * 2
    frames = ((img[:h, :w], Fraction(k) / rate) for k, img in enumerate(clip.rgb))
    video = VideoTrack(frames=frames, size=(w, h), rate=rate, options={"crf": str(crf), "preset": "veryfast"})
    track = AudioTrack(pcm=audio, sample_rate=sample_rate, codec="flac", sample_format="s16", start_pts=first_pts,
                       chunk=4096, channel_layout=layout)
    # movie_timescale: the audio track's start offset is stored in this unit (default 1 ms would round it)
    return mux(path, video, track, options={"movie_timescale": str(sample_rate)})


def render_mp4(recipe: Recipe | Mapping[str, Any], path: str | Path, sample_rate: int | None = None,
               fps: float | None = None, limits: DecodeLimits = DecodeLimits()) -> DecodedClip:
    """Render a recipe to a watchable mp4 at its native frame rate (or ``fps``); returns the decoded sample.

    Audio keeps the first source's rate and channels unless ``sample_rate`` asks for mono at that rate.
    """
    recipe = as_recipe(recipe)
    fps = fps or native_fps(recipe)
    req = (RenderRequest(audio_native=True, rgb_fps=fps) if sample_rate is None
           else RenderRequest(audio_rates=(sample_rate,), rgb_fps=fps))
    clip = render(recipe, req, limits)
    write_mp4(clip, path, fps, sample_rate)
    return clip
