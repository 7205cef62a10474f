"""AV-Align (Yariv et al. 2023): how well audio onsets line up with peaks of visual motion.

The published metric (``av_align.py`` in the authors' TempoTokens repository) scores one file:
audio onsets from librosa's defaults at 22050 Hz, video motion as the mean Farneback optical-flow
magnitude between consecutive native-resolution greyscale frames, motion peaks as strict local
maxima at ``i / fps``, and an intersection over union of onsets and motion peaks matched within
one frame. Two revisions of that file are published and both are computed here, in one pass
(they share the onsets and the motion trajectory; docs/metrics.md says what differs):

- ``2025`` (2025-02-13, the current file): motion peaks must be >= 0.1, and each video peak
  matches at most one onset;
- ``2023`` (2023-10, the original, what VTA-LDM-era papers ran): no floor, and an onset matches
  the first video peak within one frame even when another onset already did (it reads an
  undefined ``n``, taken as ``len(arr)``). Its "IoU" can therefore exceed 1.

``reference`` mode reproduces the published numbers: the audio is the file's own audio track
mixed to mono by the channel mean and resampled with soxr HQ, exactly what ``librosa.load``
does to a lossless float WAV of it (nothing clips), and the frames are decoded through OpenCV's
colour path. ``fast`` mode (the default for cleaning) changes only the video: small luma frames,
Farneback there, the magnitudes divided by the scale so the 0.1 floor keeps its meaning.
``bench/av_align.py`` measures how closely the two agree and how much faster ``fast`` is.

One deliberate difference: the published code divides by zero when a clip has neither onsets
nor motion peaks; here that clip scores 0.

``python -m filters.av_align [--mode reference|fast] [--version 2025|2023] FILE...`` prints one
JSON line per file, with both revisions' scores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal
from pathlib import Path

import cv2
import librosa
import numpy as np

from core.config import DEFAULT_SIGNAL, DecodeLimits, SignalConfig
from core.decode import GRAY_SCALERS, DecodedClip, DecodeError, DecodeRequest, decode
from core.flow import FARNEBACK, farneback

Mode = Literal["reference", "fast"]
Version = Literal["2025", "2023"]
VERSIONS: tuple[str, ...] = ("2025", "2023")


@dataclass(frozen=True)
class Revision:
    """What one published revision of ``av_align.py`` does differently."""

    peak_floor: float | None  # motion peaks below this (px/frame) are ignored; None: no floor
    one_to_one: bool  # each video peak matches at most one onset


REVISIONS: dict[str, Revision] = {"2025": Revision(peak_floor=0.1, one_to_one=True),
                                  "2023": Revision(peak_floor=None, one_to_one=False)}
# the ledger columns a result fills (AVAlignResult.ledger_fields): the selected revision, then each one
LEDGER_FIELDS: tuple[str, ...] = ("av_align", "audio_peaks", "video_peaks",
                                  *(f"{c}_{v}" for v in VERSIONS for c in ("av_align", "video_peaks")))


@dataclass(frozen=True)
class AVAlignConfig:
    """How AV-Align is computed. Fields without ``init`` are the published definition, not knobs."""

    mode: Mode = field(default="fast", metadata={
        "help": "reference: native-resolution flow, reproduces the published numbers; "
                "fast: flow on small luma frames, same keep/drop decisions, far cheaper"})
    version: Version = field(default="2025", metadata={
        "help": "which published revision of av_align.py the score (and the av_align filter) follows: "
                "2025 (peaks >= 0.1, one-to-one matching) or 2023 (the original, used by VTA-LDM-era "
                "papers); both are computed and stored either way"})
    fast_max_side: int = field(default=64, metadata={
        "help": "fast mode: long side (px) of the frames the optical flow runs on"})
    fast_skip_loop_filter: bool = field(default=True, metadata={
        "help": "fast mode: decode without the deblocking filter (FFmpeg skip_loop_filter=all); "
                "docs/benchmarks.md has what it saves and moves"})
    fast_scaler: str = field(default="opencv", metadata={
        "choices": GRAY_SCALERS,
        "help": "fast mode: how frames shrink to fast_max_side: opencv (luma plane, Gaussian pyramid) "
                "or a libswscale algorithm inside FFmpeg (fast_bilinear, area, ...)"})
    # Farneback (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags) as published.
    farneback: tuple[float, int, int, int, int, float, int] = field(default=FARNEBACK, init=False)
    sample_rate: int = field(default=DEFAULT_SIGNAL.av_align_sr, init=False)  # librosa's default rate

    def __post_init__(self) -> None:
        if self.mode not in ("reference", "fast"):
            raise ValueError(f"AV-Align mode must be 'reference' or 'fast', not {self.mode!r}")
        if self.version not in VERSIONS:
            raise ValueError(f"AV-Align version must be one of {', '.join(VERSIONS)}, not {self.version!r}")
        if self.fast_max_side < 16:
            raise ValueError(f"fast_max_side must be at least 16 px, not {self.fast_max_side}")
        if self.fast_scaler not in GRAY_SCALERS:
            raise ValueError(f"fast_scaler must be one of {', '.join(GRAY_SCALERS)}, not {self.fast_scaler!r}")

    @property
    def revision(self) -> Revision:
        return REVISIONS[self.version]


def run_metadata(config: AVAlignConfig) -> dict:
    """What a run records about the metric: the selected revision and what each revision does."""
    return {"version": config.version, "mode": config.mode, "fast_max_side": config.fast_max_side,
            "farneback": list(config.farneback), "sample_rate": config.sample_rate,
            "revisions": {v: {"peak_floor": r.peak_floor, "one_to_one": r.one_to_one} for v, r in REVISIONS.items()},
            "ledger_columns": {"av_align": f"the {config.version} revision",
                               **{f"av_align_{v}": f"the {v} revision" for v in VERSIONS}}}


@dataclass
class RevisionScore:
    """One revision's result on a clip (the onsets are shared)."""

    score: float
    video_peaks: int
    matched: int
    video_peak_times: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


