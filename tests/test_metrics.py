"""Frechet distance, KL and Inception Score against closed forms, scipy and hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from metrics.divergence import EPS, inception_score, kl_sigmoid, kl_softmax
from metrics.frechet import frechet_distance, frechet_distance_of, gaussian_stats


def _random_psd(rng, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / frechet_audio_distance formula with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_diagonal_gaussians_have_the_closed_form_distance():
    # for commuting covariances FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0 + (0.5 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-12)


def test_rotated_gaussians_keep_their_distance():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)) + 2.0
    mu = np.zeros(6)
    shift = np.zeros(6)
    shift[0] = math.sqrt(2.0)
    got = frechet_distance(mu, q @ np.diag(a) @ q.T, q @ shift, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_matches_scipy_on_general_covariances():
    rng = np.random.default_rng(1)
    for d in (2, 16, 128):
        s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_singular_covariances_stay_finite_and_agree_with_scipy():
    """Fewer clips than dimensions (rank-deficient covariances): no NaN, no eps offset needed."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 0.5
    got = frechet_distance_of(x, y)
    (mu1, s1), (mu2, s2) = gaussian_stats(x), gaussian_stats(y)
    assert np.isfinite(got) and got == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)


def test_samples_of_known_gaussians_converge_to_their_distance():
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (200_000, 3))
    y = rng.normal(1.0, 2.0, (200_000, 3))
    assert frechet_distance_of(x, y) == pytest.approx(3 * 1.0 + 3 * (2.0 - 1.0) ** 2, rel=0.01)


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_kl_softmax_by_hand():
    # reference softmax (1/2, 1/4, 1/4), generated uniform: KL = 1/2 log(3/2) + 2 * 1/4 log(3/4)
    ref = np.log([[0.5, 0.25, 0.25]])
    gen = np.zeros((1, 3))
    p, q = np.array([0.5, 0.25, 0.25]), 1 / 3
    expected = float(np.sum(p * (np.log(p) - np.log(q + EPS))))
    assert expected == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75), abs=1e-5)
    assert kl_softmax(gen, ref)[0] == pytest.approx(expected, abs=1e-12)
    assert kl_softmax(ref, ref)[0] == pytest.approx(-float(np.sum(p * np.log1p(EPS / p))), abs=1e-12)
    # direction: KL(reference || generated), not the reverse
    assert kl_softmax(ref, gen)[0] != pytest.approx(kl_softmax(gen, ref)[0], abs=1e-3)


def test_kl_sigmoid_by_hand():
    # logits 0 -> 1/2; logit log 3 -> 3/4. Sum over classes of s (log s - log(t + EPS))
    ref = np.array([[0.0, math.log(3.0)]])
    gen = np.array([[math.log(3.0), 0.0]])
    expected = 0.5 * (math.log(0.5) - math.log(0.75 + EPS)) + 0.75 * (math.log(0.75) - math.log(0.5 + EPS))
    assert kl_sigmoid(gen, ref)[0] == pytest.approx(expected, abs=1e-12)
    assert kl_sigmoid(np.zeros((3, 2)), np.zeros((3, 2))).shape == (3,)
    with pytest.raises(ValueError, match="pair up"):
        kl_sigmoid(np.zeros((2, 2)), np.zeros((3, 2)))


def test_inception_score_by_hand():
    c = 10
    # every clip confidently a different class: p(y|x) one-hot, p(y) uniform -> IS = C per split
    distinct = np.full((c, c), -1e4)
    np.fill_diagonal(distinct, 0.0)
    mean, std = inception_score(distinct, splits=1, seed=None)
    assert mean == pytest.approx(c, rel=1e-9) and std == 0.0
    # every clip the same distribution: KL to the marginal is 0 -> IS = 1
    same = np.tile(np.array([[1.0, 2.0, 3.0]]), (20, 1))
    assert inception_score(same, splits=10)[0] == pytest.approx(1.0, abs=1e-12)
    # two classes, clips (0.9, 0.1) and (0.1, 0.9): IS = exp(0.9 log 1.8 + 0.1 log 0.2)
    two = np.log(np.array([[0.9, 0.1], [0.1, 0.9]]))
    assert inception_score(two, splits=1, seed=None)[0] == pytest.approx(
        math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2)), rel=1e-12)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)
