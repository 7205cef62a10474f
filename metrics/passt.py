"""PaSST-S (Koutini et al. 2022) at 32 kHz: the embedding and classifier of av-benchmark's FD/KL/IS.

The model is written here with the module names of the release
``passt-s-f128-p16-s10-ap.476-swa.pt`` (hear21passt's ``passt_s_swa_p16_128_ap476``: a DeiT-style
ViT, 16x16 patches with stride 10 over a 128 x 998 mel image, separate frequency and time
position embeddings, class and distillation tokens), so that state dict loads with
``strict=True``. As hear21passt's ``PasstBasicWrapper(mode="all")``, which av-benchmark uses, a
clip gives the 768-d feature ``(cls + dist) / 2`` after the final norm and the 527 logits of
``head`` (LayerNorm + Linear) on it. In eval mode nothing is patched out or masked.

The front end is hear21passt's ``AugmentMelSTFT`` in eval mode, written without torchaudio:
pre-emphasis ``y[n] = x[n+1] - 0.97 x[n]``; STFT n_fft 1024, hop 320, a symmetric Hann window of
800 samples, centred with reflect padding; power; Kaldi's mel banks (128 bins, 0-15000 Hz, mel
1127 ln(1 + f/700), triangles over 512 FFT bins, a zero column for the Nyquist bin);
``(log(mel + 1e-5) + 4.5) / 5``. av-benchmark feeds exactly 10 s (320,000 samples: truncated or
zero-padded), which gives 1000 frames and 12 x 99 patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics.checkpoint import load_state, load_strict

SAMPLE_RATE = 32000
CLIP_SAMPLES = 320000
N_FFT, HOP, WIN, N_MELS, FMIN, FMAX = 1024, 320, 800, 128, 0.0, 15000.0
IMG = (128, 998)
PATCH, STRIDE = 16, 10
CLASSES = 527


def kaldi_mel_banks(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE,
                    fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] Kaldi mel filters (torchaudio.compliance.kaldi.get_mel_banks, no VTLN
    warping) with the zero Nyquist column hear21passt appends."""
    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)

    delta = (mel(fmax) - mel(fmin)) / (n_mels + 1)
    left = mel(fmin) + np.arange(n_mels)[:, None] * delta
    centre, right = left + delta, left + 2 * delta
    bins = mel(rate / n_fft * np.arange(n_fft // 2))[None, :]
    banks = np.maximum(0.0, np.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)))
    return np.pad(banks, ((0, 0), (0, 1)))


class MelFrontEnd(nn.Module):
    """hear21passt's AugmentMelSTFT in eval mode (no frequency-range jitter, no masking)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN, periodic=False), persistent=False)
        self.register_buffer("banks", torch.from_numpy(kaldi_mel_banks().astype(np.float32)), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """float audio [B, samples] at 32 kHz -> normalised log-mel [B, 128, frames]."""
        x = audio[:, 1:] - 0.97 * audio[:, :-1]
        spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WIN, window=self.window, center=True,
                          normalized=False, return_complex=True)
        mel = self.banks @ spec.abs().pow(2)
        return (torch.log(mel + 1e-5) + 4.5) / 5.0


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class VitMlp(nn.Module):
    """timm's ViT MLP (``fc1``, exact GELU, ``fc2``); MotionFormer's blocks use the same."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads), VitMlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, PATCH, stride=STRIDE)


class Passt(nn.Module):
    """PaSST-S; ``forward`` on a mel image [B, 1, 128, T] returns (features [B, dim], logits [B, classes])."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, classes: int = CLASSES):
        super().__init__()
        grid = (IMG[0] // STRIDE, IMG[1] // STRIDE)
        self.patch_embed = _PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, dim))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, dim, grid[0], 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, dim, 1, grid[1]))
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))
        self.head_dist = nn.Linear(dim, classes)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed.proj(mel)  # [B, dim, 12, T']
        if x.shape[-1] > self.time_new_pos_embed.shape[-1]:
            raise ValueError(f"{x.shape[-1]} time patches; PaSST-S takes at most "
                             f"{self.time_new_pos_embed.shape[-1]} (10 s at 32 kHz)")
        x = x + self.time_new_pos_embed[..., :x.shape[-1]] + self.freq_new_pos_embed
        x = x.flatten(2).transpose(1, 2)
        b = x.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1) + self.new_pos_embed[:, :1],
                            self.dist_token.expand(b, -1, -1) + self.new_pos_embed[:, 1:]], dim=1)
        x = self.norm(self.blocks(torch.cat([tokens, x], dim=1)))
        features = (x[:, 0] + x[:, 1]) / 2
        return features, self.head(features)


def fixed_length(audio: np.ndarray, samples: int = CLIP_SAMPLES) -> np.ndarray:
    """Truncate or zero-pad to exactly ``samples`` (av-benchmark: 10 s at 32 kHz)."""
    audio = np.asarray(audio, np.float32).reshape(-1)[:samples]
    return np.pad(audio, (0, samples - audio.size))


@dataclass
class PasstScorer:
    """A loaded PaSST-S with its front end: 768-d features and 527 logits of 32 kHz mono clips."""

    model: Passt
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.front = MelFrontEnd().to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PasstScorer":
        state = load_state(path, key=None)

        def build() -> Passt:
            dim, depth = int(state["cls_token"].shape[-1]), 1 + max(int(k.split(".")[1]) for k in state
                                                                      if k.startswith("blocks."))
            heads = 12 if dim == 768 else max(1, dim // 64)
            return Passt(dim, depth, heads, int(state["head.1.weight"].shape[0]))

        model = load_strict(path, "a PaSST-S checkpoint", build, state)
        return cls(model.to(device).eval(), device)

    @torch.inference_mode()
    def embed(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """32 kHz mono audio (made exactly 10 s) -> (features float64 [dim], logits float64 [527])."""
        x = torch.from_numpy(fixed_length(audio))[None].to(self.device)
        features, logits = self.model(self.front(x)[:, None])
        return features[0].double().cpu().numpy(), logits[0].double().cpu().numpy()
