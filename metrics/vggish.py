"""VGGish (Hershey et al. 2017) embeddings for FAD, in the frechet_audio_distance / fadtk convention.

The model is written here with the module names of the torchvggish release
(``vggish-10086976.pth``: ``features.{0,3,6,8,11,13}`` convolutions, ``embeddings.{0,2,4}``
linear layers), so that state dict loads with ``strict=True``. As frechet_audio_distance and
fadtk use it: no PCA / quantisation post-processing, and the final ReLU of ``embeddings`` is
dropped, so each embedding is the raw 128-d output of the last linear layer; one embedding per
0.96 s example; FAD is the Frechet distance between all examples of all generated clips and all
examples of all reference clips.

The input is VGGish's own log-mel front end (TensorFlow ``mel_features.py``), in numpy: 16 kHz,
frames of 400 samples (25 ms) every 160 (10 ms) with no padding, periodic Hann window, the
magnitude of a 512-point real FFT, 64 HTK-mel bands 125-7500 Hz (triangles linear in mel, the DC
bin zeroed), ``log(mel + 0.01)``, then non-overlapping examples of 96 frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from metrics.checkpoint import load_state, load_strict

SAMPLE_RATE = 16000
WINDOW, HOP, N_FFT = 400, 160, 512
N_MELS, FMIN, FMAX, LOG_OFFSET = 64, 125.0, 7500.0, 0.01
EXAMPLE_FRAMES = 96
CONV_WIDTHS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as VGGish: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def mel_matrix(n_mels: int = N_MELS, n_bins: int = N_FFT // 2 + 1, rate: int = SAMPLE_RATE,
               fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """[n_bins, n_mels] triangular weights, linear in mel between neighbouring band edges."""
    bins_mel = hertz_to_mel(np.linspace(0.0, rate / 2, n_bins))
    edges = np.linspace(hertz_to_mel(fmin), hertz_to_mel(fmax), n_mels + 2)
    lower = (bins_mel[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins_mel[:, None]) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights[0, :] = 0.0
    return weights


def _frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    n = 1 + (x.shape[0] - length) // hop
    if n < 1:
        return np.zeros((0, length) + x.shape[1:], x.dtype)
    idx = np.arange(length)[None, :] + hop * np.arange(n)[:, None]
    return x[idx]


def log_mel(audio: np.ndarray) -> np.ndarray:
    """16 kHz mono audio -> [frames, 64] VGGish log-mel (float64)."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann
    frames = _frames(np.asarray(audio, np.float64).reshape(-1), WINDOW, HOP)
    magnitude = np.abs(np.fft.rfft(frames * window, N_FFT))
    return np.log(magnitude @ mel_matrix() + LOG_OFFSET)


def examples(audio: np.ndarray) -> np.ndarray:
    """16 kHz mono audio -> VGGish input [N, 1, 96, 64] float32 (N = whole 0.96 s examples)."""
    return _frames(log_mel(audio), EXAMPLE_FRAMES, EXAMPLE_FRAMES)[:, None].astype(np.float32)


class Vggish(nn.Module):
    """VGGish with the torchvggish names; ``forward`` gives the 128-d pre-ReLU embeddings [N, 128]."""

    def __init__(self, widths: tuple = CONV_WIDTHS, hidden: int = 4096, dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(w), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(w)
        self.features = nn.Sequential(*layers)
        pools = sum(w == "M" for w in widths)
        flat = c_in * (EXAMPLE_FRAMES >> pools) * (N_MELS >> pools)
        # the release's embeddings.{0,2,4}; its final ReLU (embeddings.5) is dropped as FAD codes do
        self.embeddings = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(True), nn.Linear(hidden, hidden),
                                        nn.ReLU(True), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.permute(0, 2, 3, 1).contiguous()  # TensorFlow's channels-last flattening order
        return self.embeddings(x.reshape(x.shape[0], -1))


def _architecture_of(state: dict[str, torch.Tensor]) -> dict:
    convs = sorted(int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight"))
    widths: list = []
    for i in convs:
        if widths and i - prev > 2:  # a max-pool sits between these convolutions
            widths.append("M")
        widths.append(int(state[f"features.{i}.weight"].shape[0]))
        prev = i
    widths.append("M")
    return {"widths": tuple(widths), "hidden": int(state["embeddings.0.weight"].shape[0]),
            "dim": int(state["embeddings.4.weight"].shape[0])}


@dataclass
class VggishScorer:
    """A loaded VGGish: the [N, 128] embeddings of a clip's whole 0.96 s examples."""

    model: Vggish
    device: str = "cpu"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "VggishScorer":
        state = load_state(path, key=None)
        model = load_strict(path, "a torchvggish VGGish checkpoint", lambda: Vggish(**_architecture_of(state)), state)
        return cls(model.to(device).eval(), device)

    @torch.inference_mode()
    def embed(self, audio: np.ndarray) -> np.ndarray:
        """16 kHz mono float audio -> float64 [N, 128] (one row per 0.96 s; empty when shorter)."""
        x = examples(audio)
        if len(x) == 0:
            return np.zeros((0, self.model.embeddings[-1].out_features))
        return self.model(torch.from_numpy(x).to(self.device)).double().cpu().numpy()