@dataclass
class AVAlignResult:
    """The selected revision's numbers at top level; ``revisions`` holds both."""

    version: str
    score: float
    audio_peaks: int
    video_peaks: int
    fps: float
    frames: int
    seconds: float  # wall time: decode + compute for score_clip, compute only for score_decoded
    revisions: dict[str, RevisionScore] = field(repr=False, default_factory=dict)
    audio_peak_times: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    video_peak_times: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    motion: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # native px/frame, per frame

    def ledger_fields(self) -> dict:
        """The ledger columns: ``av_align`` (selected revision) plus one score and peak count per revision."""
        out = {"av_align": float(self.score), "audio_peaks": int(self.audio_peaks),
               "video_peaks": int(self.video_peaks)}
        for v, r in self.revisions.items():
            out[f"av_align_{v}"] = float(r.score)
            out[f"video_peaks_{v}"] = int(r.video_peaks)
        return out


def select_version(table, version: str):
    """A ledger table (pandas) whose ``av_align`` and ``video_peaks`` are ``version``'s stored columns.

    Rows scored before both revisions were stored (no per-revision value) keep what they have."""
    if version not in VERSIONS:
        raise ValueError(f"AV-Align version must be one of {', '.join(VERSIONS)}, not {version!r}")
    out = table.copy()
    for column in ("av_align", "video_peaks"):
        chosen = f"{column}_{version}"
        if chosen in out:
            out[column] = out[chosen].where(out[chosen].notna(), out[column])
    return out


def decode_request_for(config: AVAlignConfig, signal: SignalConfig | None = None) -> DecodeRequest:
    """What the metric needs from a clip in this mode; callers merge it with their own needs."""
    if signal is not None and signal.av_align_sr != config.sample_rate:
        raise ValueError(f"AV-Align is defined at {config.sample_rate} Hz, SignalConfig says {signal.av_align_sr}")
    if config.mode == "reference":  # the exact full-quality path: every pixel, deblocked, OpenCV's colour path
        return DecodeRequest(audio_native=True, gray=True)
    return DecodeRequest(audio_native=True, gray=True, gray_max_side=config.fast_max_side,
                         gray_scaler=config.fast_scaler, skip_loop_filter=config.fast_skip_loop_filter)


