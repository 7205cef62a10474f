"""Synchformer/DeSync: the release's names and shapes, av-benchmark's preprocessing and offset rule."""
from __future__ import annotations

import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from metrics.desync import (GRID, MEL_MEAN, MEL_STD, MIN_SECONDS, DesyncScorer, SyncMel, audio_segments,
                            common_length, mel_banks, video_segments)
from metrics.synchformer import Synchformer, SynchformerSize, _DividedAttention, size_of

KEYS = Path(__file__).parent / "data" / "synchformer_keys.json"
TINY = SynchformerSize(dim=32, video_depth=1, video_heads=2, audio_depth=1, audio_heads=2, sync_depth=1,
                       sync_heads=2, image_size=32)


def test_full_size_module_has_the_release_key_names_and_shapes():
    # the list was generated from av-benchmark's own Synchformer (tests/data/derive_synchformer_keys.py)
    expected = {k: tuple(v) for k, v in json.loads(KEYS.read_text()).items()}
    with torch.device("meta"):
        model = Synchformer()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 513 and expected["transformer.pos_emb_cfg.pos_emb"] == (1, 198, 768)
    assert size_of({k: torch.empty(v, device="meta") for k, v in expected.items()}) == SynchformerSize()


def test_mel_banks_are_htk_triangles_without_norm():
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)

    edges = 700.0 * (10 ** (np.linspace(0.0, mel(8000.0), 130) / 2595.0) - 1.0)  # Hz of 128 + 2 mel points
    freqs = np.linspace(0, 8000, 513)
    rising = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])
    expected = np.maximum(0.0, np.minimum(rising, falling))
    got = mel_banks().numpy()
    assert got.shape == (513, 128) and got.max() <= 1.0 and np.all(got[0] == 0)
    np.testing.assert_allclose(got, expected, atol=2e-5)  # torchaudio builds them in float32


def test_sync_mel_is_log_power_mel_padded_to_66_frames_and_normalised():
    rng = np.random.default_rng(0)
    seg = (0.1 * rng.standard_normal(10240)).astype(np.float32)
    with torch.no_grad():
        got = SyncMel()(torch.from_numpy(seg)[None])[0].numpy()
    power = np.abs(librosa.stft(seg.astype(np.float64), n_fft=1024, hop_length=160, win_length=400, window="hann",
                                center=True, pad_mode="reflect")) ** 2
    expected = (np.log(mel_banks().numpy().T.astype(np.float64) @ power + 1e-6) - MEL_MEAN) / (2 * MEL_STD)
    assert got.shape == (128, 66) and expected.shape == (128, 65)
    np.testing.assert_allclose(got[:, :65], expected, atol=1e-4)
    np.testing.assert_allclose(got[:, 65], -MEL_MEAN / (2 * MEL_STD), rtol=1e-6)  # zero pad after the log


def test_segments_of_8_s_and_the_4_8_s_floor():
    frames = np.zeros((200, 8, 8, 3), np.uint8)
    audio = np.zeros(128000, np.float32)
    assert len(video_segments(frames)) == 24 and len(audio_segments(audio)) == 24
    f, a = common_length(np.zeros((300, 8, 8, 3), np.uint8), np.zeros(120000, np.float32))
    assert len(f) == 188 and len(a) == 120000  # 7.5 s: the shorter stream decides
    f, a = common_length(frames[:120], audio[:76800])  # exactly 4.8 s: 14 segments of each
    assert len(video_segments(f)) == len(audio_segments(a)) == 14 and MIN_SECONDS == pytest.approx(4.8)
    with pytest.raises(ValueError, match="needs 4.8 s"):
        common_length(frames[:119], audio)
    pixels = video_segments(np.full((16, 2, 2, 3), 255, np.uint8))
    assert pixels.shape == (1, 16, 3, 2, 2) and bool((pixels == 1.0).all())
    ramp = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None, None], 3, axis=3)  # frame i has value i
    segs = video_segments(ramp)  # starts 0, 8, 16, 24 (24 + 16 = 40)
    assert segs.shape[0] == 4 and segs[2, 0, 0, 0, 0].item() == pytest.approx((16 / 255 - 0.5) / 0.5)


