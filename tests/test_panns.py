"""PANNs CNN14 16 kHz: the released checkpoint's names and shapes, its front end, loading safely."""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from metrics.checkpoint import load_state
from metrics.panns import CLASSES, Cnn14, PannsScorer

TINY = (4, 4, 8, 8, 8, 16)


def released_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of ``Cnn14_16k_mAP=0.438.pth``'s ``model`` (audioset_tagging_cnn's Cnn14,
    torchlibrosa front end with n_fft 512, 64 mel bins)."""
    shapes = {"spectrogram_extractor.stft.conv_real.weight": (257, 1, 512),
              "spectrogram_extractor.stft.conv_imag.weight": (257, 1, 512),
              "logmel_extractor.melW": (257, 64)}

    def bn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn0", 64)
    c_in = 1
    for i, c in enumerate((64, 128, 256, 512, 1024, 2048), start=1):
        shapes[f"conv_block{i}.conv1.weight"] = (c, c_in, 3, 3)
        shapes[f"conv_block{i}.conv2.weight"] = (c, c, 3, 3)
        bn(f"conv_block{i}.bn1", c)
        bn(f"conv_block{i}.bn2", c)
        c_in = c
    shapes.update({"fc1.weight": (2048, 2048), "fc1.bias": (2048,), "fc_audioset.weight": (527, 2048),
                   "fc_audioset.bias": (527,)})
    return shapes


def test_full_size_model_has_the_released_key_names_and_shapes():
    with torch.device("meta"):
        model = Cnn14()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == released_shapes()


def test_front_end_is_librosa_power_mel_in_db():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    model = Cnn14(TINY).eval()
    with torch.no_grad():
        got = model.log_mel(torch.from_numpy(audio)[None])[0, 0].numpy()
    power = np.abs(librosa.stft(audio.astype(np.float64), n_fft=512, hop_length=160, window="hann",
                                center=True, pad_mode="reflect")) ** 2
    mel = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=50, fmax=8000) @ power
    expected = 10 * np.log10(np.maximum(mel, 1e-10)).T
    assert got.shape == expected.shape == (101, 64)
    np.testing.assert_allclose(got, expected, atol=2e-3)


def _random_release(path, widths=TINY, seed=0, sampler=True) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like the release ({"iteration", "model", "sampler"}) with random values."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in Cnn14(widths).state_dict().items()}
    for k in state:
        if k.endswith(("running_var", "bn0.weight", "bn1.weight", "bn2.weight")):
            state[k] = state[k].abs() + 1.0
        if k == "bn0.running_mean":  # log-mels of random front-end weights sit near 0 dB, real ones far below
            state[k] = state[k] - 20.0
    ckpt = {"iteration": 100, "model": state}
    if sampler:  # audioset_tagging_cnn saved its sampler's numpy state beside the model
        ckpt["sampler"] = {"indexes": np.arange(10), "random_state": np.random.RandomState(0).get_state()}
    torch.save(ckpt, path)
    return state


def test_released_layout_loads_strictly_and_runs(tmp_path):
    state = _random_release(tmp_path / "Cnn14_16k.pth")
    assert set(load_state(tmp_path / "Cnn14_16k.pth")) == set(state)
    scorer = PannsScorer.load(tmp_path / "Cnn14_16k.pth")
    for name, value in scorer.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    audio = np.random.default_rng(1).standard_normal(16000 * 2).astype(np.float32) * 0.1
    emb, logits = scorer.embed(audio)
    assert emb.shape == (TINY[-1],) and logits.shape == (CLASSES,) and emb.dtype == np.float64
    assert np.all(emb >= 0) and np.isfinite(logits).all()
    # one clip per pass: the same clip gives the same numbers whatever ran before
    scorer.embed(audio[::-1].copy())
    np.testing.assert_array_equal(scorer.embed(audio)[1], logits)


def test_wrong_checkpoints_are_refused(tmp_path):
    state = _random_release(tmp_path / "ok.pth", sampler=False)
    del state["fc1.bias"]
    torch.save({"model": state}, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match="not a PANNs CNN14"):
        PannsScorer.load(tmp_path / "incomplete.pth")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a PANNs CNN14"):
        PannsScorer.load(tmp_path / "other.pth")


def test_checkpoint_with_code_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pth")
    import pickle

    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path / "evil.pth")


def test_too_short_audio_is_a_clear_error(tmp_path):
    _random_release(tmp_path / "c.pth", sampler=False)
    with pytest.raises(ValueError, match="too short"):
        PannsScorer.load(tmp_path / "c.pth").embed(np.zeros(100, np.float32))