def reference_audio(channels: np.ndarray, native_sr: int, sample_rate: int) -> np.ndarray:
    """What ``librosa.load`` makes of a lossless float WAV of these channels: their mean (no clipping,
    whatever the level), resampled to ``sample_rate`` with soxr HQ and librosa's length rule."""
    if channels.ndim != 2 or channels.shape[1] == 0:
        return np.zeros(0, np.float32)
    mono = librosa.to_mono(np.asarray(channels, np.float32)) if channels.shape[0] > 1 else channels[0]
    mono = np.ascontiguousarray(mono, np.float32)
    if native_sr != sample_rate:
        mono = librosa.resample(mono, orig_sr=native_sr, target_sr=sample_rate, res_type="soxr_hq")
    return mono.astype(np.float32, copy=False)


def audio_onsets(y: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset times (s): librosa's onset strength and onset detection with their defaults."""
    if y.size == 0:
        return np.zeros(0)
    envelope = librosa.onset.onset_strength(y=y, sr=sample_rate)
    frames = librosa.onset.onset_detect(onset_envelope=envelope, sr=sample_rate)
    return librosa.frames_to_time(frames, sr=sample_rate)


def video_motion(gray: np.ndarray, config: AVAlignConfig, scale: float = 1.0) -> np.ndarray:
    """Mean Farneback flow magnitude between consecutive frames, in native pixels per frame
    (``scale`` is decoded/native size); the first value is duplicated so there is one per frame."""
    if len(gray) < 2:
        return np.zeros(len(gray))
    values = np.empty(len(gray))
    for i in range(1, len(gray)):
        flow = farneback(gray[i - 1], gray[i], config.farneback)
        values[i] = cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0] / scale
    values[0] = values[1]
    return values


MOTION_DECIMALS = 6  # motion values are compared to 1e-6 px/frame (see video_peaks)


def video_peaks(motion: np.ndarray, fps: float, floor: float | None) -> np.ndarray:
    """Times ``i / fps`` of strict local maxima (>= ``floor`` unless it is None); the first and last
    frame never count."""
    # Farneback's float32 output varies in its last bits from run to run (it depends on how the
    # frames happen to be aligned in memory), which on flat stretches made or unmade strict maxima
    # of pure noise (the 2023 revision, having no floor, counted them). Comparing at 1e-6 px/frame
    # removes that noise and nothing real: see docs/metrics.md.
    m = np.round(np.asarray(motion, dtype=np.float64), MOTION_DECIMALS)
    if m.size < 3:
        return np.zeros(0)
    mid = m[1:-1]
    is_peak = (m[:-2] < mid) & (mid > m[2:])
    if floor is not None:
        is_peak &= mid >= floor
    return (np.nonzero(is_peak)[0] + 1) / fps


def match_peaks(audio_peaks, video_peaks, fps: float, one_to_one: bool = True) -> int:
    """Each audio peak, in order, takes the first video peak strictly within one frame of it; with
    ``one_to_one`` (2025) only a video peak no earlier onset took. Returns the number of matched onsets."""
    window = 1.0 / fps
    used = np.zeros(len(video_peaks), bool)
    matched = 0
    for a in audio_peaks:
        for j, v in enumerate(video_peaks):
            if not (one_to_one and used[j]) and v - window < a < v + window:
                used[j] = True
                matched += 1
                break
    return matched


def av_align_score(audio_peaks, video_peaks, fps: float, version: str = "2025") -> float:
    """Intersection over union of the two peak sets as the given revision counts it; 0 when both
    are empty (the published code divides by zero there)."""
    return _iou(audio_peaks, video_peaks, fps, REVISIONS[version])[0]


def _iou(audio_peaks, video_peaks, fps: float, revision: Revision) -> tuple[float, int]:
    if not fps > 0:
        raise ValueError(f"frame rate must be positive, got {fps}")
    matched = match_peaks(audio_peaks, video_peaks, fps, revision.one_to_one)
    union = len(audio_peaks) + len(video_peaks) - matched
    return (matched / union if union else 0.0), matched


