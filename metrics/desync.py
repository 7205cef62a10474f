"""DeSync: Synchformer's predicted audio-visual offset, as av-benchmark computes it.

Preprocessing (av-benchmark ``extract_video.py``, ``av_bench/data/video_dataset.py``,
``av_bench/extract.py``, ``av_bench/evaluate.py``; constants in docs/metrics.md):

- video: frames at 25 fps, short side resized to 224 px (bicubic, antialiased), centre-cropped
  to 224 x 224, scaled to [0, 1] and normalised with mean 0.5, std 0.5; segments of 16 frames
  every 8 frames (0.64 s every 0.32 s);
- audio: mono at 16 kHz (torchaudio's resampling kernel), segments of 10240 samples every 5120
  (the same 0.64 s / 0.32 s); per segment torchaudio's ``MelSpectrogram(16000, n_fft=1024,
  win_length=400, hop_length=160, n_mels=128)`` (HTK mel, no filter norm, power 2, centred,
  reflect padding), ``log(x + 1e-6)``, zero-padded from 65 to 66 frames, ``(x + 4.2677393) /
  (2 * 4.5689974)``;
- both cut to the first 8 s (av-benchmark's ``--audio_length``); the offset classifier sees 14
  segments (4.8 s): the first 14 and the last 14; DeSync of a clip is the mean of the two
  ``|offset|`` of the arg-max class on the grid -2.0 .. +2.0 s (21 classes).

One deliberate difference: av-benchmark refuses clips shorter than 8 s; here a clip of at least
4.8 s is scored on what it has (its first and last 4.8 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.decode import DecodeRequest
from metrics.checkpoint import load_state, load_strict
from metrics.synchformer import FRAMES_PER_SEGMENT, MEL_BINS, MEL_FRAMES, OFFSETS, SEGMENTS, Synchformer, size_of

SAMPLE_RATE = 16000
FPS = 25.0
IMAGE_SIZE = 224
DURATION_S = 8.0
SEGMENT_SAMPLES, SEGMENT_STEP_SAMPLES = 10240, 5120
FRAME_STEP = 8
N_FFT, WIN, HOP = 1024, 400, 160
MEL_MEAN, MEL_STD = -4.2677393, 4.5689974
MIN_SECONDS = (SEGMENTS - 1) * FRAME_STEP / FPS + FRAMES_PER_SEGMENT / FPS  # 4.8 s
# av-benchmark's make_class_grid(-2, 2, 21): numpy float64 linspace cast to float32
GRID = np.linspace(-2.0, 2.0, OFFSETS).astype(np.float32)


def sync_request(start_s: float = 0.0, audio: bool = True, duration_s: float = DURATION_S,
                 size: int = IMAGE_SIZE) -> DecodeRequest:
    """What DeSync decodes of a clip: 8 s (at most) from ``start_s``; 25 fps RGB frames picked as FFmpeg's
    fps filter picks them (torio's ``frame_rate=25``), at 224 px (``size``: a test model's input); 16 kHz
    audio made with torchaudio's resampling kernel (as av-benchmark's ``torchaudio.transforms.Resample``)."""
    return DecodeRequest(start_s=start_s, duration_s=min(duration_s, DURATION_S), rgb_fps=FPS, rgb_grid="nearest",
                         rgb_size=size, audio_rates=(SAMPLE_RATE,) if audio else (), need_audio=audio,
                         resampler="torchaudio")


def mel_banks(n_freqs: int = N_FFT // 2 + 1, n_mels: int = MEL_BINS, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[n_freqs, n_mels] torchaudio ``melscale_fbanks`` (HTK scale, norm None, 0 Hz .. rate / 2), float32."""
    def hz_to_mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    freqs = torch.linspace(0, rate // 2, n_freqs)
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2)
    f_pts = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


