"""core.resample: torchaudio's ``functional.resample`` default kernel, reproduced from its definition,
and its use as the 16 kHz feature-audio resampler (soxr selectable).

``data/vggsound/torchaudio_resample_16k.npz`` holds, for each real clip, 3 s of its audio (mono,
native rate) and what torchaudio 2.9.1 made of it at its defaults.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import soxr

from core.decode import DecodeRequest, decode
from core.resample import RESAMPLERS, resample, resample_torchaudio, sinc_kernel
from shards.config import EncoderConfig, MelConfig
from shards.encode_stage import EncodeStageConfig, SignalStage

DATA = Path(__file__).parent / "data" / "vggsound"
TORCHAUDIO = np.load(DATA / "torchaudio_resample_16k.npz")
NAMES = sorted({k.split(":")[0] for k in TORCHAUDIO.files})


@pytest.mark.parametrize("name", NAMES)
def test_reproduces_torchaudio_on_real_clips(name):
    x, rate = TORCHAUDIO[f"{name}:input"], int(TORCHAUDIO[f"{name}:input_rate"])
    expected = TORCHAUDIO[f"{name}:output_16k"]
    y = resample(x, rate, 16000)
    assert y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=0)
    assert np.abs(y - expected).max() < 1e-5  # float64 kernel vs torchaudio's float32 one
    # soxr is a different filter: it would not pass (the reason this module exists)
    assert np.abs(soxr.resample(x, rate, 16000, quality="HQ") - expected).max() > 1e-3


def test_kernel_is_the_documented_hann_windowed_sinc():
    kernel, width = sinc_kernel(44100, 16000)
    # gcd 100: 441 -> 160 phases; cut-off 160 * 0.99; width = ceil(6 * 441 / 158.4) = 17
    assert width == 17 and kernel.shape == (160, 2 * 17 + 441)
    # phase 0 at offset 0 is the centre tap: sinc(0) * hann(0) * cutoff / orig
    assert kernel[0, width] == pytest.approx(160 * 0.99 / 441)
    # a constant signal keeps (almost exactly) its level: each phase sums to ~1
    np.testing.assert_allclose(kernel.sum(axis=1), 1.0, atol=2e-3)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000),
                                      (16000, 44100)])
def test_length_and_passband(orig, new):
    n = orig + 123
    t = np.arange(n) / orig
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y = resample(x, orig, new)
    assert y.size == math.ceil(n * new / orig)
    tt = np.arange(y.size) / new
    inner = slice(y.size // 10, -y.size // 10)  # away from the zero-padded edges
    np.testing.assert_allclose(y[inner], 0.5 * np.sin(2 * np.pi * 440 * tt[inner]), atol=5e-3)


def test_stopband_removes_what_16_khz_cannot_hold():
    orig = 44100
    t = np.arange(orig) / orig
    tone = np.sin(2 * np.pi * 10000 * t).astype(np.float32)  # above 8 kHz: must vanish, not alias
    assert np.abs(resample(tone, orig, 16000)[2000:-2000]).max() < 1e-2


def test_batches_same_rate_and_bad_arguments():
    x = np.random.default_rng(0).standard_normal((2, 3, 4410)).astype(np.float32)
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, 1600)
    np.testing.assert_allclose(y[1, 2], resample_torchaudio(x[1, 2], 44100, 16000), atol=1e-6)
    assert resample(x[0, 0], 16000, 16000) is not x[0, 0]
    np.testing.assert_array_equal(resample(x[0, 0], 16000, 16000), x[0, 0])
    assert resample(x, 44100, 16000, "soxr_hq").shape == (2, 3, 1600)
    with pytest.raises(ValueError, match="resampler"):
        resample(x, 44100, 16000, "sinc_best")
    with pytest.raises(ValueError, match="positive integers"):
        resample(x, 44100.5, 16000)
    assert RESAMPLERS == ("torchaudio", "soxr_hq")


def test_decode_resamples_with_the_requested_method():
    path = DATA / "video" / "-26aVYRtEAc_000030.mp4"
    req = DecodeRequest(duration_s=3.0, audio_rates=(16000,), audio_native=True, need_video=False)
    soxr_clip = decode(path, req)
    ta_clip = decode(path, DecodeRequest(duration_s=3.0, audio_rates=(16000,), need_video=False,
                                         resampler="torchaudio"))
    mono = soxr_clip.audio_native.mean(axis=0)
    np.testing.assert_allclose(ta_clip.audio[16000], resample_torchaudio(mono, 44100, 16000), atol=1e-6)
    np.testing.assert_allclose(soxr_clip.audio[16000], soxr.resample(mono, 44100, 16000, quality="HQ"), atol=1e-6)
    # the input the fixture was made from: the same 3 s, mixed by the channel mean
    np.testing.assert_allclose(ta_clip.audio[16000], TORCHAUDIO["-26aVYRtEAc_000030.mp4:output_16k"], atol=1e-4)


@pytest.mark.parametrize("resampler", ["torchaudio", "soxr_hq"])
def test_feature_audio_uses_the_mel_config_resampler(resampler):
    assert MelConfig().resampler == "torchaudio"  # AudioLDM's, by default
    path = DATA / "video" / "0DCit2EBtjs_000030.mp4"
    stage = SignalStage(EncodeStageConfig(encoders=EncoderConfig(), mel=MelConfig(resampler=resampler)))
    clip = stage._signals({"key": "k", "video_path": str(path), "start_s": 0.0, "duration_s": 3.0})
    expected = decode(path, DecodeRequest(duration_s=3.0, audio_rates=(16000,), need_video=False,
                                          resampler=resampler)).audio[16000]
    np.testing.assert_array_equal(clip.audio[16000], expected)
    with pytest.raises(ValueError, match="resampler"):
        MelConfig(resampler="sinc_best")
