"""KL divergence between paired classifier outputs, and the Inception Score (AudioLDM's evaluation).

With ``g`` the generated clip's logits and ``r`` its reference's, over C classes (EPS = 1e-6):

- ``kl_softmax(g, r)`` = sum_c p_c (log p_c - log(q_c + EPS)), p = softmax(r), q = softmax(g):
  KL(reference || generated), the AudioGen / audioldm_eval "KL".
- ``kl_sigmoid(g, r)`` = sum_c s_c (log s_c - log(t_c + EPS)), s = sigmoid(r), t = sigmoid(g):
  audioldm_eval's "KL_Sigmoid", the same sum on per-class sigmoid probabilities (not a Bernoulli
  KL: the (1 - s) terms are not included, as published).

The set value is the mean over pairs (the published code sums over pairs and divides by their
number). ``inception_score`` = exp(E_x KL(p(y|x) || p(y))) of softmax(logits), in ``splits``
chunks after a seeded shuffle, mean and std over chunks (audioldm_eval: 10 splits, seed 2020).
Terms with p = 0 count 0 (the limit of p log p); the published code turns a probability that
underflows to exactly 0 in float64 into NaN instead.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _kl_terms(p: np.ndarray, q: np.ndarray, eps: float = EPS) -> np.ndarray:
    """sum_c p_c (log p_c - log(q_c + eps)), as torch.nn.functional.kl_div(log(q + eps), p); 0 where p == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q + eps)), 0.0).sum(axis=-1)


def _pair(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, r = np.atleast_2d(np.asarray(generated, np.float64)), np.atleast_2d(np.asarray(reference, np.float64))
    if g.shape != r.shape:
        raise ValueError(f"generated logits {g.shape} and reference logits {r.shape} must pair up")
    return g, r


def kl_softmax(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pair KL(softmax(reference) || softmax(generated)) of logits [N, C] -> [N]."""
    g, r = _pair(generated, reference)
    return _kl_terms(_softmax(r), _softmax(g))


def kl_sigmoid(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pair audioldm_eval KL_Sigmoid of logits [N, C] -> [N]."""
    g, r = _pair(generated, reference)
    return _kl_terms(_sigmoid(r), _sigmoid(g))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def inception_score(logits: np.ndarray, splits: int = 10, seed: int | None = 2020) -> tuple[float, float]:
    """(mean, std) over ``splits`` chunks of exp(mean_x KL(softmax(x) || mean softmax)); ``seed=None``: no shuffle."""
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"need logits [N >= splits={splits}, C], got shape {x.shape}")
    if seed is not None:
        x = x[np.random.RandomState(seed).permutation(x.shape[0])]
    p = _softmax(x)
    n = x.shape[0]
    scores = []
    for i in range(splits):
        chunk = p[i * n // splits:(i + 1) * n // splits]
        marginal = np.broadcast_to(chunk.mean(axis=0, keepdims=True), chunk.shape)
        scores.append(float(np.exp(_kl_terms(chunk, marginal, eps=0.0).mean())))
    return float(np.mean(scores)), float(np.std(scores))
