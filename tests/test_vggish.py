"""VGGish for FAD: the torchvggish release's names and shapes, VGGish's own log-mel front end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics.vggish import Vggish, VggishScorer, examples, hertz_to_mel, log_mel, mel_matrix

TINY = dict(widths=(4, "M", 4, "M", 8, 8, "M", 8, 8, "M"), hidden=16, dim=128)


def released_shapes() -> dict[str, tuple[int, ...]]:
    """``vggish-10086976.pth`` (torchvggish): six 3x3 convolutions and three linear layers."""
    shapes = {}
    for i, (c_in, c_out) in zip((0, 3, 6, 8, 11, 13), ((1, 64), (64, 128), (128, 256), (256, 256), (256, 512),
                                                        (512, 512))):
        shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (c_out, c_in, 3, 3), (c_out,)
    for i, (c_in, c_out) in zip((0, 2, 4), ((512 * 4 * 6, 4096), (4096, 4096), (4096, 128))):
        shapes[f"embeddings.{i}.weight"], shapes[f"embeddings.{i}.bias"] = (c_out, c_in), (c_out,)
    return shapes


def test_full_size_model_has_the_released_key_names_and_shapes():
    with torch.device("meta"):
        model = Vggish()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == released_shapes()


def test_mel_matrix_is_htk_triangles_linear_in_mel():
    w = mel_matrix()
    assert w.shape == (257, 64) and np.all(w[0] == 0) and w.max() <= 1.0
    # band 0 spans mel(125) .. mel(125) + 2 delta (delta = 39.8 mel); the 156.25 Hz bin (k = 5) lies
    # 1.052 delta above the lower edge: just past the centre, on the falling edge, weight 2 - 1.052
    delta = (1127 * math.log(1 + 7500 / 700) - 1127 * math.log(1 + 125 / 700)) / 65
    above = (1127 * math.log(1 + 156.25 / 700) - 1127 * math.log(1 + 125 / 700)) / delta
    assert 1 < above < 2 and w[5, 0] == pytest.approx(2 - above, rel=1e-12)
    assert w[5, 1] == pytest.approx(above - 1, rel=1e-12)  # and on band 1's rising edge
    assert w[4, 0] == 0.0  # 125 Hz: the lower edge itself
    assert hertz_to_mel(700.0) == pytest.approx(1127 * math.log(2))


def test_log_mel_framing_and_values():
    silence = np.zeros(16000)
    mel = log_mel(silence)
    assert mel.shape == (1 + (16000 - 400) // 160, 64) == (98, 64)
    np.testing.assert_allclose(mel, math.log(0.01))
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000 * 3) / 16000)
    ex = examples(tone)
    assert ex.shape == (3, 1, 96, 64) and ex.dtype == np.float32
    centres = np.linspace(hertz_to_mel(125), hertz_to_mel(7500), 66)[1:-1]
    assert int(np.argmax(ex[0, 0].mean(axis=0))) == int(np.argmin(np.abs(centres - hertz_to_mel(1000))))
    assert examples(np.zeros(15000)).shape == (0, 1, 96, 64)  # under 0.96 s + a window: no example


def test_released_layout_loads_strictly_and_embeds(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in Vggish(**TINY).state_dict().items()}
    torch.save(state, tmp_path / "vggish-tiny.pth")
    scorer = VggishScorer.load(tmp_path / "vggish-tiny.pth")
    for name, value in scorer.model.state_dict().items():
        assert torch.equal(value, state[name])
    audio = 0.1 * np.random.default_rng(0).standard_normal(16000 * 2)
    emb = scorer.embed(audio)
    assert emb.shape == (2, 128) and emb.dtype == np.float64
    assert (emb < 0).any()  # the final ReLU is dropped (frechet_audio_distance / fadtk convention)
    assert scorer.embed(np.zeros(100)).shape == (0, 128)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvggish VGGish"):
        VggishScorer.load(tmp_path / "bad.pth")
