"""CAVP score: Diff-Foley's encoders with the release's names and shapes, its spectrogram and its score."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from core.decode import decode
from core.models import file_sha256
from metrics.cavp import (CLIP_FRAMES, Cavp, CavpScorer, CavpSize, cavp_request, size_of, spectrogram, squash)
from train.evaluate import main, read_audio

VIDEOS = sorted((Path(__file__).parent / "data" / "vggsound" / "video").glob("*.mp4"))
TINY = CavpSize(base=8, blocks=(1, 2, 1, 1), audio_width=4, embed_dim=16)


def _conv_module(name: str, cin: int, cout: int, kernel: tuple[int, int, int]) -> dict:
    """mmcv ConvModule(bias=False, norm_cfg=BN3d): ``conv`` then ``bn``."""
    bn = {f"{name}.bn.{p}": (cout,) for p in ("weight", "bias", "running_mean", "running_var")}
    return {f"{name}.conv.weight": (cout, cin, *kernel), **bn, f"{name}.bn.num_batches_tracked": ()}


def release_keys() -> dict[str, tuple]:
    """Diff-Foley's CAVP_Inference state dict, derived from its source (cavp_model.py, cavp_modules.py):
    ResNet3dSlowOnly(depth=50): conv1_kernel (1, 7, 7), inflate (0, 0, 1, 1), inflate_style 3x1x1,
    Bottleneck3d expansion 4, downsample on each stage's first block; Cnn14(embed_dim=512)."""
    keys = _conv_module("video_encoder.conv1", 3, 64, (1, 7, 7))
    inplanes = 64
    for i, (blocks, inflate) in enumerate(zip((3, 4, 6, 3), (0, 0, 1, 1))):
        planes = 64 * 2 ** i
        for j in range(blocks):
            p = f"video_encoder.layer{i + 1}.{j}"
            cin = inplanes if j == 0 else planes * 4
            keys |= _conv_module(f"{p}.conv1", cin, planes, (3, 1, 1) if inflate else (1, 1, 1))
            keys |= _conv_module(f"{p}.conv2", planes, planes, (1, 3, 3))
            keys |= _conv_module(f"{p}.conv3", planes, planes * 4, (1, 1, 1))
            if j == 0:
                keys |= _conv_module(f"{p}.downsample", cin, planes * 4, (1, 1, 1))
        inplanes = planes * 4
    keys |= {"video_project_head.weight": (512, 2048), "video_project_head.bias": (512,), "logit_scale": ()}
    keys |= {f"spec_encoder.bn.{p}": (128,) for p in ("weight", "bias", "running_mean", "running_var")}
    keys["spec_encoder.bn.num_batches_tracked"] = ()
    for k, (cin, cout) in enumerate(zip((1, 64, 128, 256, 512, 1024), (64, 128, 256, 512, 1024, 2048))):
        b = f"spec_encoder.conv_block{k + 1}"
        keys |= {f"{b}.conv1.weight": (cout, cin, 3, 3), f"{b}.conv2.weight": (cout, cout, 3, 3)}
        for bn in ("bn1", "bn2"):
            keys |= {f"{b}.{bn}.{p}": (cout,) for p in ("weight", "bias", "running_mean", "running_var")}
            keys[f"{b}.{bn}.num_batches_tracked"] = ()
    keys |= {"spec_encoder.fc1.weight": (2048, 2048), "spec_encoder.fc1.bias": (2048,),
             "spec_encoder.final_project.weight": (512, 2048), "spec_encoder.final_project.bias": (512,)}
    return keys


