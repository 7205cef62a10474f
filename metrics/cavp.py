"""CAVP score: Diff-Foley's contrastive audio-visual encoders, cosine of video and audio per 0.25 s.

The model is Diff-Foley's ``CAVP_Inference`` (``inference/model/cavp_model.py``,
``cavp_modules.py``, config ``Stage1_CAVP.yaml``) in plain torch with the release's parameter
names: the video encoder is mmaction2's ResNet3dSlowOnly-50 (mmcv ``ConvModule`` = ``conv`` +
``bn`` + ReLU), globally average-pooled over space, projected 2048 -> 512; the audio encoder is a
Cnn14 without a front end (a BatchNorm over the 128 mel bins, six conv blocks, time pooled by 16,
``fc1`` applied twice, ``final_project`` 2048 -> 512).

The score (Diff-Foley's ``cavp_score.py`` as VTA-LDM's evaluation copies it; constants in
docs/metrics.md): ``T = int(min(video, audio duration))`` seconds; video frames at 4 fps squashed to
224 x 224 (PIL bilinear), in [0, 1], encoded 40 frames (10 s) at a time, one 512-d embedding per
frame; audio at 16 kHz padded or cut to ``16000 T`` samples minus the last, a magnitude mel
spectrogram (librosa, n_fft 1024, hop 256, 128 mels, 125-7600 Hz) mapped by
``clip((20 log10(max(x, 1e-5)) - 20 + 100) / 100, 0, 1)``, one embedding per 16 frames; the score of
a clip is the mean over time steps of the cosine of the two L2-normalised embeddings.

Deliberate differences: the reference re-encodes the video at 4 fps with FFmpeg and reads it back
with OpenCV; here the frames are picked as FFmpeg's fps filter picks them from the decoded stream,
without the lossy re-encode. With hop 256 the audio has ``floor((16000 T - 1) / 256 + 1) / 16``
steps (39 for 10 s) against ``4 T`` frames (40): the reference's cosine cannot pair them; here both
are cut to the shorter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.decode import DecodeRequest
from metrics.checkpoint import load_state
from metrics.panns import ConvBlock

SAMPLE_RATE = 16000
FPS = 4.0
IMAGE_SIZE = 224
CLIP_FRAMES = 40  # Diff-Foley's batch_size: frames encoded together ("Don't change it")
N_FFT, HOP, N_MELS, F_MIN, F_MAX = 1024, 256, 128, 125.0, 7600.0
MIN_SECONDS = 1.0  # the reference skips clips under 1 s
BLOCKS_50 = (3, 4, 6, 3)


@dataclass(frozen=True)
class CavpSize:
    """The release is the default; tests build narrower, shallower ones."""

    base: int = 64  # ResNet3d stem width; stage i has base * 2**i planes, x4 out
    blocks: tuple[int, ...] = BLOCKS_50
    audio_width: int = 64  # Cnn14 conv_block1 width; block k has audio_width * 2**k
    embed_dim: int = 512


class ConvModule(nn.Module):
    """mmcv's ConvModule (conv, BN3d, optional ReLU) with its parameter names."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, act: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(cout)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class Bottleneck3d(nn.Module):
    """mmaction2's Bottleneck3d, pytorch style (stride on conv2), inflate style 3x1x1."""

    def __init__(self, cin: int, planes: int, stride: int, inflate: bool, downsample: bool):
        super().__init__()
        self.conv1 = ConvModule(cin, planes, (3, 1, 1) if inflate else 1, padding=(1, 0, 0) if inflate else 0)
        self.conv2 = ConvModule(planes, planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))
        self.conv3 = ConvModule(planes, planes * 4, 1, act=False)
        self.downsample = ConvModule(cin, planes * 4, 1, stride=(1, stride, stride), act=False) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet3dSlowOnly(nn.Module):
    """SlowOnly: stem conv (1, 7, 7) stride 2 + max pool, stages inflated (0, 0, 1, 1), no temporal stride."""

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = BLOCKS_50):
        super().__init__()
        self.conv1 = ConvModule(3, base, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3))
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        cin = base
        for i, n in enumerate(blocks):
            planes, inflate = base * 2 ** i, i >= 2
            layer = [Bottleneck3d(cin if j == 0 else planes * 4, planes, (1 if i == 0 else 2) if j == 0 else 1,
                                  inflate, downsample=j == 0) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = planes * 4
        self.layers = len(blocks)
        self.feat_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> [B, C, T] (space averaged, as ``adaptive_pool`` on the 5-d output)."""
        x = self.maxpool(self.conv1(x))
        for i in range(self.layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(3, 4))


class SpecCnn14(nn.Module):
    """Diff-Foley's Cnn14 spec encoder: log-mel [B, 1, T, 128] -> [B, T / 16, embed_dim]."""

    POOLS = ((2, 2), (2, 2), (2, 2), (2, 2), (1, 2), (1, 1))

    def __init__(self, width: int = 64, embed_dim: int = 512):
        super().__init__()
        self.bn = nn.BatchNorm2d(N_MELS)
        widths = [1] + [width * 2 ** k for k in range(6)]
        for k in range(6):
            self.add_module(f"conv_block{k + 1}", ConvBlock(widths[k], widths[k + 1]))
        self.fc1 = nn.Linear(widths[-1], widths[-1])
        self.final_project = nn.Linear(widths[-1], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x.transpose(1, 3)).transpose(1, 3)
        for k, pool in enumerate(self.POOLS):
            x = getattr(self, f"conv_block{k + 1}")(x, pool)
        x = x.mean(dim=3)
        x = (F.max_pool1d(x, 3, stride=1, padding=1) + F.avg_pool1d(x, 3, stride=1, padding=1)).transpose(1, 2)
        x = F.relu(self.fc1(F.relu(self.fc1(x))))  # the reference applies fc1 twice
        return self.final_project(x)


class Cavp(nn.Module):
    """``CAVP_Inference`` (Slowonly_pool + cnn14_pool) with the release's module names."""

    def __init__(self, size: CavpSize = CavpSize()):
        super().__init__()
        self.size = size
        self.video_encoder = ResNet3dSlowOnly(size.base, size.blocks)
        self.video_project_head = nn.Linear(self.video_encoder.feat_dim, size.embed_dim)
        self.spec_encoder = SpecCnn14(size.audio_width, size.embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def video_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] in [0, 1] -> L2-normalised [B, T, D], one per frame (``encode_video(pool=False)``)."""
        feats = self.video_encoder(frames.permute(0, 2, 1, 3, 4)).transpose(1, 2)
        return F.normalize(self.video_project_head(feats), dim=-1)

    def audio_embeddings(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, 128, T] spectrogram -> L2-normalised [B, T / 16, D]."""
        return F.normalize(self.spec_encoder(mel.unsqueeze(1).permute(0, 1, 3, 2)), dim=-1)


def size_of(state: dict[str, torch.Tensor]) -> CavpSize:
    """The size a state dict was made with (stem width, blocks per stage, Cnn14 width, embedding)."""
    blocks = []
    while f"video_encoder.layer{len(blocks) + 1}.0.conv1.conv.weight" in state:
        i = len(blocks) + 1
        blocks.append(1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"video_encoder.layer{i}.")))
    return CavpSize(base=state["video_encoder.conv1.conv.weight"].shape[0], blocks=tuple(blocks),
                    audio_width=state["spec_encoder.conv_block1.conv1.weight"].shape[0],
                    embed_dim=state["video_project_head.weight"].shape[0])


