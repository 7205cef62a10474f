"""Curation scores of current V2A systems, computed from the clip the clean stage already decoded.

- **Speech** (Silero VAD, real weights shipped in the ``silero-vad`` wheel): the share of the
  window that is voice and the longest voiced run. VTA-LDM removed talking from its pre-training
  corpus; a VAD measures it directly instead of the zero-shot CLAP comparison.
- **Silence**: peak and RMS level and the share of near-silent 20 ms frames. MMAudio rejects
  clips whose peak is <= 1e-6; HunyuanVideo-Foley drops clips more than 80 % silent.
- **Scene cuts** (PySceneDetect's ``ContentDetector`` on the luma frames AV-Align decoded, no
  second decode): cut times in seconds from the window start.
- **Static video**: the AV-Align motion trajectory (mean Farneback flow magnitude, native
  px/frame); a clip whose motion never reaches AV-Align's 0.1 px peak floor has no visual event.

Only scores are computed here; ``CurationFilters`` turns stored scores into keep/drop reasons,
so thresholds change without rescoring. Definitions and measured figures: docs/curation.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

VAD_SAMPLE_RATE = 16000  # Silero VAD runs at 16 kHz (or 8 kHz)
VAD_WINDOW = 512  # samples per model step at 16 kHz
SILENCE_FRAME_S = 0.02
SCENE_SIDE = 64  # long side (px) scene detection runs at, in both AV-Align modes
SCORE_COLUMNS = ("speech_share", "speech_run_s", "peak_db", "rms_db", "silent_share", "scene_cuts",
                 "motion_max", "motion_mean")

SPLIT_REASON = "split_at_cuts"  # a window replaced by its parts between cuts (rows with its key as parent_key)
SceneAction = Literal["record", "drop"]
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class CurationConfig:
    """How the curation scores are computed (changing these needs a rescore)."""

    vad_threshold: float = field(default=0.5, metadata={
        "help": "Silero VAD speech probability threshold (its default)"})
    vad_min_speech_ms: int = field(default=250, metadata={"help": "shortest voiced run the VAD reports (ms)"})
    silent_frame_db: float = field(default=-60.0, metadata={
        "help": "a 20 ms frame whose RMS is below this (dBFS) counts as near-silent"})
    scene_threshold: float = field(default=27.0, metadata={
        "help": "PySceneDetect ContentDetector threshold (luma only; its default)"})
    scene_min_len_s: float = field(default=0.5, metadata={"help": "shortest scene between two cuts (s)"})
    split_at_cuts: bool = field(default=False, metadata={
        "help": "replace a window with hard cuts by its parts between the cuts that are at least "
                "--split-min-s long, each a ledger row scored on its own (the window is not decoded again)"})
    split_min_s: float = field(default=5.0, metadata={
        "help": "shortest part kept by --split-at-cuts (s; the default is the YouTube windows' "
                "--min-last-window-s)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.vad_threshold < 1.0:
            raise ValueError(f"vad_threshold must be in (0, 1), not {self.vad_threshold}")
        if not (math.isfinite(self.silent_frame_db) and self.silent_frame_db < 0):
            raise ValueError(f"silent_frame_db must be a negative dBFS level, not {self.silent_frame_db}")
        if not (math.isfinite(self.scene_threshold) and self.scene_threshold > 0):
            raise ValueError(f"scene_threshold must be > 0, not {self.scene_threshold}")
        if self.vad_min_speech_ms < 0 or not self.scene_min_len_s >= 0:
            raise ValueError("vad_min_speech_ms and scene_min_len_s must be >= 0")
        if not (math.isfinite(self.split_min_s) and self.split_min_s > 0):
            raise ValueError(f"split_min_s must be a number of seconds > 0, not {self.split_min_s}")

    def fingerprint_fields(self) -> dict:
        """The settings that make the scores; the split settings only while splitting is on, so
        journals scored before ``--split-at-cuts`` existed keep their fingerprint."""
        fields = asdict(self)
        if not self.split_at_cuts:
            del fields["split_at_cuts"], fields["split_min_s"]
        return fields


@dataclass(frozen=True)
class CurationFilters:
    """Keep/drop rules on the stored curation scores ("score once, filter many")."""

    speech: Switch = field(default="auto", metadata={
        "help": "drop windows with speech (VAD): auto = on for youtube, off otherwise (always recorded)"})
    speech_share_max: float = field(default=0.5, metadata={"help": "speech when the voiced share exceeds this"})
    speech_run_max_s: float = field(default=4.0, metadata={"help": "speech when a voiced run is longer (s)"})
    silent: Switch = field(default="on", metadata={"help": "drop silent windows"})
    silence_peak_max: float = field(default=1e-6, metadata={
        "help": "silent when the peak amplitude is <= this (MMAudio's rule)"})
    silent_share_max: float = field(default=0.8, metadata={
        "help": "silent when more than this share of 20 ms frames is near-silent (HunyuanVideo-Foley)"})
    static: Switch = field(default="on", metadata={"help": "drop static video"})
    static_motion_max: float = field(default=0.1, metadata={
        "help": "static when the motion trajectory stays below this (px/frame; AV-Align's peak floor)"})
    quality: Switch = field(default="off", metadata={
        "help": "drop windows whose audiobox-aesthetics PQ is below --quality-pq-min (needs --aes-model; "
                "auto = on for youtube)"})
    quality_pq_min: float = field(default=5.0, metadata={
        "help": "low_quality when PQ (production quality, 1-10) is below this"})
    scene_cuts: SceneAction = field(default="record", metadata={
        "help": "record: keep windows with hard cuts; drop: filter them as scene_cut"})

    def __post_init__(self) -> None:
        for name in ("speech", "silent", "static", "quality"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be auto, on or off, not {getattr(self, name)!r}")
        if self.scene_cuts not in ("record", "drop"):
            raise ValueError(f"scene_cuts must be record or drop, not {self.scene_cuts!r}")
        for name in ("speech_share_max", "silent_share_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        for name in ("speech_run_max_s", "silence_peak_max", "static_motion_max", "quality_pq_min"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {v}")

    def enabled(self, name: str, dataset: str) -> bool:
        switch = getattr(self, name)
        return switch == "on" or (switch == "auto" and dataset == "youtube")


# ---- scores -----------------------------------------------------------------------------------

def _db(x: float) -> float:
    return float(20.0 * np.log10(max(x, 1e-10)))


def silence_scores(audio: np.ndarray, sample_rate: int, frame_db: float) -> dict:
    """Peak and RMS level (dBFS) and the share of near-silent 20 ms frames of mono audio."""
    x = np.asarray(audio, np.float64)
    if x.size == 0:
        return {"peak_db": None, "rms_db": None, "silent_share": None}
    hop = max(1, int(round(SILENCE_FRAME_S * sample_rate)))
    n = x.size // hop
    frames = x[: n * hop].reshape(n, hop) if n else x[None, :]
    frame_rms = np.sqrt(np.mean(frames ** 2, axis=1))
    peak = float(np.max(np.abs(x)))
    return {"peak_db": _db(peak), "rms_db": _db(float(np.sqrt(np.mean(x ** 2)))),
            "silent_share": float(np.mean(frame_rms < 10.0 ** (frame_db / 20.0)))}


def motion_scores(motion: np.ndarray | None) -> dict:
    """Summary of AV-Align's motion trajectory (native px/frame)."""
    if motion is None or len(motion) == 0:
        return {"motion_max": None, "motion_mean": None}
    m = np.asarray(motion, np.float64)
    return {"motion_max": float(m.max()), "motion_mean": float(m.mean())}