def score_revisions(a_peaks: np.ndarray, motion: np.ndarray, fps: float) -> dict[str, RevisionScore]:
    """Every published revision's score from one set of onsets and one motion trajectory."""
    out = {}
    for version, revision in REVISIONS.items():
        v_peaks = video_peaks(motion, fps, revision.peak_floor)
        score, matched = _iou(a_peaks, v_peaks, fps, revision)
        out[version] = RevisionScore(score=float(score), video_peaks=len(v_peaks), matched=matched,
                                     video_peak_times=v_peaks)
    return out


def warm_up(config: AVAlignConfig = AVAlignConfig()) -> None:
    """Pay librosa's one-off start-up (lazy imports, numba compilation: seconds) before timing
    anything; a worker's ``setup`` can call it so its first clip is not charged for it."""
    noise = np.random.default_rng(0).standard_normal(config.sample_rate).astype(np.float32)
    audio_onsets(noise, config.sample_rate)
    video_motion(np.zeros((2, 32, 32), np.uint8), config)


def score_decoded(clip: DecodedClip, config: AVAlignConfig = AVAlignConfig()) -> AVAlignResult:
    """AV-Align of a clip decoded with (at least) ``decode_request_for(config)``, both revisions."""
    t0 = time.perf_counter()
    if clip.gray is None or clip.audio_native is None:
        raise ValueError("clip lacks greyscale frames or native audio: decode it with decode_request_for(config)")
    if config.mode == "reference" and clip.gray_scale != 1.0:
        raise ValueError(f"reference mode needs native-resolution frames, got scale {clip.gray_scale:.3f}")
    if not clip.video_fps > 0:
        raise DecodeError("decode_error", "video stream has no frame rate")
    y = reference_audio(clip.audio_native, clip.native_sr, config.sample_rate)
    a_peaks = audio_onsets(y, config.sample_rate)
    motion = video_motion(clip.gray, config, clip.gray_scale)
    revisions = score_revisions(a_peaks, motion, clip.video_fps)
    chosen = revisions[config.version]
    return AVAlignResult(version=config.version, score=chosen.score, audio_peaks=len(a_peaks),
                         video_peaks=chosen.video_peaks, fps=float(clip.video_fps), frames=int(len(clip.gray)),
                         seconds=time.perf_counter() - t0, revisions=revisions, audio_peak_times=a_peaks,
                         video_peak_times=chosen.video_peak_times, motion=motion)


def score_clip(path: str | Path, config: AVAlignConfig = AVAlignConfig(), start_s: float = 0.0,
               duration_s: float | None = None, limits: DecodeLimits = DecodeLimits()) -> AVAlignResult:
    """Decode ``[start_s, start_s + duration_s)`` of a file (all of it by default) and score it."""
    t0 = time.perf_counter()
    req = replace(decode_request_for(config), start_s=start_s, duration_s=duration_s)
    clip = decode(path, req, limits)
    result = score_decoded(clip, config)
    result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    from core.cli_config import add_config_args, from_args

    parser = argparse.ArgumentParser(prog="python -m filters.av_align", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, AVAlignConfig)
    parser.add_argument("files", nargs="+", metavar="FILE", help="video files with sound")
    args = parser.parse_args(argv)
    config = from_args(AVAlignConfig, args)
    warm_up(config)
    failed = 0
    for path in args.files:
        try:
            r = score_clip(path, config)
            line = {"path": path, "version": r.version, "score": round(r.score, 6), "audio_peaks": r.audio_peaks,
                    "video_peaks": r.video_peaks, "fps": r.fps, "seconds": round(r.seconds, 3)}
            for v, rev in r.revisions.items():
                line[f"score_{v}"] = round(rev.score, 6)
                line[f"video_peaks_{v}"] = rev.video_peaks
        except (DecodeError, ValueError) as e:
            failed += 1
            reason = e.ledger_reason if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"
            line = {"path": path, "error": reason}
        print(json.dumps(line), flush=True)
    if failed:
        print(f"{failed} of {len(args.files)} files could not be scored", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
