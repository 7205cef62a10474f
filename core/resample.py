"""Audio resampling: torchaudio's ``functional.resample`` default kernel, or soxr.

AudioLDM's ``read_wav_file`` and VTA-LDM's feature code bring audio to 16 kHz with
``torchaudio.functional.resample(x, orig, new)`` at its defaults, so the mel the VAE was
trained on saw that filter's passband and transition band. torchaudio has no build for the
torch this project uses, so ``resample_torchaudio`` implements the kernel from its documented
definition (``sinc_interp_hann``, ``lowpass_filter_width=6``, ``rolloff=0.99``):

- both rates are divided by their gcd (``o``, ``n``); the cut-off is ``b = min(o, n) * rolloff``;
- ``width = ceil(6 * o / b)`` input samples of context on each side;
- output phase ``k`` (of ``n``) weights input offset ``j`` in ``[-width, width + o)`` by
  ``sinc(t) * cos(t * pi / 12) ** 2 * b / o`` with ``t = b * (j / o - k / n)``, clamped to
  ``[-6, 6]`` (a Hann window over six zero crossings each side);
- the input is zero-padded by ``width`` before and ``width + o`` after, every ``o`` input samples
  give ``n`` output samples, and the output is cut to ``ceil(n * len / o)``.

The kernel is evaluated in float64 (torchaudio uses the input's dtype): the outputs agree with
torchaudio 2.9.1 on float32 input to about 1e-6 (``tests/test_resample.py``).

``soxr_hq`` is soxr's HQ quality, what ``librosa.load`` uses by default.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import soxr

Resampler = Literal["torchaudio", "soxr_hq"]
RESAMPLERS: tuple[str, ...] = ("torchaudio", "soxr_hq")
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
# what a dataset card says about each choice
RESAMPLER_NOTES = {
    "torchaudio": {"name": "torchaudio", "definition": "torchaudio.functional.resample at its defaults "
                   "(sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99), as AudioLDM's read_wav_file and "
                   "VTA-LDM", "implementation": "core/resample.py (numpy, float64 kernel)"},
    "soxr_hq": {"name": "soxr_hq", "definition": "soxr HQ quality (librosa.load's default)",
                "implementation": "python-soxr"},
}


@lru_cache(maxsize=16)
def sinc_kernel(orig_sr: int, new_sr: int) -> tuple[np.ndarray, int]:
    """torchaudio's default kernel for ``orig_sr -> new_sr``: ``([n, 2 * width + o], width)``."""
    g = math.gcd(int(orig_sr), int(new_sr))
    o, n = int(orig_sr) // g, int(new_sr) // g
    base = min(o, n) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * o / base)
    idx = np.arange(-width, width + o, dtype=np.float64)[None, :] / o
    t = (np.arange(0, -n, -1, dtype=np.float64)[:, None] / n + idx) * base
    t = np.clip(t, -LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = np.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = kernel * window * (base / o)
    kernel.setflags(write=False)
    return kernel, width


def resample_torchaudio(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """``torchaudio.functional.resample(x, orig_sr, new_sr)`` at its defaults, along the last axis."""
    x = np.asarray(x, dtype=np.float32)
    _check_rates(orig_sr, new_sr)
    if orig_sr == new_sr:
        return x.copy()
    g = math.gcd(int(orig_sr), int(new_sr))
    o, n = int(orig_sr) // g, int(new_sr) // g
    kernel, width = sinc_kernel(int(orig_sr), int(new_sr))
    flat = x.reshape(-1, x.shape[-1])
    length = flat.shape[-1]
    padded = np.pad(flat.astype(np.float64), ((0, 0), (width, width + o)))
    taps = kernel.shape[1]
    frames = (padded.shape[-1] - taps) // o + 1
    # every o-th window of `taps` input samples gives n outputs (conv1d with stride o, n channels)
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps, axis=-1)[:, ::o][:, :frames]
    out = np.einsum("bft,nt->bfn", windows, kernel, optimize=True).reshape(flat.shape[0], -1)
    target = math.ceil(n * length / o)
    out = out[:, :target].astype(np.float32)
    return out.reshape(x.shape[:-1] + (out.shape[-1],))


def resample(x: np.ndarray, orig_sr: int, new_sr: int, method: str = "torchaudio") -> np.ndarray:
    """Resample float32 audio (last axis is time) with the named method (``RESAMPLERS``)."""
    if method == "torchaudio":
        return resample_torchaudio(x, orig_sr, new_sr)
    if method == "soxr_hq":
        _check_rates(orig_sr, new_sr)
        x = np.asarray(x, dtype=np.float32)
        if orig_sr == new_sr:
            return x.copy()
        if x.ndim == 1:
            return soxr.resample(x, orig_sr, new_sr, quality="HQ").astype(np.float32, copy=False)
        y = soxr.resample(x.reshape(-1, x.shape[-1]).T, orig_sr, new_sr, quality="HQ")
        return np.ascontiguousarray(np.atleast_2d(y.T), np.float32).reshape(x.shape[:-1] + (-1,))
    raise ValueError(f"unknown resampler {method!r}: choose one of {', '.join(RESAMPLERS)}")


def _check_rates(orig_sr: int, new_sr: int) -> None:
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
