"""AudioLDM's log-mel spectrogram, the input of its VAE (docs/encode.md).

AudioLDM (``audioldm/audio/stft.py`` + ``tools.py``) removes the waveform mean, scales its peak
to 0.5, zero-pads to 10.24 s, takes a reflect-padded ("centred") STFT with a periodic 1024 Hann
window, keeps the magnitude, applies librosa's Slaney mel filterbank (64 bands, 0-8 kHz), takes
``log(clamp(x, 1e-5))`` and keeps the first 1024 of the 1025 frames. The STFT runs in torch so a
batch of clips is one call, on the GPU when the encoders are there.
"""
from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np
import torch

from shards.config import MelConfig


def prepare_waveform(audio: np.ndarray, cfg: MelConfig = MelConfig()) -> np.ndarray:
    """Mono float32 audio at ``cfg.sample_rate`` -> exactly ``cfg.num_samples``, AudioLDM-normalised."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)[: cfg.num_samples]
    if cfg.peak > 0 and x.size:
        x = x - x.mean()
        x = x / (np.abs(x).max() + 1e-8) * cfg.peak
    out = np.zeros(cfg.num_samples, dtype=np.float32)
    out[: x.size] = x
    return np.clip(out, -1.0, 1.0)


@lru_cache(maxsize=4)
def mel_filterbank(cfg: MelConfig) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] Slaney-scale, Slaney-normalised triangles (librosa's defaults)."""
    return librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                               fmin=cfg.fmin, fmax=cfg.fmax, htk=False, norm="slaney").astype(np.float32)


def log_mel_torch(waves: torch.Tensor, cfg: MelConfig = MelConfig()) -> torch.Tensor:
    """Prepared waveforms [B, num_samples] -> log-mel [B, n_mels, frames] (float32, same device)."""
    if waves.ndim != 2 or waves.shape[1] != cfg.num_samples:
        raise ValueError(f"expected prepared waveforms [B, {cfg.num_samples}], got {tuple(waves.shape)}")
    waves = waves.to(torch.float32)
    window = torch.hann_window(cfg.win_length, periodic=True, device=waves.device)
    spec = torch.stft(waves, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=window, center=True, pad_mode="reflect", return_complex=True)
    magnitude = spec.abs()  # [B, n_fft // 2 + 1, 1 + N // hop]
    fb = torch.from_numpy(mel_filterbank(cfg)).to(waves.device)
    mel = torch.matmul(fb, magnitude)
    if mel.shape[-1] < cfg.frames:
        raise ValueError(f"{mel.shape[-1]} STFT frames < {cfg.frames}: audio too short for this MelConfig")
    return torch.log(torch.clamp(mel[..., : cfg.frames], min=cfg.log_clamp))


def log_mel(audio: np.ndarray, cfg: MelConfig = MelConfig()) -> np.ndarray:
    """One clip of mono audio at ``cfg.sample_rate`` -> float32 [n_mels, frames]."""
    wave = torch.from_numpy(prepare_waveform(audio, cfg))[None]
    return log_mel_torch(wave, cfg)[0].numpy()
