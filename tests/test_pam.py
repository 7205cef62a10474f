"""PAM from embeddings and PAM's 7 s windows, against hand-computed values (soham97/PAM's definition)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from metrics.pam import PROMPTS, SAMPLE_RATE, WINDOW, pam_probabilities, pam_score, pam_windows


def test_the_prompt_pair_is_the_papers_positive_first():
    assert PROMPTS == ("the sound is clear and clean.", "the sound is noisy and with artifacts.")
    assert WINDOW == 7 * 44100 == 7 * SAMPLE_RATE


def test_positive_probability_is_the_softmax_of_scaled_cosines():
    prompts = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # cosines (1, 0); (0, 1); (1/sqrt2, 1/sqrt2); (0.6, -0.8) with norms that must not matter
    audio = np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [2.0, 2.0, 0.0], [0.6, -0.8, 0.0]]) * [[1], [1], [1], [10]]
    scale = 2.0
    expected = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.exp(2)), 0.5,
                math.exp(1.2) / (math.exp(1.2) + math.exp(-1.6))]
    np.testing.assert_allclose(pam_probabilities(audio, prompts * 7.0, scale), expected, rtol=1e-12)


def test_probability_stays_finite_and_ordered_at_the_learned_scale():
    rng = np.random.default_rng(0)
    audio, prompts = rng.standard_normal((5, 16)), rng.standard_normal((2, 16))
    p = pam_probabilities(audio, prompts, 100.0)  # MS-CLAP's logit scale is clamped near 100
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    # swapping the prompts gives the complement
    np.testing.assert_allclose(pam_probabilities(audio, prompts[::-1], 100.0), 1 - p, atol=1e-12)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(2, d\) prompt"):
        pam_probabilities(np.ones((3, 4)), np.ones((3, 4)), 1.0)


def test_a_clip_scores_the_mean_of_its_windows():
    assert pam_score(np.array([0.2, 0.5, 0.8, 0.9])) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        pam_score(np.array([]))


def test_a_short_clip_is_tiled_to_one_window():
    audio = np.arange(1, 100001, dtype=np.float32)  # 2.27 s
    (w,) = pam_windows(audio)
    assert w.shape == (WINDOW,)
    np.testing.assert_array_equal(w[:100000], audio)
    np.testing.assert_array_equal(w[100000:200000], audio)
    np.testing.assert_array_equal(w[300000:], audio[:WINDOW - 300000])


def test_exactly_seven_seconds_is_one_window_and_fourteen_two():
    audio = np.random.default_rng(1).standard_normal(2 * WINDOW).astype(np.float32)
    np.testing.assert_array_equal(pam_windows(audio[:WINDOW]), audio[None, :WINDOW])
    np.testing.assert_array_equal(pam_windows(audio), audio.reshape(2, WINDOW))


def test_a_long_clip_adds_its_last_seven_seconds():
    audio = np.arange(2 * WINDOW + 1234, dtype=np.float32)
    w = pam_windows(audio)
    assert w.shape == (3, WINDOW)
    np.testing.assert_array_equal(w[:2].reshape(-1), audio[:2 * WINDOW])
    np.testing.assert_array_equal(w[2], audio[-WINDOW:])


def test_empty_audio_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        pam_windows(np.zeros(0, np.float32))
