"""Frozen configs of the encode stage: the single source of truth for shard contents.

``MelConfig`` is AudioLDM's mel front end (docs/encode.md), ``EncoderConfig`` says which
CLIP and VAE weights make the features, ``ShardConfig`` how samples are grouped into tars, and
``ReaderConfig`` how the training reader streams them back (the trainer's flags take its defaults). Rates
and lengths derive from ``core.config.SignalConfig``; the encode CLI builds its flags from
these classes (``core.cli_config``) and the dataset card records them verbatim.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from core.cli_config import ConfigError, check_positive
from core.config import DEFAULT_SIGNAL, SignalConfig
from core.registry import default_spec
from core.resample import RESAMPLERS

DEFAULT_CLIP_MODEL = default_spec("clip")
DEFAULT_VAE = default_spec("audioldm_vae")  # owner/name/vae; a bare pipeline id uses its vae/ subfolder too
DEFAULT_SIGLIP2_MODEL = default_spec("siglip2")
DEFAULT_VIVIT_MODEL = default_spec("vivit")
DEFAULT_VJEPA2_MODEL = default_spec("vjepa2")

# One sample's members. Everything is plain bytes a stock WebDataset reader decodes; never pickles.
MEMBER_CLIP = "clip.npy"  # shards written before the vision encoders: CLIP tokens (read as vision-clip)
VISION_PREFIX, FLOW_PREFIX = "vision-", "flow-"  # vision-<encoder>.npy, flow-<encoder>.npy
MEMBER_TEXT = "text.npy"
MEMBER_LATENT = "latent.npy"
MEMBER_MEL = "mel.npy"
MEMBER_AUDIO = "audio.flac"
MEMBER_JSON = "json"
# the order of a sample's members in a shard: by name, as webdataset.TarWriter writes them
MEMBER_ORDER = (MEMBER_AUDIO, MEMBER_CLIP, MEMBER_JSON, MEMBER_LATENT, MEMBER_MEL, MEMBER_TEXT)
_NAME = re.compile(r"^[a-z0-9]+$")
# the vision encoders of the study (shards.vision implements them; this is the one list of names)
VISION_ENCODERS = ("clip", "siglip2", "vivit", "vjepa2")


def parse_encoders(text: str) -> tuple[str, ...]:
    """``clip,siglip2,vivit`` -> the names, checked, in the given order, without repeats."""
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    unknown = [n for n in names if n not in VISION_ENCODERS]
    if unknown or not names:
        raise ValueError(f"unknown vision encoder(s) {', '.join(unknown) or '(none given)'}: choose from "
                         f"{', '.join(VISION_ENCODERS)}")
    return names


def vision_member(encoder: str) -> str:
    """The member holding one vision encoder's tokens of a sample: ``vision-<encoder>.npy``."""
    return f"{VISION_PREFIX}{encoder}.npy"


def flow_member(encoder: str) -> str:
    """The member holding the flow images' tokens from one vision encoder: ``flow-<encoder>.npy``."""
    return f"{FLOW_PREFIX}{encoder}.npy"


def is_shard_member(name: str) -> bool:
    """A member name encode writes: the fixed ones, or vision-/flow-<encoder>.npy."""
    if name in MEMBER_ORDER:
        return True
    for prefix in (VISION_PREFIX, FLOW_PREFIX):
        if name.startswith(prefix) and name.endswith(".npy"):
            return bool(_NAME.match(name[len(prefix):-4]))
    return False


FORBIDDEN_EXTENSIONS = (".pyd", ".pickle", ".pkl", ".pth", ".pt", ".ten", ".mp")  # all decode via pickle


@dataclass(frozen=True)
class MelConfig:
    """AudioLDM's log-mel: STFT magnitude -> Slaney mel -> log(clamp(x, 1e-5)), [n_mels, frames]."""

    sample_rate: int = DEFAULT_SIGNAL.feature_sr
    seconds: float = DEFAULT_SIGNAL.feature_seconds
    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    log_clamp: float = 1e-5
    frames: int = 1024
    # AudioLDM's read_wav_file: remove the mean, scale the peak to 0.5 (the VAE was trained on such
    # mels); 0 keeps the waveform as decoded. Silence stays silence.
    peak: float = 0.5
    # how the 16 kHz audio is made from the clip's native rate: AudioLDM's read_wav_file and VTA-LDM
    # use torchaudio.functional.resample at its defaults (core/resample.py implements that kernel)
    resampler: str = field(default="torchaudio", metadata={
        "help": "16 kHz feature-audio resampler: torchaudio (functional.resample defaults, as AudioLDM/VTA-LDM) "
                "or soxr_hq", "choices": RESAMPLERS})

    def __post_init__(self) -> None:
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"mel resampler must be one of {', '.join(RESAMPLERS)}, not {self.resampler!r}")

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))

    @classmethod
    def from_signal(cls, signal: SignalConfig = DEFAULT_SIGNAL, resampler: str = "torchaudio") -> "MelConfig":
        return cls(sample_rate=signal.feature_sr, seconds=signal.feature_seconds, resampler=resampler)