def release_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's ``init_first_from_ckpt``: every ``module.`` removed from the key names."""
    return {k.replace("module.", ""): v for k, v in state.items()}


def cavp_request(start_s: float = 0.0, duration_s: float | None = None) -> DecodeRequest:
    """What CAVP decodes of a video: RGB frames at 4 fps picked as FFmpeg's fps filter, native size."""
    return DecodeRequest(start_s=start_s, duration_s=duration_s, rgb_fps=FPS, rgb_grid="nearest", need_audio=False)


def squash(frames: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [0, 1]: torchvision ``Resize((size, size))`` on PIL."""
    out = [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def spectrogram(audio: np.ndarray, seconds: int) -> np.ndarray:
    """Diff-Foley's ``get_spectrogram``: 16 kHz audio to ``16000 * seconds - 1`` samples, [128, frames] in [0, 1]."""
    length = SAMPLE_RATE * seconds
    y = np.zeros(length, np.float64)
    audio = np.asarray(audio, np.float64).reshape(-1)[:length]
    y[:audio.size] = audio
    y = y[:length - 1]
    banks = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, fmin=F_MIN, fmax=F_MAX, n_mels=N_MELS)
    mel = banks @ np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))
    return np.clip((20 * np.log10(np.maximum(mel, 1e-5)) - 20 + 100) / 100, 0.0, 1.0).astype(np.float32)


@dataclass
class CavpResult:
    score: float
    steps: int  # time steps (0.25 s) the cosine was averaged over
    seconds: int


@dataclass
class CavpScorer:
    """A loaded CAVP with Diff-Foley's preprocessing; ``image_size`` is 224 for the release."""

    model: Cavp
    device: str = "cpu"
    image_size: int = IMAGE_SIZE
    missing: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "CavpScorer":
        """The release checkpoint (``state_dict`` inside, ``module.`` stripped); every model weight must be in it."""
        state = release_state(load_state(path, key="state_dict"))
        try:
            model = Cavp(size_of(state))
            missing, _unexpected = model.load_state_dict(state, strict=False)  # the reference loads strict=False
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: not a CAVP checkpoint ({' '.join(str(e).split())[:300]})") from e
        if missing:
            raise ValueError(f"{path}: not a CAVP checkpoint ({len(missing)} weights missing: "
                             f"{', '.join(missing[:5])})")
        return cls(model.to(device).eval(), device)

    @torch.inference_mode()
    def video(self, frames: np.ndarray) -> torch.Tensor:
        """[T, D] embeddings of 4 fps frames, encoded 40 at a time as the reference does."""
        x = squash(frames, self.image_size)
        parts = [self.model.video_embeddings(x[i:i + CLIP_FRAMES][None].to(self.device))[0]
                 for i in range(0, len(x), CLIP_FRAMES)]
        return torch.cat(parts)

    @torch.inference_mode()
    def audio(self, audio: np.ndarray, seconds: int) -> torch.Tensor:
        mel = torch.from_numpy(spectrogram(audio, seconds))[None].to(self.device)
        return self.model.audio_embeddings(mel)[0]

    def score(self, frames: np.ndarray, audio: np.ndarray) -> CavpResult:
        """CAVP score of 4 fps frames (from the clip's start) and 16 kHz audio."""
        seconds = int(min(len(frames) / FPS, len(audio) / SAMPLE_RATE))
        if seconds < MIN_SECONDS:
            raise ValueError(f"needs {MIN_SECONDS:.0f} s of video and sound, got {len(frames)} frames at "
                             f"{FPS:g} fps and {len(audio) / SAMPLE_RATE:.2f} s of sound")
        video, sound = self.video(frames[:int(seconds * FPS)]), self.audio(audio, seconds)
        n = min(len(video), len(sound))
        if n == 0:
            raise ValueError(f"{seconds} s gave no audio step (needs 16 spectrogram frames)")
        cos = (video[:n] * sound[:n]).sum(dim=-1)
        return CavpResult(float(cos.mean()), n, seconds)