class SyncMel(torch.nn.Module):
    """Audio segments [N, 10240] at 16 kHz -> normalised log-mel [N, 128, 66]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN), persistent=False)
        self.register_buffer("banks", mel_banks(), persistent=False)

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(segments, N_FFT, hop_length=HOP, win_length=WIN, window=self.window, center=True,
                          pad_mode="reflect", normalized=False, return_complex=True).abs().pow(2)
        mel = torch.log((spec.transpose(-1, -2) @ self.banks).transpose(-1, -2) + 1e-6)
        mel = torch.nn.functional.pad(mel, (0, MEL_FRAMES - mel.shape[-1]))
        return (mel - MEL_MEAN) / (2 * MEL_STD)


def segment_starts(length: int, size: int, step: int) -> list[int]:
    """av-benchmark's partition: ``(length - size) // step + 1`` windows, none past the end."""
    return [i * step for i in range((length - size) // step + 1)] if length >= size else []


def audio_segments(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, np.float32).reshape(-1)
    return np.stack([audio[s:s + SEGMENT_SAMPLES] for s in segment_starts(audio.size, SEGMENT_SAMPLES,
                                                                            SEGMENT_STEP_SAMPLES)])


def video_segments(frames: np.ndarray, starts: list[int] | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [S, 16, 3, H, W] in [-1, 1] (the segments at ``starts``, default all)."""
    if starts is None:
        starts = segment_starts(len(frames), FRAMES_PER_SEGMENT, FRAME_STEP)
    x = torch.from_numpy(np.stack([frames[s:s + FRAMES_PER_SEGMENT] for s in starts]))
    return (x.permute(0, 1, 4, 2, 3).float() / 255.0 - 0.5) / 0.5


def common_length(frames: np.ndarray, audio: np.ndarray, duration_s: float = DURATION_S) -> tuple[np.ndarray, np.ndarray]:
    """Both streams cut to the same length: the shorter of the two, at most ``duration_s``."""
    seconds = min(len(frames) / FPS, len(audio) / SAMPLE_RATE, duration_s)
    if seconds + 1e-9 < MIN_SECONDS:
        raise ValueError(f"needs {MIN_SECONDS:.1f} s of video and audio, got {seconds:.2f} s "
                         f"({len(frames)} frames at {FPS:g} fps, {len(audio) / SAMPLE_RATE:.2f} s of audio)")
    return frames[:int(round(seconds * FPS))], audio[:int(round(seconds * SAMPLE_RATE))]


@dataclass(frozen=True)
class DesyncResult:
    """``first_s``/``last_s``: predicted offsets (s) of the first and last 4.8 s; ``desync``: mean |offset|."""

    first_s: float
    last_s: float
    segments: int

    @property
    def desync(self) -> float:
        return (abs(self.first_s) + abs(self.last_s)) / 2


@dataclass
class DesyncScorer:
    """A loaded Synchformer with av-benchmark's preprocessing; ``chunk`` segments per forward pass."""

    model: Synchformer
    device: str = "cpu"
    chunk: int = 8

    def __post_init__(self) -> None:
        self.mel = SyncMel().to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "DesyncScorer":
        state = load_state(path, key="model")
        model = load_strict(path, "a Synchformer state dict", lambda: Synchformer(size_of(state)), state)
        return cls(model.to(device).eval(), device)

    def _video(self, frames: np.ndarray) -> torch.Tensor:
        starts = segment_starts(len(frames), FRAMES_PER_SEGMENT, FRAME_STEP)  # made a chunk at a time
        return torch.cat([self.model.video_features(video_segments(frames, starts[i:i + self.chunk]).to(self.device))
                          for i in range(0, len(starts), self.chunk)])

    def _audio(self, audio: np.ndarray) -> torch.Tensor:
        segments = torch.from_numpy(audio_segments(audio))
        return torch.cat([self.model.audio_features(self.mel(segments[i:i + self.chunk].to(self.device)))
                          for i in range(0, len(segments), self.chunk)])

    @torch.inference_mode()
    def features(self, frames: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-segment video [S, 8, D] and audio [S, 6, D] features of frames (25 fps, 224 px) and 16 kHz audio."""
        frames, audio = common_length(frames, audio)
        size = self.model.size.image_size
        if frames.shape[1:3] != (size, size):
            raise ValueError(f"frames must be {size} x {size}, got {frames.shape[1]} x {frames.shape[2]}")
        video, sound = self._video(frames), self._audio(audio)
        n = min(len(video), len(sound))
        return video[:n], sound[:n]

    @torch.inference_mode()
    def score(self, frames: np.ndarray, audio: np.ndarray) -> DesyncResult:
        """av-benchmark's DeSync of one clip: the offsets predicted on its first and last 14 segments."""
        video, sound = self.features(frames, audio)
        pairs = torch.stack([video[:SEGMENTS], video[-SEGMENTS:]]), torch.stack([sound[:SEGMENTS], sound[-SEGMENTS:]])
        top = self.model.offset_logits(*pairs).argmax(dim=-1).cpu().numpy()
        return DesyncResult(float(GRID[top[0]]), float(GRID[top[1]]), len(video))
