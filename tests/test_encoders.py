"""CLIP image/text and AudioLDM-VAE encoders: shapes, preprocessing, orientation, loading failures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures_encoders import TINY_CLIP_DIM, tiny_clip_dir, tiny_vae_dir  # noqa: E402,F401

from core.models import ModelUnavailable, resolve_pretrained  # noqa: E402
from shards.encoders import AudioVAE, ClipImageEncoder, ClipTextEncoder, posterior_member, resize_crop  # noqa: E402
from shards.mel import log_mel  # noqa: E402


def _frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with a moving bright block: natural-ish frames, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        base = np.stack([(xx * 255 / w + 30 * i) % 256, yy * 255 / h, (xx + yy + 17 * i) % 256], -1)
        out[i] = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        y0, x0 = (i * 13) % max(1, h - h // 4), (i * 29) % max(1, w - w // 4)
        out[i, y0:y0 + h // 4, x0:x0 + w // 4] = 255
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(3, 360, 480), (2, 720, 1280), (2, 300, 200), (2, 20, 30)])
def test_clip_pixels_match_clip_image_processor(tiny_clip_dir, shape, normalize):
    """Short side to the model's size (bicubic, antialiased like PIL), centre crop, [0,1], mean/std."""
    import torch

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    enc = ClipImageEncoder.load(str(tiny_clip_dir), "cpu", normalize=normalize)
    proc = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir, do_normalize=normalize)
    frames = _frames(*shape)
    ref = proc(images=list(frames), return_tensors="pt")["pixel_values"]
    ours = enc.pixel_values(frames)
    assert ours.shape == ref.shape == (shape[0], 3, 32, 32)
    one_grey_level = (1 / 255) / (0.2613 if normalize else 1.0)
    assert (ours - ref).abs().max().item() <= one_grey_level + 1e-6
    assert (ours - ref).abs().mean().item() < 0.05 * one_grey_level
    with torch.no_grad():
        expected = enc.model(pixel_values=ref).image_embeds.numpy()
    np.testing.assert_allclose(enc.encode_frames(frames), expected, atol=5e-3, rtol=0)


def test_clip_image_embeddings_shape_batching_and_normalize_switch(tiny_clip_dir):
    enc = ClipImageEncoder.load(str(tiny_clip_dir), "cpu", normalize=True, batch_frames=3)
    a, b = _frames(5, 120, 160, 1), _frames(2, 90, 90, 2)
    out = enc.encode_clips([a, np.zeros((0, 10, 10, 3), np.uint8), b])
    assert [o.shape for o in out] == [(5, TINY_CLIP_DIM), (0, TINY_CLIP_DIM), (2, TINY_CLIP_DIM)]
    assert all(o.dtype == np.float32 for o in out)
    np.testing.assert_allclose(out[0], enc.encode_frames(a), atol=1e-5)
    np.testing.assert_allclose(out[2], enc.encode_frames(b), atol=1e-5)
    raw = ClipImageEncoder.load(str(tiny_clip_dir), "cpu", normalize=False).encode_frames(a)
    assert np.abs(raw - out[0]).max() > 1e-3  # the compatibility switch really changes the input
    with pytest.raises(ValueError, match="uint8"):
        resize_crop(a.astype(np.float32), 32)


def test_clip_text_embeddings_independent_of_batch_padding(tiny_clip_dir):
    enc = ClipTextEncoder.load(str(tiny_clip_dir), "cpu")
    captions = ["a dog barks", "the sound of playing acoustic guitar then rain on a tin roof", "x"]
    batch = enc.encode(captions)
    assert batch.shape == (3, TINY_CLIP_DIM) and batch.dtype == np.float32
    for i, c in enumerate(captions):
        np.testing.assert_allclose(enc.encode([c])[0], batch[i], atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-4


def test_vae_posterior_shapes_orientation_and_decode(tiny_vae_dir):
    import torch

    vae = AudioVAE.load(str(tiny_vae_dir), "cpu", batch_size=1)
    rng = np.random.default_rng(0)
    mels = np.stack([log_mel(rng.standard_normal(16000 * 4).astype(np.float32)) for _ in range(2)])
    mean, std = vae.encode_posterior(mels)
    assert mean.shape == std.shape == (2, 8, 256, 16)
    assert (std > 0).all()
    with torch.no_grad():  # AudioLDM's layout: a 1-channel image of [time, mel bands]
        direct = vae.model.encode(torch.from_numpy(mels[1].T.copy())[None, None]).latent_dist
    np.testing.assert_allclose(mean[1].numpy(), direct.mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(std[1].numpy(), direct.std[0].numpy(), rtol=1e-5)
    member = posterior_member(mean[0], std[0])
    assert member.shape == (2, 8, 256, 16) and member.dtype == np.float16
    assert vae.decode(mean).shape == (2, 64, 1024)
    assert (vae.scaling_factor, vae.latent_channels, vae.downsample) == (1.0, 8, 4)


def test_resolve_local_pipeline_folder_uses_vae_subfolder(tmp_path, tiny_vae_dir):
    import shutil

    pipe = tmp_path / "audioldm"
    shutil.copytree(tiny_vae_dir, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    assert resolve_pretrained(str(pipe), pipeline_subfolder="vae").path == (pipe / "vae").resolve()
    assert AudioVAE.load(str(pipe), "cpu").latent_channels == 8


def test_missing_and_offline_models_fail_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable, match="no such folder"):
        resolve_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ModelUnavailable, match="nobody-v2a/no-such-model"):
        ClipImageEncoder.load("nobody-v2a/no-such-model", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="not a model folder|no config.json"):
        resolve_pretrained(str(tmp_path / "empty"))


def test_incomplete_checkpoint_is_refused(tmp_path, tiny_clip_dir):
    """A checkpoint without the vision tower must not load with random layers."""
    import shutil

    broken = tmp_path / "clip_text_only"
    shutil.copytree(tiny_clip_dir, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("visual_projection")},
              broken / "model.safetensors")
    with pytest.raises(ModelUnavailable, match="refusing"):
        ClipImageEncoder.load(str(broken), "cpu")
    assert ClipTextEncoder.load(str(broken), "cpu").dim == TINY_CLIP_DIM