@dataclass(frozen=True)
class EncoderConfig:
    """Which weights make the features, and how they run. Real runs default to the real models."""

    clip_model: str = field(default=DEFAULT_CLIP_MODEL, metadata={
        "help": "CLIP ViT-L/14: Hugging Face id or a save_pretrained folder (vision and text towers)"})
    vae: str = field(default=DEFAULT_VAE, metadata={
        "help": "AudioLDM VAE: Hugging Face id or folder; an AudioLDM pipeline id/folder uses its vae/ subfolder, "
                "'owner/name/sub' picks a subfolder"})
    clip_normalize: bool = field(default=True, metadata={
        "help": "CLIP mean/std pixel normalisation; --no-clip-normalize feeds [0, 1] pixels as the released "
                "VTA-LDM checkpoint saw them"})
    with_mel: bool = field(default=False, metadata={"help": "also store mel.npy (float16 [64, 1024]) per sample"})
    device: str = field(default="auto", metadata={"help": "torch device for the encoders (auto: cuda when available)"})
    clip_batch_frames: int = field(default=64, metadata={"help": "CLIP frames per forward pass (within one clip)"})
    allow_random_weights: bool = field(default=False, metadata={
        "help": "DEMO ONLY: when weights cannot be loaded, build tiny random-weight models (recorded in card.json)"})
    vision_encoders: str = field(default="clip", metadata={
        "help": "vision encoders, comma-separated, each written as vision-<name>.npy: clip (CLIP ViT-L/14 per "
                "frame), siglip2 (per frame), vivit, vjepa2 (spatio-temporal); docs/encode.md"})
    siglip2_model: str = field(default=DEFAULT_SIGLIP2_MODEL, metadata={
        "help": "SigLIP 2: Hugging Face id or save_pretrained folder (SiglipModel or Siglip2 NaFlex checkpoint)"})
    vivit_model: str = field(default=DEFAULT_VIVIT_MODEL, metadata={
        "help": "ViViT: Hugging Face id or folder (VivitModel or VivitForVideoClassification checkpoint)"})
    vjepa2_model: str = field(default=DEFAULT_VJEPA2_MODEL, metadata={
        "help": "V-JEPA 2: Hugging Face id or folder (VJEPA2Model checkpoint)"})
    siglip2_fps: float = field(default=8.0, metadata={"help": "SigLIP 2 frames per second (HunyuanVideo-Foley: 8)"})
    vivit_fps: float = field(default=12.5, metadata={
        "help": "ViViT frames per second (12.5: Kinetics' 25 fps at stride 2, ViViT's training sampling)"})
    vjepa2_fps: float = field(default=6.4, metadata={
        "help": "V-JEPA 2 frames per second (6.4: one 64-frame clip spans the 10 s window)"})
    with_flow: bool = field(default=False, metadata={
        "help": "also embed optical-flow images with every vision encoder (flow-<name>.npy)"})
    flow_pair_fps: float = field(default=25.0, metadata={
        "help": "flow is computed between frames this far apart (1/fps s; rounded to a multiple of the "
                "encoder's rate)"})
    flow_min_scale: float = field(default=1.0, metadata={
        "help": "flow images: magnitude scale floor in px/frame (still clips stay dark)"})

    def __post_init__(self) -> None:
        try:
            parse_encoders(self.vision_encoders)
        except ValueError as e:
            raise ConfigError("vision_encoders", str(e)) from e
        for name in ("siglip2_fps", "vivit_fps", "vjepa2_fps", "flow_pair_fps", "flow_min_scale"):
            check_positive(name, getattr(self, name))

    @property
    def encoders(self) -> tuple[str, ...]:
        return parse_encoders(self.vision_encoders)

    def model_of(self, encoder: str) -> str:
        return self.clip_model if encoder == "clip" else getattr(self, f"{encoder}_model")

    def fps_of(self, encoder: str) -> float:
        return DEFAULT_SIGNAL.clip_fps if encoder == "clip" else float(getattr(self, f"{encoder}_fps"))


@dataclass(frozen=True)
class ShardConfig:
    """How encoded samples are grouped: in a hashed key order within a split, ``shard_size`` per tar."""

    shard_size: int = field(default=1000, metadata={"help": "samples per shard (about 0.4 MB each)"})


def latent_shape(vae_latent_channels: int, mel: MelConfig, downsample: int) -> tuple[int, int, int, int]:
    """[mean|std, channels, frames/down, mels/down]: [2, 8, 256, 16] for AudioLDM."""
    return (2, vae_latent_channels, mel.frames // downsample, mel.n_mels // downsample)


@dataclass(frozen=True)
class ReaderConfig:
    """How one rank streams its shards."""

    workers: int = field(default=2, metadata={"help": "data-loader worker processes per rank"})
    mix_shards: int = field(default=8, metadata={"help": "shards each worker reads at once, interleaved"})
    shuffle_buffer: int = field(default=256, metadata={
        "help": "samples each worker holds and draws from at random (1: no buffer)"})
    seed: int = field(default=0, metadata={"help": "data-order seed"})
    prefetch: int = field(default=2, metadata={"help": "batches prefetched per worker"})