def scene_cut_times(gray: np.ndarray, times: np.ndarray, fps: float, config: CurationConfig) -> list[float]:
    """Hard cuts (seconds from the window start) found by PySceneDetect's ``ContentDetector`` rule on
    luma frames [N, H, W]: with ``luma_only`` its frame score is the mean absolute difference of
    consecutive frames' HSV value, which for a grey frame is the grey level itself, so the scores
    are computed for all frames at once (no per-frame colour conversion) and fed to its own
    ``FlashFilter``, which applies ``min_scene_len`` exactly as ``ContentDetector.process_frame`` does."""
    import cv2
    from scenedetect import FrameTimecode
    from scenedetect.detector import FlashFilter

    if gray is None or len(gray) < 2 or not fps > 0:
        return []
    h, w = gray.shape[1:3]
    scale = min(1.0, SCENE_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in gray])
    diff = np.abs(np.diff(gray.astype(np.int16), axis=0)).sum(axis=(1, 2), dtype=np.int64)
    above = np.concatenate([[False], diff / float(gray.shape[1] * gray.shape[2]) >= config.scene_threshold])
    flash = FlashFilter(mode=FlashFilter.Mode.MERGE, length=max(1, int(round(config.scene_min_len_s * fps))))
    cuts = [c for i, hit in enumerate(above) for c in flash.filter(FrameTimecode(i, fps), bool(hit))]
    return [round(float(times[c.frame_num]), 4) for c in cuts if 0 <= c.frame_num < len(times)]


