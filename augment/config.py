"""The one source of truth for augmentation parameters (``python -m pipeline.augment`` builds its flags here).

Output length and the cut grid are not augmentation parameters: they come from
``core.config.SignalConfig`` (``window_s``, ``clip_fps``), so augmented samples have the length
and feature-frame grid of every other sample.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from core.config import DEFAULT_SIGNAL, DecodeLimits, SignalConfig

StretchMethod = Literal["resample", "wsola"]
RealCuts = Literal["avoid", "record"]
REAL_CUTS: tuple[str, ...] = ("avoid", "record")
STRETCH_METHODS: tuple[str, ...] = ("resample", "wsola")
MIN_RATE, MAX_RATE = 0.5, 2.0  # beyond these an OLA stretch must drop or repeat whole events


class AugmentConfigError(ValueError):
    """An augmentation parameter that cannot produce a valid plan."""


@dataclass(frozen=True)
class AugmentConfig:
    """How ``plan`` turns ok clips into concat and stretch recipes (and how ``render`` plays them)."""

    seed: int = field(default=0, metadata={"help": "plan seed: the same seed and ledger give the same plan"})
    concat_per_clip: int = field(
        default=1, metadata={"help": "concat recipes per eligible clip (it plays first); 0 disables concat"})
    concat_span: tuple[float, ...] = field(
        default=(2.5, 7.5), metadata={"help": "range of the cut time in seconds (cut on the clip_fps grid)"})
    crossfade_ms: float = field(
        default=10.0, metadata={"help": "equal-power audio crossfade at a concat cut, in milliseconds"})
    stretch_rates: tuple[float, ...] = field(
        default=(0.8, 1.25), metadata={"help": "stretch rates, one recipe per rate and clip (r>1 is faster)"})
    stretch_range: tuple[float, ...] = field(
        default=(), metadata={"help": "draw rates uniformly from LO:HI instead (0.01 steps); "
                                      "stretch_per_clip draws per clip"})
    stretch_per_clip: int = field(
        default=1, metadata={"help": "rates drawn per clip from --stretch-range (a --stretch-rates list "
                                     "gives every rate); 0 disables stretch"})
    stretch_method: StretchMethod = field(
        default="resample", metadata={"help": "audio stretch: resample (exact timing, pitch follows speed) "
                                              "or wsola (keeps pitch, timing within a few ms)"})
    exclude_splits: tuple[str, ...] = field(
        default=("test",), metadata={"help": "splits never augmented nor used as concat partners"})
    min_output_s: float = field(
        default=DecodeLimits().min_duration_s, metadata={"help": "recipes shorter than this are not planned"})
    real_cuts: RealCuts = field(
        default="avoid", metadata={"help": "real scene cuts (ledger scene_cuts) in a concat's sources: avoid "
                                           "(the cut and B's offset are chosen so neither played span holds "
                                           "one; a pair with no such span is not planned) or record (planned "
                                           "as usual); either way a recipe lists every real cut it plays in "
                                           "real_cuts_s"})
    caption_join: str = field(default=" then ", metadata={"help": "text between the two captions of a concat"})
    signal: SignalConfig = field(default=DEFAULT_SIGNAL, metadata={"help": "output length and feature grid"})

    def __post_init__(self) -> None:
        if self.concat_per_clip < 0 or self.stretch_per_clip < 0:
            raise AugmentConfigError("concat_per_clip and stretch_per_clip must be >= 0")
        if len(self.concat_span) != 2 or not 0 < self.concat_span[0] <= self.concat_span[1]:
            raise AugmentConfigError(f"concat_span must be LO,HI with 0 < LO <= HI, got {self.concat_span}")
        if self.concat_span[1] >= self.signal.window_s:
            raise AugmentConfigError(
                f"concat_span {self.concat_span} must end before the output length {self.signal.window_s}s")
        if not self.cut_grid():
            raise AugmentConfigError(
                f"concat_span {self.concat_span} holds no point of the {self.signal.clip_fps} fps feature grid")
        if not 0 <= self.crossfade_ms <= 1000 * self.grid_s:
            raise AugmentConfigError(f"crossfade_ms must be between 0 and one grid step, got {self.crossfade_ms}")
        if self.stretch_method not in STRETCH_METHODS:
            raise AugmentConfigError(f"stretch_method must be one of {STRETCH_METHODS}, got {self.stretch_method!r}")
        if self.stretch_range:
            lo_hi = self.stretch_range
            if len(lo_hi) != 2 or not MIN_RATE <= lo_hi[0] < lo_hi[1] <= MAX_RATE:
                raise AugmentConfigError(
                    f"stretch_range must be LO:HI with {MIN_RATE} <= LO < HI <= {MAX_RATE}, got {lo_hi}")
        else:
            for r in self.stretch_rates:
                if not MIN_RATE <= r <= MAX_RATE or abs(r - 1.0) < 0.005:
                    raise AugmentConfigError(
                        f"stretch rate {r} must lie in [{MIN_RATE}, {MAX_RATE}] and differ from 1")
            tags = [rate_tag(r) for r in self.stretch_rates]
            if len(set(tags)) != len(tags):
                raise AugmentConfigError(f"stretch_rates {self.stretch_rates} must differ by at least 0.01")
        if self.real_cuts not in REAL_CUTS:
            raise AugmentConfigError(f"real_cuts must be one of {REAL_CUTS}, got {self.real_cuts!r}")
        if self.min_output_s <= 0:
            raise AugmentConfigError("min_output_s must be positive")

    @property
    def target_s(self) -> float:
        """Full output length: the clip window of every other sample."""
        return self.signal.window_s

    @property
    def grid_s(self) -> float:
        """Spacing of the feature-frame grid (0.5 s at 2 fps): cuts and source offsets lie on it."""
        return 1.0 / self.signal.clip_fps

    def cut_grid(self) -> list[float]:
        """Every allowed cut time: grid points inside ``concat_span``."""
        fps = self.signal.clip_fps
        lo = math.ceil(self.concat_span[0] * fps - 1e-9)
        hi = math.floor(self.concat_span[1] * fps + 1e-9)
        return [k / fps for k in range(lo, hi + 1)]

    def to_json(self) -> dict:
        return asdict(self)


def rate_tag(rate: float) -> str:
    """Key suffix of a stretch rate: ``ts125`` for 1.25, ``ts080`` for 0.8 (hundredths, no dot)."""
    return f"ts{int(round(rate * 100)):03d}"