def _tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint in the release's layout (open_clip's ``{"epoch", "state_dict"}``, DDP ``module.`` names)."""
    g = torch.Generator().manual_seed(seed)
    state = {f"module.{k}": (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in Cavp(TINY).state_dict().items()}
    state["module.training_only_head.weight"] = torch.zeros(2)  # unexpected keys are ignored, as the reference does
    torch.save({"epoch": 66, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = _tiny_checkpoint(tmp_path_factory.mktemp("cavp") / "cavp_epoch66.ckpt")
    scorer = CavpScorer.load(path)
    scorer.image_size = 32
    return path, scorer


def test_full_size_model_has_the_release_key_names_and_shapes():
    expected = release_keys()
    with torch.device("meta"):
        model = Cavp()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 402
    assert size_of({k: torch.empty(v, device="meta") for k, v in expected.items()}) == CavpSize()


def test_checkpoint_loads_stripped_of_module_and_refuses_missing_weights(tiny, tmp_path):
    path, scorer = tiny
    assert scorer.model.size == TINY
    saved = torch.load(path, weights_only=True)["state_dict"]
    for k, v in scorer.model.state_dict().items():
        assert torch.equal(v, saved[f"module.{k}"])
    state = dict(saved)
    del state["module.spec_encoder.fc1.weight"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="1 weights missing: spec_encoder.fc1.weight"):
        CavpScorer.load(tmp_path / "broken.ckpt")


def test_spectrogram_is_diff_foleys_magnitude_mel_in_db_scaled_to_0_1():
    rng = np.random.default_rng(0)
    audio = (0.2 * rng.standard_normal(16000 * 3)).astype(np.float32)
    got = spectrogram(audio, 3)
    assert got.shape == (128, 1 + (48000 - 1) // 256)  # 16000 T - 1 samples, hop 256, centred
    mel = librosa.feature.melspectrogram(y=audio[:47999].astype(np.float64), sr=16000, n_fft=1024, hop_length=256,
                                         n_mels=128, fmin=125, fmax=7600, power=1.0, pad_mode="constant")
    expected = np.clip((20 * np.log10(np.maximum(mel, 1e-5)) - 20 + 100) / 100, 0, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.all(spectrogram(np.zeros(100, np.float32), 2) == 0.0)  # silence: -120 dB, clipped to 0
    short = spectrogram(audio[:16000], 3)  # zero padded to 3 s
    assert short.shape == got.shape and np.all(short[:, 80:] == 0.0)


def test_audio_encoder_applies_fc1_twice_and_pools_time_by_16():
    model = Cavp(TINY).eval()
    calls = []
    model.spec_encoder.fc1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model.audio_embeddings(torch.rand(1, 128, 160))
    assert len(calls) == 2 and out.shape == (1, 10, 16)
    np.testing.assert_allclose(out.norm(dim=-1).numpy(), 1.0, rtol=1e-5)


def test_score_is_the_mean_cosine_of_paired_steps(tiny):
    _, scorer = tiny
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (45, 24, 40, 3), dtype=np.uint8)  # 11.25 s at 4 fps
    audio = (0.1 * rng.standard_normal(16000 * 11 + 500)).astype(np.float32)
    result = scorer.score(frames, audio)
    assert result.seconds == 11
    x = squash(frames[:44], 32)
    assert x.shape == (44, 3, 32, 32) and float(x.max()) <= 1.0
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    with torch.no_grad():  # the reference: 40 frames per forward, then the spectrogram of 16000 * 11 - 1 samples
        video = torch.cat([scorer.model.video_embeddings(x[i:i + CLIP_FRAMES][None])[0] for i in (0, CLIP_FRAMES)])
        sound = scorer.model.audio_embeddings(torch.from_numpy(spectrogram(audio, 11))[None])[0]
    assert video.shape[0] == 44 and sound.shape[0] == (1 + (176000 - 1) // 256) // 16 == 43
    assert result.steps == 43
    assert result.score == pytest.approx(float(cos(video[:43], sound[:43]).mean()), abs=1e-6)
    assert -1.0 <= result.score <= 1.0


def test_under_one_second_is_refused(tiny):
    _, scorer = tiny
    with pytest.raises(ValueError, match="needs 1 s"):
        scorer.score(np.zeros((3, 8, 8, 3), np.uint8), np.zeros(16000 * 2, np.float32))


def test_evaluate_reports_cavp_per_clip_and_set(tiny, tmp_path, capsys):
    """Two 2 s outputs on real videos (one 2 s in) and one of 0.5 s (empty, with the reason)."""
    weights, _ = tiny
    gen = tmp_path / "generated"
    gen.mkdir()
    rng = np.random.default_rng(2)
    for name, seconds, video, start in (("a", 2.0, VIDEOS[0], 0.0), ("b", 2.0, VIDEOS[3], 2.0), ("c", 0.5, VIDEOS[1], 0.0)):
        sf.write(gen / f"{name}.wav", (0.1 * rng.standard_normal(int(22050 * seconds))).astype(np.float32), 22050)
        (gen / f"{name}.json").write_text(json.dumps({"video": str(video), "start_s": start, "caption": "x"}))
    rc = main(["--generated", str(gen), "--out", str(tmp_path / "eval"), "--cavp", "--cavp-weights", str(weights),
               "--no-panns", "--no-vggish", "--no-passt", "--no-desync", "--no-pam", "--no-av-align", "--clap-model", "none"])
    assert rc == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "eval" / "eval.csv"))}
    scorer = CavpScorer.load(weights)  # the release's 224 px
    for name, start in (("a", 0.0), ("b", 2.0)):
        frames = decode(json.loads((gen / f"{name}.json").read_text())["video"], cavp_request(start, 2.0)).rgb
        assert len(frames) == 8  # 2 s at 4 fps
        expected = scorer.score(frames, read_audio(gen / f"{name}.wav", 16000))
        assert float(rows[name]["cavp"]) == pytest.approx(expected.score, abs=1e-6)
    assert rows["a"]["cavp"] != rows["b"]["cavp"]
    assert rows["c"]["cavp"] == "" and "cavp: needs 1 s of sound" in rows["c"]["reason"]
    m = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]["cavp"]
    assert m["n"] == 2 and m["value"] == pytest.approx((float(rows["a"]["cavp"]) + float(rows["b"]["cavp"])) / 2)
    assert m["weights_sha256"] == file_sha256(weights) and m["settings"]["fps"] == 4.0
    assert "cavp" in capsys.readouterr().out


def test_missing_weights_stop_the_run_or_give_a_flagged_random_model(tmp_path):
    from core.models import ModelUnavailable
    from filters.clap import ClapConfig
    from train.config import EvalConfig
    from train.eval_models import RANDOM_CAVP, load_models

    cfg = dict(generated=str(tmp_path), panns=False, vggish=False, passt=False, desync=False, cavp=True,
               models_dir=str(tmp_path / "none"))
    with pytest.raises(ModelUnavailable, match="cavp"):
        load_models(EvalConfig(**cfg), ClapConfig(model="none"))
    models = load_models(EvalConfig(**cfg, allow_random_weights=True), ClapConfig(model="none"))
    assert models.random == ["CAVP"] and models.sha256["cavp"] is None and models.cavp.model.size == RANDOM_CAVP