def test_divided_attention_equals_attention_within_frames_and_across_time():
    torch.manual_seed(0)
    attn = _DividedAttention(8, heads=2).eval()
    frames, per_frame = 3, 4
    x = torch.randn(1, 1 + frames * per_frame, 8)
    q, k, v = (t.reshape(1, -1, 2, 4).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))

    def naive(rows: list[int]) -> torch.Tensor:  # each patch token attends to CLS + its group
        idx = torch.tensor([0] + rows)
        w = ((q[:, :, rows] * 0.5) @ k[:, :, idx].transpose(-2, -1)).softmax(-1)
        return w @ v[:, :, idx]

    for over_time in (False, True):
        out = torch.zeros(1, 2, 1 + frames * per_frame, 4)
        out[:, :, :1] = ((q[:, :, :1] * 0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        groups = ([[1 + f * per_frame + p for f in range(frames)] for p in range(per_frame)] if over_time
                  else [[1 + f * per_frame + p for p in range(per_frame)] for f in range(frames)])
        for rows in groups:
            out[:, :, rows] = naive(rows)
        expected = attn.proj(out.transpose(1, 2).reshape(1, -1, 8))
        torch.testing.assert_close(attn(x, per_frame, over_time), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A tiny state dict in the release's layout (random values), saved as the release is: a bare state dict."""
    g = torch.Generator().manual_seed(0)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in Synchformer(TINY).state_dict().items()}
    for k in state:
        if k.endswith("weight") and ("norm" in k or ".ln" in k or "lnorm" in k or "layernorm" in k):
            state[k] = state[k] + 1.0
    path = tmp_path_factory.mktemp("sync") / "synchformer_state_dict.pth"
    torch.save(state, path)
    return path, state


def _clip(seconds: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (int(seconds * 25), 32, 32, 3), dtype=np.uint8)
    return frames, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def test_released_layout_loads_strictly_and_scores_first_and_last_4_8_s(tiny_release):
    path, state = tiny_release
    scorer = DesyncScorer.load(path)
    assert scorer.model.size == TINY
    for name, value in scorer.model.state_dict().items():
        assert torch.equal(value, state[name])
    frames, audio = _clip(8.4)
    result = scorer.score(frames, audio)
    video, sound = scorer.features(frames, audio)
    assert video.shape == (24, 8, 32) and sound.shape == (24, 6, 32) and result.segments == 24  # cut to 8 s
    with torch.no_grad():
        first = scorer.model.offset_logits(video[None, :14], sound[None, :14]).argmax().item()
        last = scorer.model.offset_logits(video[None, -14:], sound[None, -14:]).argmax().item()
    assert (result.first_s, result.last_s) == (float(GRID[first]), float(GRID[last]))
    assert result.desync == pytest.approx((abs(GRID[first]) + abs(GRID[last])) / 2)


def test_offset_grid_is_minus_2_to_2_s_in_0_2_s_steps(tiny_release):
    path, _ = tiny_release
    scorer = DesyncScorer.load(path)
    head = scorer.model.transformer.off_head
    frames, audio = _clip(5.0)
    for cls, offset in ((0, -2.0), (7, -0.6), (10, 0.0), (20, 2.0)):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 21).float())
        result = scorer.score(frames, audio)
        assert result.first_s == result.last_s == pytest.approx(offset, abs=1e-6)
        assert result.desync == pytest.approx(abs(offset), abs=1e-6)


def test_not_a_synchformer_state_dict_is_refused(tmp_path):
    torch.save({"vproj.weight": torch.zeros(4, 4)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a Synchformer"):
        DesyncScorer.load(tmp_path / "bad.pth")
