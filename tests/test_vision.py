"""The vision encoders of the study (shards/vision.py), optical-flow images (core/flow.py), the
multi-encoder shard set ``pipeline.encode --vision-encoders ... --with-flow`` writes, and training on
each encoder's tokens and on video+flow (a 2-rank torchrun run).

Every model is a tiny random instance built from a config and saved with ``save_pretrained`` in the
release's model class, so the released key names load through the same code path real weights take.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures_encoders import (REAL_CLIP, TINY_CLIP_DIM, ledger_row, tiny_clip_dir,  # noqa: E402,F401
                                     tiny_vae_dir, write_ledger)

ENCODERS = ("clip", "siglip2", "vivit", "vjepa2")
RELEASE_CLASS = {"siglip2": "SiglipModel", "vivit": "VivitForVideoClassification", "vjepa2": "VJEPA2Model"}


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory, tiny_clip_dir) -> dict[str, Path]:
    from shards import random_models

    root = tmp_path_factory.mktemp("vision")
    return {"clip": tiny_clip_dir,
            "siglip2": random_models.build_random_siglip2(root / "siglip2"),
            "siglip2_naflex": random_models.build_random_siglip2_naflex(root / "siglip2_naflex"),
            "vivit": random_models.build_random_vivit(root / "vivit"),
            "vjepa2": random_models.build_random_vjepa2(root / "vjepa2")}


def _load(name: str, folder: Path, fps: float):
    from shards.vision import VISION_KINDS, Siglip2Vision

    kind = "siglip2" if name == "siglip2_naflex" else name
    loader = Siglip2Vision.load if name == "siglip2_naflex" else VISION_KINDS[kind].load
    return loader(str(folder), "cpu", fps=fps)


@pytest.mark.parametrize("name", ["clip", "siglip2", "siglip2_naflex", "vivit", "vjepa2"])
def test_each_encoder_encodes_a_real_clip(vision_dirs, name):
    from core.decode import DecodeRequest, decode
    from core.models import resolve_pretrained
    from shards.vision import PER_FRAME, SPATIO_TEMPORAL, describe

    fps = {"clip": 2.0, "vivit": 4.0, "vjepa2": 3.0}.get(name, 2.5)
    enc = _load(name, vision_dirs[name], fps)
    frames = decode(str(REAL_CLIP), DecodeRequest(start_s=1.0, duration_s=3.0, rgb_fps=fps, rgb_size=enc.image_size,
                                                  need_audio=False)).rgb
    assert frames.shape[1:] == (enc.image_size, enc.image_size, 3)
    alone, *_ = enc.encode_clips([frames])
    batch = enc.encode_clips([frames[:2], frames, frames[:1]])
    spatio = name in ("vivit", "vjepa2")
    assert enc.layout == (SPATIO_TEMPORAL if spatio else PER_FRAME)
    assert alone.shape == (enc.token_count(len(frames)), enc.dim) and alone.dtype == np.float32
    assert alone.shape[0] == (-(-len(frames) // 2) if spatio else len(frames))  # tubelets of 2 frames
    assert np.isfinite(alone).all() and alone.std() > 0
    np.testing.assert_array_equal(batch[1], alone)  # a clip's tokens do not depend on its batch
    assert [b.shape[0] for b in batch] == [enc.token_count(2), enc.token_count(len(frames)), enc.token_count(1)]
    if spatio:  # windows are encoded independently: later frames leave the first window's tokens alone
        assert enc.window == 4 and len(frames) > enc.window
        moved = frames.copy()
        moved[enc.window:] = 255 - moved[enc.window:]
        changed = enc.encode_clips([moved])[0]
        np.testing.assert_array_equal(changed[:2], alone[:2])
        assert not np.allclose(changed[2:], alone[2:])
    kind = "siglip2" if name == "siglip2_naflex" else name
    info = describe(kind, resolve_pretrained(str(vision_dirs[name])).config(), fps, 10.0)
    assert (info["image_size"], info["dim"], info["token_layout"]) == (enc.image_size, enc.dim, enc.layout)
    assert info["tokens"] == enc.token_count(info["frames"])


def test_the_registry_knows_every_encoder_and_the_names_agree():
    from core.registry import default_spec
    from shards.config import VISION_ENCODERS, EncoderConfig, parse_encoders
    from shards.vision import VISION_KINDS

    assert tuple(VISION_KINDS) == VISION_ENCODERS == ENCODERS
    enc = EncoderConfig()
    assert (enc.siglip2_model, enc.vivit_model, enc.vjepa2_model) == (
        "google/siglip2-base-patch16-512", "google/vivit-b-16x2-kinetics400", "facebook/vjepa2-vitl-fpc64-256")
    assert all(default_spec(VISION_KINDS[n].registry) == enc.model_of(n) for n in ENCODERS)
    assert parse_encoders(" vivit,clip,vivit ") == ("vivit", "clip")
    with pytest.raises(ValueError, match="imagebind"):
        EncoderConfig(vision_encoders="clip,imagebind")


def _hub_cache_entry(cache: Path, repo: str, folder: Path) -> None:
    """``folder`` laid out in a Hugging Face cache as the hub client writes a download of ``repo``."""
    import shutil

    base = cache / f"models--{repo.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    shutil.copytree(folder, base / "snapshots" / sha)


def test_release_key_names_load_by_the_registry_id_and_incomplete_ones_are_refused(vision_dirs, tmp_path,
                                                                                    monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import load_file, save_file

    from core.models import ModelUnavailable
    from core.registry import default_spec
    from shards.vision import VISION_KINDS

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name, cls in RELEASE_CLASS.items():
        assert json.loads((vision_dirs[name] / "config.json").read_text())["architectures"] == [cls]
        _hub_cache_entry(tmp_path / "hub", default_spec(name), vision_dirs[name])
        enc = VISION_KINDS[name].load(default_spec(name), "cpu", fps=4.0)
        assert enc.encode_clips([np.full((4, 40, 48, 3), 90, np.uint8)])[0].shape == (enc.token_count(4), enc.dim)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in vision_dirs["vivit"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "encoder.layer.1." not in k}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelUnavailable, match="refusing to encode with random layers"):
        VISION_KINDS["vivit"].load(str(broken), "cpu")


def test_flow_images_show_direction_as_hue_and_magnitude_as_value():
    import cv2

    from core.flow import flow_frames, flow_images, flow_step

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (48, 64)).astype(np.uint8), (5, 5), 1.5)
    still = np.repeat(texture[None, :, :, None], 3, axis=3)
    moved = np.roll(still, 2, axis=2)  # 2 px to the right
    img = flow_images(np.stack([still[0], still[0]]), np.stack([moved[0], still[0]]))
    hsv = cv2.cvtColor(img[0][8:-8, 8:-8], cv2.COLOR_RGB2HSV)
    assert np.median(hsv[..., 2]) > 200  # the moving frame is bright (it holds the clip's largest motion)
    hue = np.median(hsv[..., 0].astype(int))
    assert min(hue, 180 - hue) <= 8  # rightwards: hue 0 (red)
    assert img[1].mean() < 1 and img[1].max() < 30  # the still pair stays dark next to it
    # at the feature rate: pair k is dense frames (k*step, k*step + 1), the last pairs with the one before
    dense = np.stack([np.roll(still[0], s, axis=1) for s in (0, 2, 2, 2, 2, 5, 5)])
    assert flow_step(2.0, 25.0) == 12 and flow_step(12.5, 25.0) == 2 and flow_step(30.0, 25.0) == 1
    out = flow_frames(dense, 3, 1.0)
    assert len(out) == 3  # dense frames 0, 3, 6
    assert out[0].mean() > 50 and out[1].mean() < 1 and out[2].mean() < 1


@pytest.fixture(scope="module")
def study_shards(tmp_path_factory, vision_dirs, tiny_vae_dir) -> Path:
    """One shard set with all four encoders' tokens and their flow tokens, from ``pipeline.encode``."""
    from core.synth import write_event_clip
    from pipeline.encode import main as encode

    tmp = tmp_path_factory.mktemp("study")
    rows = [ledger_row(f"vggsound-st{i}-000000", write_event_clip(tmp / "video" / f"st{i}.mp4", seed=i,
                                                                   duration_s=2.0, event_times=(0.6, 1.4)).path,
                       duration_s=2.0, split="test" if i == 2 else "train") for i in range(3)]
    ledger = write_ledger(tmp / "clean", rows)
    out = tmp / "shards"
    args = ["--ledger", str(ledger), "--out", str(out), "--clip-model", str(vision_dirs["clip"]),
            "--vae", str(tiny_vae_dir), "--siglip2-model", str(vision_dirs["siglip2"]),
            "--vivit-model", str(vision_dirs["vivit"]), "--vjepa2-model", str(vision_dirs["vjepa2"]),
            "--vision-encoders", ",".join(ENCODERS), "--with-flow", "--vivit-fps", "4", "--vjepa2-fps", "3",
            "--siglip2-fps", "2.5", "--shard-size", "1", "--device", "cpu", "--workers", "1"]
    assert encode(args) == 0
    return out


