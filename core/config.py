"""One frozen dataclass per concern: every length and rate in the pipeline derives from these.

CLIs build their flags from these dataclasses (``core.cli_config``), so a parameter has exactly
one default, one type and one help text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from core.cli_config import check_count, check_finite, check_positive


@dataclass(frozen=True)
class SignalConfig:
    """Signal parameters shared by every stage (docs/encode.md, VTA-LDM compatible)."""

    window_s: float = field(default=10.0, metadata={"help": "clip window length in seconds"})
    feature_sr: int = field(default=16000, metadata={"help": "audio rate for mel/VAE features"})
    feature_seconds: float = field(default=10.24, metadata={"help": "feature audio length (zero-padded)"})
    av_align_sr: int = field(default=22050, metadata={"help": "audio rate for AV-Align onsets"})
    clap_sr: int = field(default=48000, metadata={"help": "audio rate for CLAP"})
    clip_fps: float = field(default=2.0, metadata={"help": "frame rate of CLIP feature frames"})

    @property
    def feature_samples(self) -> int:
        return int(round(self.feature_sr * self.feature_seconds))

    @property
    def clip_frames(self) -> int:
        return int(round(self.window_s * self.clip_fps))


@dataclass(frozen=True)
class DecodeLimits:
    """Guards against bad input: how long a clip may take and how short it may be."""

    timeout_s: float = field(default=120.0, metadata={"help": "per-clip decode time limit (s)"})
    min_duration_s: float = field(default=1.0, metadata={"help": "clips shorter than this are too_short"})
    decode_threads: int = field(
        default=0, metadata={"help": "FFmpeg threads per video decode (0: the worker's share of the cores, "
                                  "as the runner sets it; FFmpeg's own choice outside a runner)"}
    )
    trimmed_slack_s: float = field(
        default=0.5, metadata={"help": "a file at most window+slack long counts as already trimmed"}
    )

    def __post_init__(self) -> None:
        check_positive("timeout_s", self.timeout_s)
        check_finite("min_duration_s", self.min_duration_s, lo=0.0)
        check_count("decode_threads", self.decode_threads)
        check_finite("trimmed_slack_s", self.trimmed_slack_s, lo=0.0)


DEFAULT_SIGNAL = SignalConfig()
