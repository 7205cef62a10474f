"""AudioLDM log-mel against an independent NumPy computation written from the published recipe."""
from __future__ import annotations

import numpy as np
import pytest

from shards.config import MelConfig
from shards.mel import log_mel, log_mel_torch, mel_filterbank, prepare_waveform

CFG = MelConfig()


# Slaney's mel scale: linear below 1 kHz, logarithmic above
F_SP = 200.0 / 3
MIN_LOG_HZ = 1000.0
MIN_LOG_MEL = MIN_LOG_HZ / F_SP
LOGSTEP = np.log(6.4) / 27.0


def _hz_to_slaney_mel(f):
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= MIN_LOG_HZ, MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / MIN_LOG_HZ) / LOGSTEP, f / F_SP)


def _slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= MIN_LOG_MEL, MIN_LOG_HZ * np.exp(LOGSTEP * (m - MIN_LOG_MEL)), F_SP * m)


def reference_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney's Auditory Toolbox: triangles evenly spaced on the Slaney mel scale, area-normalised."""
    fft_hz = np.arange(n_fft // 2 + 1) * sr / n_fft
    edges = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, fft_hz.size))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rise = (fft_hz - lo) / (mid - lo)
        fall = (hi - fft_hz) / (hi - mid)
        fb[i] = np.maximum(0.0, np.minimum(rise, fall)) * 2.0 / (hi - lo)
    return fb


def reference_log_mel(audio: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """AudioLDM's pipeline step by step in float64: normalise, pad, reflect-pad, frame, Hann, |rfft|, mel, log."""
    x = np.asarray(audio, np.float64)[: cfg.num_samples]
    x = x - x.mean()
    x = x / (np.abs(x).max() + 1e-8) * 0.5
    x = np.concatenate([x, np.zeros(cfg.num_samples - x.size)])
    pad = cfg.n_fft // 2
    x = np.pad(x, pad, mode="reflect")
    n_frames = 1 + (x.size - cfg.n_fft) // cfg.hop_length
    idx = np.arange(cfg.n_fft)[None, :] + cfg.hop_length * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)  # periodic Hann
    magnitude = np.abs(np.fft.rfft(x[idx] * window, axis=1)).T  # [n_fft/2+1, frames]
    mel = reference_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax) @ magnitude
    return np.log(np.maximum(mel, cfg.log_clamp))[:, : cfg.frames]


def _test_signal(seconds: float, seed: int = 0) -> np.ndarray:
    sr = CFG.sample_rate
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    chirp = np.sin(2 * np.pi * (100 * t + 350 * t ** 2))
    clicks = np.zeros_like(t)
    clicks[(np.arange(1, int(seconds)) * sr)] = 1.0
    return (0.3 * chirp + 0.05 * rng.standard_normal(t.size) + clicks + 0.1).astype(np.float32)


def test_parameters_are_audioldm():
    assert (CFG.sample_rate, CFG.n_fft, CFG.hop_length, CFG.win_length, CFG.n_mels) == (16000, 1024, 160, 1024, 64)
    assert (CFG.fmin, CFG.fmax, CFG.log_clamp, CFG.frames, CFG.num_samples) == (0.0, 8000.0, 1e-5, 1024, 163840)


def test_filterbank_matches_slaney_definition():
    ours = mel_filterbank(CFG)
    ref = reference_filterbank(16000, 1024, 64, 0.0, 8000.0)
    assert ours.shape == (64, 513)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("seconds", [10.24, 10.0, 3.3, 12.0])
def test_log_mel_matches_independent_computation(seconds):
    audio = _test_signal(seconds)
    ours = log_mel(audio, CFG)
    ref = reference_log_mel(audio, CFG)
    assert ours.shape == (64, 1024) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # padded tail of a short clip is silence at the clamp floor
    if seconds < 10:
        tail = int(seconds * CFG.sample_rate / CFG.hop_length) + 8
        assert np.allclose(ours[:, tail:], np.log(CFG.log_clamp))


def test_waveform_preparation():
    x = _test_signal(3.0)
    w = prepare_waveform(x, CFG)
    n = x.size
    assert w.shape == (163840,) and w.dtype == np.float32
    assert abs(np.abs(w[:n]).max() - 0.5) < 1e-6
    assert abs(w[:n].mean()) < 1e-6
    assert not w[n:].any()
    silent = prepare_waveform(np.zeros(16000, np.float32), CFG)
    assert not silent.any() and np.isfinite(log_mel(np.zeros(16000, np.float32))).all()
    raw = prepare_waveform(x, MelConfig(peak=0.0))
    np.testing.assert_allclose(raw[:n], np.clip(x, -1, 1), atol=1e-7)


def test_batched_equals_single_and_shape_checked():
    import torch

    a, b = _test_signal(10.24, 1), _test_signal(5.0, 2)
    batch = torch.from_numpy(np.stack([prepare_waveform(a), prepare_waveform(b)]))
    out = log_mel_torch(batch, CFG).numpy()
    np.testing.assert_allclose(out[0], log_mel(a), atol=1e-5)
    np.testing.assert_allclose(out[1], log_mel(b), atol=1e-5)
    with pytest.raises(ValueError, match="163840"):
        log_mel_torch(torch.zeros(1, 16000), CFG)
