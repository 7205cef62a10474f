"""Frechet distance between two Gaussians fitted to embeddings (FD, FAD), in float64.

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), as in pytorch-fid, AudioLDM's
evaluation and frechet_audio_distance. The trace of the matrix square root is computed as
tr((R S2 R)^(1/2)) with R = S1^(1/2): R S2 R is symmetric positive semi-definite, so its root
comes from a symmetric eigendecomposition, exactly, with no complex parts to discard and no
``eps * I`` offset for singular covariances (fewer clips than dimensions), which the reference
codes add when ``scipy.linalg.sqrtm`` fails. Differences are rounding (docs/evaluation.md).
"""
from __future__ import annotations

import numpy as np


def gaussian_stats(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov(rowvar=False)``, N-1 normalisation) of [N, D] embeddings, float64."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need embeddings [N >= 2, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or infinity")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via tr((R S2 R)^(1/2)), R = S1^(1/2)."""
    root = _psd_sqrt(np.asarray(sigma1, np.float64))
    inner = root @ np.asarray(sigma2, np.float64) @ root
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance of N(mu1, sigma1) and N(mu2, sigma2); never negative."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def frechet_distance_of(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to two sets of embeddings [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