def _samples(shards: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(shards / s["name"]) for s in json.loads((shards / "index.json").read_text())["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


@pytest.mark.slow
def test_one_shard_set_holds_four_encoders_and_their_flow(study_shards, vision_dirs):
    from core.models import file_sha256
    from shards.batch import collate, decode_sample

    card = json.loads((study_shards / "card.json").read_text())
    assert card["with_flow"] is True and card["flow"]["members"] == [f"flow-{n}.npy" for n in ENCODERS]
    assert card["members"] == sorted(["audio.flac", "json", "latent.npy", "text.npy",
                                      *(f"vision-{n}.npy" for n in ENCODERS), *(f"flow-{n}.npy" for n in ENCODERS)])
    fps = {"clip": 2.0, "siglip2": 2.5, "vivit": 4.0, "vjepa2": 3.0}
    for name in ENCODERS:
        v = card["vision_encoders"][name]
        assert v["model"] == str(vision_dirs[name]) and v["fps"] == fps[name]
        assert v["weights_sha256"] == {"model.safetensors": file_sha256(vision_dirs[name] / "model.safetensors")}
        assert v["token_layout"] == ("spatio-temporal" if name in ("vivit", "vjepa2") else "per-frame")
        assert v["dim"] == (TINY_CLIP_DIM if name == "clip" else 32) and v["image_size"] == 32
        assert v["frames"] == round(10 * fps[name]) and v["random_weights"] is True
    samples = _samples(study_shards)
    assert len(samples) == 3
    for s in samples:
        meta = json.loads(s["json"])
        for name in ENCODERS:
            v = card["vision_encoders"][name]
            tokens = np.load(io.BytesIO(s[f"vision-{name}.npy"]))
            flow = np.load(io.BytesIO(s[f"flow-{name}.npy"]))
            frames = round(2 * fps[name])  # 2 s clips
            assert tokens.shape == (-(-frames // 2) if v["token_layout"] == "spatio-temporal" else frames, v["dim"])
            assert flow.shape == tokens.shape and tokens.dtype == flow.dtype == np.float16
            assert not np.array_equal(flow, tokens)
            assert meta["tokens"][f"vision-{name}.npy"] == tokens.shape[0]
    # the reader hands the chosen encoder's tokens (and its flow) to training
    raw = {"__key__": samples[0]["__key__"], **{k: v for k, v in samples[0].items() if not k.startswith("__")}}
    for name in ENCODERS:
        out = decode_sample(raw, need_text=True, vision=name, need_flow=True)
        np.testing.assert_array_equal(out["clip"], np.load(io.BytesIO(raw[f"vision-{name}.npy"])))
        batch = collate([out, out])
        assert batch["flow"].shape == (2, *out["flow"].shape) and batch["flow_mask"].all()


def test_old_clip_npy_shards_read_as_vision_clip_and_missing_members_are_named():
    from shards.batch import decode_sample
    from shards.npy import SampleError
    from shards_fixture import make_sample

    old = make_sample("k0", 0, np.random.default_rng(0))
    assert "clip.npy" in old and "vision-clip.npy" not in old
    out = decode_sample(old, need_text=True)
    assert out["clip"].shape == (20, 768) and "flow" not in out
    with pytest.raises(SampleError, match="missing vision-siglip2.npy"):
        decode_sample(old, vision="siglip2")
    with pytest.raises(SampleError, match="missing flow-clip.npy"):
        decode_sample(old, need_flow=True)


def test_flow_tokens_join_the_video_tokens_in_the_context():
    import torch

    from train.config import ModelConfig
    from train.model import ConditionEncoder

    torch.manual_seed(0)
    cfg = ModelConfig(condition="video+flow+text+pe", clip_dim=8, text_dim=6, vision_encoder="siglip2",
                      text_repeat=1, max_frames=16)
    enc = ConditionEncoder(cfg, 12)
    clip, flow, text = torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 6)
    clip_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    flow_mask = torch.tensor([[True] * 4, [True] * 2 + [False] * 2])
    ctx, mask = enc(clip, clip_mask, text, None, flow, flow_mask)
    assert ctx.shape == (2, 1 + 5 + 4, 12) and enc.context_length(5, 4) == 10
    assert mask.tolist()[1] == [True] + [True] * 3 + [False] * 2 + [True] * 2 + [False] * 2
    # flow token j carries frame j's position, and the flow tokens go through the video projection
    expected = enc.proj(flow + enc.pe[:4])
    torch.testing.assert_close(ctx[:, 6:], expected)
    torch.testing.assert_close(ctx[:, 0], enc.text_proj(text))  # SigLIP tokens: text has its own projection
    with pytest.raises(ValueError, match="flow-siglip2.npy"):
        enc(clip, clip_mask, text)
    clip_cfg = ModelConfig(condition="video+text", clip_dim=8, text_dim=8)
    assert not hasattr(ConditionEncoder(clip_cfg, 12), "text_proj")  # CLIP: VTA-LDM's shared projection


def _train_in_process(shards: Path, run: Path, **model) -> dict:
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig, TrainConfig
    from train.trainer import train

    tcfg = TrainConfig(shards=str(shards), out=str(run), batch_size=2, max_steps=2, ckpt_every=2, val_every=2,
                       val_samples=1, workers=0, log_every=1, warmup_steps=1)
    return train(tcfg, ModelConfig(unet_config=TINY_UNET_CONFIG, **model), NoiseConfig())


@pytest.mark.slow
def test_training_takes_width_and_token_count_from_the_card(study_shards, vision_dirs, tiny_vae_dir, tmp_path):
    card = json.loads((study_shards / "card.json").read_text())
    summary = _train_in_process(study_shards, tmp_path / "vivit", vision_encoder="vivit",
                                condition="video+flow+text+pe", max_frames=4)
    assert summary["steps"] == 2
    config = json.loads((tmp_path / "vivit" / "run_config.json").read_text())["model"]
    assert (config["clip_dim"], config["text_dim"]) == (32, card["text_dim"])
    assert config["max_frames"] == card["vision_encoders"]["vivit"]["tokens"]  # raised from 4 to the card's
    sidecar = _sample(tmp_path / "vivit", {**vision_dirs, "vae": tiny_vae_dir}, tmp_path / "vivit.wav", "--caption",
                      "a dog barking")
    assert sidecar["vision_encoder"] == "vivit" and sidecar["clip_frames"] == 20  # 10 s at 4 fps, tubelets of 2
    assert sidecar["flow_tokens"] == 20 and "vivit" in sidecar["random_weights"]
    with pytest.raises(ValueError, match="no vjepa2 vision tokens|--with-flow"):
        _train_in_process(_without(study_shards, tmp_path / "noflow"), tmp_path / "x", vision_encoder="clip",
                          condition="video+flow")


@pytest.mark.slow
def test_vjepa2_trains_and_samples_from_the_same_shard_set(study_shards, vision_dirs, tiny_vae_dir, tmp_path):
    card = json.loads((study_shards / "card.json").read_text())
    summary = _train_in_process(study_shards, tmp_path / "vjepa2", vision_encoder="vjepa2", condition="video")
    assert summary["steps"] == 2
    config = json.loads((tmp_path / "vjepa2" / "run_config.json").read_text())["model"]
    assert config["clip_dim"] == card["vision_encoders"]["vjepa2"]["dim"]
    sidecar = _sample(tmp_path / "vjepa2", {**vision_dirs, "vae": tiny_vae_dir}, tmp_path / "vjepa2.wav")
    assert sidecar["vision_encoder"] == "vjepa2" and sidecar["flow_tokens"] == 0
    assert sidecar["clip_frames"] == card["vision_encoders"]["vjepa2"]["tokens"]


def _sample(run: Path, dirs: dict, out: Path, *extra: str) -> dict:
    """One soundtrack of the real test clip from ``run``, its encoders given as the folders that made the shards."""
    import soundfile as sf

    from train.sample import main

    name = json.loads((run / "run_config.json").read_text())["model"]["vision_encoder"]
    rc = main(["--ckpt", str(run), "--video", str(REAL_CLIP), "--clip-model", str(dirs["clip"]),
               "--vae", str(dirs["vae"]), "--vision-model", str(dirs[name]), "--vocoder", str(out.parent / "none"),
               "--allow-random-weights", "--out", str(out), "--steps", "2", "--guidance", "2", *extra])
    assert rc == 0
    assert sf.info(str(out)).frames == 163840
    return json.loads(out.with_suffix(".json").read_text())


def _without(shards: Path, out: Path) -> Path:
    """A copy of the shard set whose card says it was encoded without flow."""
    import shutil

    shutil.copytree(shards, out)
    card = json.loads((out / "card.json").read_text())
    (out / "card.json").write_text(json.dumps({**card, "with_flow": False}))
    return out


@pytest.mark.slow
def test_two_rank_torchrun_trains_siglip2_with_flow_and_samples(study_shards, vision_dirs, tiny_vae_dir, tmp_path):
    from test_train import _rows, _torchrun
    from train.config import TINY_UNET_CONFIG

    run = tmp_path / "run"
    _torchrun(["-m", "train", "--shards", str(study_shards), "--out", str(run), "--unet-config", TINY_UNET_CONFIG,
               "--batch-size", "1", "--max-steps", "2", "--ckpt-every", "2", "--log-every", "1",
               "--warmup-steps", "1", "--val-every", "0", "--workers", "0", "--mix-shards", "1",
               "--vision-encoder", "siglip2", "--condition", "video+flow", "--backend", "gloo"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    rows = _rows(run)
    assert all(np.isfinite(rows[s]["loss"]) for s in (1, 2))
    config = json.loads((run / "run_config.json").read_text())
    assert config["model"]["vision_encoder"] == "siglip2" and config["model"]["clip_dim"] == 32
    sidecar = _sample(run, {**vision_dirs, "vae": tiny_vae_dir}, tmp_path / "siglip2.wav")
    assert (sidecar["clip_frames"], sidecar["flow_tokens"]) == (25, 25)  # 10 s at 2.5 fps
    assert sidecar["models"]["vision"] == str(vision_dirs["siglip2"])


def test_allow_random_weights_builds_a_tiny_random_model_for_every_encoder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from core.models import ModelUnavailable
    from pipeline.encode_models import resolve_models
    from shards.config import EncoderConfig

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    enc = EncoderConfig(vision_encoders="siglip2,vivit,vjepa2", siglip2_model="nobody-v2a/no-siglip2")
    with pytest.raises(ModelUnavailable, match="no-siglip2|not in the Hugging Face cache"):
        resolve_models(enc, tmp_path / "work")
    models = resolve_models(EncoderConfig(**{**enc.__dict__, "allow_random_weights": True}), tmp_path / "work")
    assert models.random and "not in the Hugging Face cache" in models.random_reason
    assert sorted(models.vision) == ["siglip2", "vivit", "vjepa2"]
    for name in models.vision:
        info = models.describe(name)
        assert info["random_weights"] is True and info["model"] == str(tmp_path / "work" / "random-models" / name)
        assert info["dim"] == 32 and info["image_size"] == 32
    assert models.image_sizes() == {"siglip2": 32, "vivit": 32, "vjepa2": 32}
