"""PANNs CNN14 at 16 kHz (Kong et al. 2020), the embedding and classifier of AudioLDM's evaluation.

The architecture is written here with the module names of the released checkpoint
(``Cnn14_16k_mAP=0.438.pth``, ``{"model": state_dict}``), so that checkpoint loads with
``strict=True``: the front end is torchlibrosa's (an STFT as two 1-D convolutions
``spectrogram_extractor.stft.conv_real/conv_imag`` over a reflect-padded, Hann-windowed signal;
a Slaney mel matrix ``logmel_extractor.melW``; ``10 log10(max(x, 1e-10))``), then ``bn0`` over the
64 mel bands, six conv blocks, mean over frequency, max + mean over time, ``fc1`` (the 2048-d
embedding after ReLU, FD's features) and ``fc_audioset`` (527 AudioSet logits, KL's and IS's).
The front-end weights are initialised to their exact values, so a model with random trunk weights
still computes real log-mels. ``widths`` shrinks the trunk for tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics.checkpoint import load_state, load_strict

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS, FMIN, FMAX = 512, 160, 64, 50.0, 8000.0
CLASSES = 527
WIDTHS = (64, 128, 256, 512, 1024, 2048)


class _Stft(nn.Module):
    """torchlibrosa's STFT: real and imaginary DFT parts as frozen convolutions."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        n = np.arange(n_fft)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann (fftbins=True)
        angle = 2 * np.pi * np.outer(np.arange(bins), n) / n_fft
        with torch.no_grad():
            self.conv_real.weight.copy_(torch.from_numpy(np.cos(angle) * window)[:, None, :])
            self.conv_imag.weight.copy_(torch.from_numpy(-np.sin(angle) * window)[:, None, :])

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(audio[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x).transpose(1, 2)[:, None], self.conv_imag(x).transpose(1, 2)[:, None]


class _Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.stft = _Stft(n_fft, hop)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(audio)
        return real ** 2 + imag ** 2  # power, [B, 1, T, bins]


class _LogMel(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float):
        super().__init__()
        import librosa

        mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).T
        self.melW = nn.Parameter(torch.from_numpy(mel.astype(np.float32)), requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=1e-10))  # ref 1.0, no top_db


class ConvBlock(nn.Module):
    """PANNs' conv block (also Diff-Foley's CAVP Cnn14): two 3x3 conv + BN + ReLU, then average pooling."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, pool: int | tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.avg_pool2d(x, pool) if pool not in (1, (1, 1)) else x


class Cnn14(nn.Module):
    """CNN14 (16 kHz front end); ``forward`` returns (embedding [B, W6], logits [B, classes])."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, classes: int = CLASSES):
        super().__init__()
        self.spectrogram_extractor = _Spectrogram(N_FFT, HOP)
        self.logmel_extractor = _LogMel(SAMPLE_RATE, N_FFT, N_MELS, FMIN, FMAX)
        self.bn0 = nn.BatchNorm2d(N_MELS)
        ins = (1,) + tuple(widths[:-1])
        for i, (c_in, c_out) in enumerate(zip(ins, widths), start=1):
            self.add_module(f"conv_block{i}", ConvBlock(c_in, c_out))
        self.fc1 = nn.Linear(widths[-1], widths[-1])
        self.fc_audioset = nn.Linear(widths[-1], classes)
        self.n_blocks = len(widths)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """float audio [B, samples] at 16 kHz -> log-mel [B, 1, frames, 64] (dB)."""
        return self.logmel_extractor(self.spectrogram_extractor(audio))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bn0(self.log_mel(audio).transpose(1, 3)).transpose(1, 3)
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"conv_block{i}")(x, pool=2 if i < self.n_blocks else 1)
        x = x.mean(dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)
        hidden = F.relu(self.fc1(x))
        return hidden, self.fc_audioset(hidden)


def widths_of(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """Trunk widths and class count a state dict was made for (the release: WIDTHS, 527)."""
    widths = []
    while f"conv_block{len(widths) + 1}.conv1.weight" in state:
        widths.append(int(state[f"conv_block{len(widths) + 1}.conv1.weight"].shape[0]))
    return tuple(widths), int(state["fc_audioset.weight"].shape[0])


@dataclass
class PannsScorer:
    """A loaded CNN14: 2048-d embeddings and 527 logits of 16 kHz mono clips, one clip per pass."""

    model: Cnn14
    device: str = "cpu"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PannsScorer":
        state = load_state(path)
        model = load_strict(path, "a PANNs CNN14 16 kHz checkpoint", lambda: Cnn14(*widths_of(state)), state)
        return cls(model.to(device).eval(), device)

    @torch.inference_mode()
    def embed(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz mono float audio -> (embedding float64 [W6], logits float64 [527])."""
        x = torch.as_tensor(np.asarray(audio, np.float32).reshape(1, -1), device=self.device)
        if x.shape[1] <= N_FFT // 2:
            raise ValueError(f"audio of {x.shape[1]} samples is too short for CNN14 (needs > {N_FFT // 2})")
        emb, logits = self.model(x)
        return emb[0].double().cpu().numpy(), logits[0].double().cpu().numpy()
