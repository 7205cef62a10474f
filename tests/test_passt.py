"""PaSST-S for FD/KL/IS at 32 kHz: the release's names and shapes, hear21passt's front end without torchaudio."""
from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import torch

from metrics.passt import MelFrontEnd, Passt, PasstScorer, fixed_length, kaldi_mel_banks

TINY = dict(dim=32, depth=2, heads=1)


def released_shapes() -> dict[str, tuple[int, ...]]:
    """``passt-s-f128-p16-s10-ap.476-swa.pt`` (hear21passt passt_s_swa_p16_128_ap476)."""
    shapes = {"patch_embed.proj.weight": (768, 1, 16, 16), "patch_embed.proj.bias": (768,),
              "cls_token": (1, 1, 768), "dist_token": (1, 1, 768), "new_pos_embed": (1, 2, 768),
              "freq_new_pos_embed": (1, 768, 12, 1), "time_new_pos_embed": (1, 768, 1, 99),
              "norm.weight": (768,), "norm.bias": (768,), "head.0.weight": (768,), "head.0.bias": (768,),
              "head.1.weight": (527, 768), "head.1.bias": (527,), "head_dist.weight": (527, 768),
              "head_dist.bias": (527,)}
    for i in range(12):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (768,), p + "norm1.bias": (768,), p + "norm2.weight": (768,),
                       p + "norm2.bias": (768,), p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
                       p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
                       p + "mlp.fc1.weight": (3072, 768), p + "mlp.fc1.bias": (3072,),
                       p + "mlp.fc2.weight": (768, 3072), p + "mlp.fc2.bias": (768,)})
    return shapes


def test_full_size_model_has_the_released_key_names_and_shapes():
    with torch.device("meta"):
        model = Passt()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == released_shapes()


def test_kaldi_mel_banks_by_hand():
    banks = kaldi_mel_banks()
    assert banks.shape == (128, 513) and np.all(banks[:, -1] == 0) and banks.max() <= 1.0
    # FFT bin 1 (31.25 Hz) lies between the centres of bands 0 and 1: falling and rising slopes
    delta = 1127 * math.log(1 + 15000 / 700) / 129
    m = 1127 * math.log(1 + 31.25 / 700)
    assert delta < m < 2 * delta
    assert banks[0, 1] == pytest.approx((2 * delta - m) / delta, rel=1e-12)
    assert banks[1, 1] == pytest.approx((m - delta) / delta, rel=1e-12)
    assert np.all(banks[:, 0] == 0)  # DC: mel 0 is band 0's left edge
    assert np.all(banks[:, 481:512] == 0)  # above 15 kHz (bin 480) no band reaches


def test_front_end_matches_librosa_stft_of_the_pre_emphasised_signal():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(320000)).astype(np.float32)
    with torch.no_grad():
        got = MelFrontEnd()(torch.from_numpy(audio)[None])[0].numpy()
    pre = audio[1:].astype(np.float64) - 0.97 * audio[:-1]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 799)  # symmetric Hann
    power = np.abs(librosa.stft(pre, n_fft=1024, hop_length=320, win_length=800, window=window,
                                center=True, pad_mode="reflect")) ** 2
    expected = (np.log(kaldi_mel_banks() @ power + 1e-5) + 4.5) / 5
    assert got.shape == expected.shape == (128, 1000)
    np.testing.assert_allclose(got, expected, atol=2e-4)


def _tiny_release(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in Passt(**TINY).state_dict().items()}
    for k in state:
        if "norm" in k and k.endswith("weight") or k == "head.0.weight":
            state[k] = state[k] + 1.0
    torch.save(state, path)
    return state


def test_released_layout_loads_strictly_and_clips_are_made_10_s(tmp_path):
    state = _tiny_release(tmp_path / "passt-tiny.pt")
    scorer = PasstScorer.load(tmp_path / "passt-tiny.pt")
    for name, value in scorer.model.state_dict().items():
        assert torch.equal(value, state[name])
    audio = (0.1 * np.random.default_rng(1).standard_normal(327680)).astype(np.float32)  # 10.24 s
    features, logits = scorer.embed(audio)
    assert features.shape == (32,) and logits.shape == (527,) and np.isfinite(logits).all()
    np.testing.assert_array_equal(scorer.embed(audio[:320000])[1], logits)  # truncated to 10 s
    short = audio[:160000]
    np.testing.assert_array_equal(scorer.embed(short)[1], scorer.embed(fixed_length(short))[1])
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a PaSST-S"):
        PasstScorer.load(tmp_path / "bad.pt")