def split_parts(cuts: list[float], duration_s: float, min_s: float) -> list[tuple[float, float]]:
    """The parts ``[start, end)`` (seconds from the window start) between a window's hard cuts that
    are at least ``min_s`` long; a cut frame opens the part after it."""
    bounds = [0.0, *sorted(c for c in cuts if 0.0 < c < duration_s), duration_s]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b - a >= min_s - 1e-9]


class SpeechDetector:
    """Silero VAD with the weights its wheel ships (no download): voiced share and longest run."""

    def __init__(self, config: CurationConfig):
        self.config = config
        self.model = None

    def load(self) -> None:
        if self.model is None:
            from silero_vad import load_silero_vad

            self.model = load_silero_vad(sequence=True)

    def scores(self, audio16k: np.ndarray) -> dict:
        return self.scores_batch([audio16k])[0]

    def scores_batch(self, clips: list[np.ndarray]) -> list[dict]:
        """Voiced share and longest run of each clip (16 kHz mono). Silero's sequence model (the
        same network exported to run up to 512 steps of 32 ms in one ONNX call, instead of one
        Python-level call per step: 3.5x less CPU than the batched streaming model, probabilities
        within 2e-6 of it, docs/benchmarks.md), then Silero's own post-processing
        (``get_speech_timestamps_from_probs``): the same spans ``get_speech_timestamps`` gives."""
        from silero_vad.utils_vad import get_speech_timestamps_from_probs

        self.load()
        out: list[dict] = []
        for clip in clips:
            x = np.ascontiguousarray(clip, np.float32).reshape(-1)
            if x.size < VAD_WINDOW:
                out.append({"speech_share": None, "speech_run_s": None})
                continue
            probs = self.model.audio_forward(x, VAD_SAMPLE_RATE)
            spans = get_speech_timestamps_from_probs(
                probs.tolist(), sampling_rate=VAD_SAMPLE_RATE, threshold=self.config.vad_threshold,
                min_speech_duration_ms=self.config.vad_min_speech_ms, audio_length_samples=x.size)
            runs = [(s["end"] - s["start"]) / VAD_SAMPLE_RATE for s in spans]
            out.append({"speech_share": float(sum(runs) / (x.size / VAD_SAMPLE_RATE)),
                        "speech_run_s": float(max(runs, default=0.0))})
        return out


# ---- rules ------------------------------------------------------------------------------------

def curation_reasons(df: pd.DataFrame, rules: CurationFilters, dataset: str) -> pd.Series:
    """One reason string per row ('' = kept) from stored scores; a missing score never drops."""
    parts: list[pd.Series] = []

    def col(name: str) -> pd.Series:
        return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(np.nan, index=df.index)

    if rules.enabled("speech", dataset):
        hit = (col("speech_share") > rules.speech_share_max) | (col("speech_run_s") > rules.speech_run_max_s)
        parts.append(hit.map({True: "speech", False: ""}))
    if rules.enabled("silent", dataset):
        hit = (col("peak_db") <= _db(rules.silence_peak_max)) | (col("silent_share") > rules.silent_share_max)
        parts.append(hit.map({True: "silent", False: ""}))
    if rules.enabled("static", dataset):
        parts.append((col("motion_max") < rules.static_motion_max).map({True: "static", False: ""}))
    if rules.enabled("quality", dataset):
        parts.append((col("aes_pq") < rules.quality_pq_min).map({True: "low_quality", False: ""}))
    if rules.scene_cuts == "drop" and "scene_cuts" in df:
        has_cut = df["scene_cuts"].map(lambda v: isinstance(v, (list, tuple, np.ndarray)) and len(v) > 0)
        parts.append(has_cut.map({True: "scene_cut", False: ""}))
    if not parts or df.empty:
        return pd.Series("", index=df.index, dtype=object)
    joined = pd.concat(parts, axis=1).astype(str).agg(",".join, axis=1)
    return joined.str.replace(r",+", ",", regex=True).str.strip(",")
