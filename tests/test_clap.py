"""CLAP scorer: cosine scores, batching, deterministic window, template, loading failures, ``none``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from clap_fixture import build_tiny_clap  # noqa: E402

import filters.clap as clap_mod  # noqa: E402
from filters.clap import (  # noqa: E402
    ClapConfig,
    ClapModelUnavailable,
    ClapScorer,
    check_available,
    clap_window,
    run_metadata,
)
from core.decode import DecodeRequest, decode  # noqa: E402

CLIPS = Path(__file__).parent / "data" / "vggsound" / "video"
SR = 48000


@pytest.fixture(scope="module")
def tiny_clap(tiny_clap_dir) -> Path:
    return tiny_clap_dir  # the session's (conftest), shared with the clean and runner tests


@pytest.fixture(scope="module")
def tiny_clap_fused(tmp_path_factory) -> Path:
    return build_tiny_clap(tmp_path_factory.mktemp("tiny_clap_fused"), seed=1, fusion=True)


@pytest.fixture(scope="module")
def scorer(tiny_clap) -> ClapScorer:
    return ClapScorer(ClapConfig(model=str(tiny_clap), batch_size=2, device="cpu")).load()


@pytest.fixture(scope="module")
def real_audio() -> list[np.ndarray]:
    """48 kHz mono audio of two real VGGSound clips, decoded by the shared decode pass."""
    paths = sorted(CLIPS.glob("*.mp4"))[:2]
    req = DecodeRequest(start_s=0.0, duration_s=10.0, audio_rates=(SR,), need_video=False)
    return [decode(p, req).audio[SR] for p in paths]


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def test_scores_are_cosines_of_normalised_embeddings_not_logits(scorer, real_audio):
    import torch

    audios = real_audio + [_noise(3.0, 1)]
    labels = ["playing acoustic guitar", "playing drum kit", "rain"]
    emb = scorer.audio_embeddings(audios)
    assert emb.shape == (3, scorer.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    scores = scorer.score_labels(emb, labels)
    assert np.all((scores >= -1.0) & (scores <= 1.0))

    # independent computation through the model's own forward: logits / exp(logit_scale) is the cosine
    model, fe, tok = scorer.model, scorer.feature_extractor, scorer.tokenizer
    texts = [f"the sound of {label}" for label in labels]
    feats = fe(audios, sampling_rate=SR, return_tensors="pt")
    inputs = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    input_features=feats["input_features"], is_longer=torch.zeros(3, 1, dtype=torch.bool))
    logits = out.logits_per_audio.numpy()
    expected = np.diag(logits) / model.logit_scale_a.exp().item()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert model.logit_scale_a.exp().item() > 10  # the logits are a scaled cosine, not the score
    assert not np.allclose(scores, np.diag(logits))


@pytest.mark.slow
def test_batched_equals_one_by_one(tiny_clap, real_audio):
    audios = real_audio + [_noise(2.5, 2), _noise(12.0, 3), _noise(10.0, 4)]
    batched = ClapScorer(ClapConfig(model=str(tiny_clap), batch_size=4)).load(device="cpu")
    single = ClapScorer(ClapConfig(model=str(tiny_clap), batch_size=1)).load(device="cpu")
    np.testing.assert_allclose(batched.audio_embeddings(audios), single.audio_embeddings(audios), atol=1e-5)
    texts = ["the sound of a dog", "rain", "the sound of playing acoustic guitar in a small room"]
    one_by_one = np.concatenate([single.text_embeddings([t]) for t in texts])
    np.testing.assert_allclose(batched.text_embeddings(texts), one_by_one, atol=1e-5)


def test_fused_checkpoint_is_deterministic_in_any_batch(tiny_clap_fused, real_audio):
    """transformers' extractor marks a random clip of each batch "longer"; the scorer never does."""
    scorer = ClapScorer(ClapConfig(model=str(tiny_clap_fused), batch_size=3)).load(device="cpu")
    audios = real_audio + [_noise(4.0, 5)]
    batched = scorer.audio_embeddings(audios)
    one_by_one = np.concatenate([scorer.audio_embeddings([a]) for a in audios])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_window_is_deterministic_and_documented(scorer):
    long = _noise(15.0, 6)
    n = scorer.window_samples
    assert n == 10 * SR
    np.testing.assert_array_equal(clap_window(long, n, "start"), long[:n])
    np.testing.assert_array_equal(clap_window(long, n, "center"), long[int(2.5 * SR): int(2.5 * SR) + n])
    short = _noise(4.0, 7)
    np.testing.assert_array_equal(clap_window(short, n, "start"), short)

    np.random.seed(0)
    first = scorer.audio_embeddings([long])
    np.random.seed(123)
    again = scorer.audio_embeddings([long])
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, scorer.audio_embeddings([long[:n]]), atol=1e-6)
    assert not np.allclose(first, scorer.audio_embeddings([long[-n:]]), atol=1e-4)


def test_template_is_applied_and_recorded(tiny_clap):
    cfg = ClapConfig(model=str(tiny_clap), template="a recording of {label} outdoors")
    scorer = ClapScorer(cfg).load(device="cpu")
    assert scorer.caption("dog barking") == "a recording of dog barking outdoors"
    emb = scorer.audio_embeddings([_noise(3.0, 8)])
    via_label = scorer.score_labels(emb, ["dog barking"])
    direct = float(emb[0] @ scorer.text_embeddings(["a recording of dog barking outdoors"])[0])
    default_template = float(emb[0] @ scorer.text_embeddings(["the sound of dog barking"])[0])
    assert via_label[0] == pytest.approx(direct, abs=1e-6)
    assert abs(via_label[0] - default_template) > 1e-4
    meta = scorer.metadata()
    assert meta["clap_template"] == "a recording of {label} outdoors"
    assert meta["clap_model"] == str(tiny_clap) and meta["clap_skipped"] is False
    assert meta["clap_window"] == "start" and meta["clap_window_samples"] == 10 * SR
    json.dumps(meta)  # goes into run.json


@pytest.mark.parametrize("template", ["the sound of", "{label} and {other}", "{0} {label}"])
def test_bad_template_is_rejected(template):
    with pytest.raises(ValueError, match="template"):
        ClapConfig(template=template)


def test_text_embeddings_are_cached_per_worker(scorer, monkeypatch):
    scorer.text_embeddings(["the sound of a cat"])
    calls = []
    original = scorer.model.get_text_features
    monkeypatch.setattr(scorer.model, "get_text_features", lambda **kw: calls.append(1) or original(**kw))
    scorer.score_labels(scorer.audio_embeddings([_noise(2.0, 9)] * 3), ["a cat", "a cat", "a cat"])
    assert calls == []


def _message(config: ClapConfig) -> str:
    with pytest.raises(ClapModelUnavailable) as info:
        check_available(config)
    return str(info.value)


def _names_the_three_ways(message: str) -> None:
    assert "local folder" in message and "save_pretrained" in message
    assert "hf download" in message and "HF_HOME" in message and "HF_HUB_OFFLINE" in message
    assert "--clap-model none" in message


def test_missing_folder_names_model_and_how_to_provide_it(tmp_path):
    missing = tmp_path / "no_such_clap"
    message = _message(ClapConfig(model=str(missing)))
    assert str(missing) in message and "no such folder" in message
    _names_the_three_ways(message)


def test_folder_without_checkpoint_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    message = _message(ClapConfig(model=str(tmp_path)))
    assert str(tmp_path) in message and "does not hold a complete checkpoint" in message
    _names_the_three_ways(message)


def test_hub_id_not_cached_and_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    message = _message(ClapConfig(model="v2a-tests/no-such-clap-checkpoint"))
    assert "'v2a-tests/no-such-clap-checkpoint'" in message and "not in the Hugging Face cache" in message
    assert "http://127.0.0.1:9 cannot be reached" in message
    assert "hf download v2a-tests/no-such-clap-checkpoint" in message
    _names_the_three_ways(message)


def test_checkpoint_missing_weights_is_refused_not_randomly_initialised(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = build_tiny_clap(tmp_path / "clap")
    weights = load_file(folder / "model.safetensors")
    dropped = [k for k in weights if k.startswith("audio_projection.")]
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    message = _message(ClapConfig(model=str(folder)))
    assert f"no weights for {len(dropped)} parameters" in message


def test_none_skips_without_loading(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("--clap-model none must not load anything")

    monkeypatch.setattr(clap_mod, "_from_pretrained", never)
    cfg = ClapConfig(model="none")
    assert not cfg.enabled
    assert check_available(cfg) is None
    meta = run_metadata(cfg)
    assert meta["clap_skipped"] is True and meta["clap_model"] == "none"
    assert "skipped" in meta["clap_score"] and "missing" in meta["clap_score"]
    with pytest.raises(ValueError, match="none"):
        ClapScorer(cfg)


def test_unloaded_scorer_refuses_to_score(tiny_clap):
    with pytest.raises(RuntimeError, match="load"):
        ClapScorer(ClapConfig(model=str(tiny_clap))).audio_embeddings([_noise(1.0, 0)])


def test_wrong_sample_rate_is_refused(scorer):
    with pytest.raises(ValueError, match="48000"):
        scorer.audio_embeddings([_noise(1.0, 0)], sample_rate=16000)


def test_cli_flags_come_from_the_config():
    from core.cli_config import add_config_args, from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, ClapConfig, prefix="clap_")
    ns = parser.parse_args(["--clap-model", "none", "--clap-template", "audio of {label}", "--clap-window", "center"])
    cfg = from_args(ClapConfig, ns, prefix="clap_")
    assert (cfg.model, cfg.template, cfg.window, cfg.batch_size) == ("none", "audio of {label}", "center", 16)
    assert from_args(ClapConfig, parser.parse_args([]), prefix="clap_").model == "laion/clap-htsat-unfused"


def test_unusable_audio_gets_a_missing_embedding_not_a_number(scorer, real_audio):
    bad = real_audio[0].copy()
    bad[1000] = np.nan
    audios = [real_audio[1], bad, np.zeros(0, np.float32), np.zeros(5 * SR, np.float32)]
    assert [clap_mod.audio_problem(a) for a in audios] == ["", "non-finite audio samples", "empty audio", ""]
    emb = scorer.audio_embeddings(audios)
    assert np.isnan(emb[1]).all() and np.isnan(emb[2]).all()
    np.testing.assert_allclose(emb[0], scorer.audio_embeddings([real_audio[1]])[0], atol=1e-5)
    assert np.isfinite(emb[3]).all()  # digital silence is a valid input
    scores = scorer.score_labels(emb, ["a", "b", "c", "d"])
    assert np.isnan(scores[1]) and np.isnan(scores[2]) and np.isfinite(scores[[0, 3]]).all()


# ---------------------------------------------------------------------------- LAION's input


def _laion_reference_features(audio: np.ndarray, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float,
                              quantize: bool = True) -> np.ndarray:
    """LAION-CLAP's documented preprocessing for an unfused checkpoint, written out independently:
    ``int16_to_float32(float32_to_int16(x))``, ``repeatpad`` to 10 s, then HTSAT's front end
    (torchlibrosa: centred reflect-padded Hann STFT power, librosa's Slaney mel, 10 log10 with
    amin 1e-10, ref 1, no top_db). Returns [frames, n_mels]."""
    import librosa

    x = np.asarray(audio, np.float32)
    if quantize:
        x = ((np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16) / 32767.0).astype(np.float32)
    n = 10 * SR
    x = np.tile(x, n // len(x)) if len(x) < n else x
    x = np.pad(x, (0, n - len(x))).astype(np.float64)
    power = np.abs(librosa.stft(x, n_fft=n_fft, hop_length=hop, win_length=n_fft, window="hann", center=True,
                                pad_mode="reflect")) ** 2
    mel = librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax) @ power
    return (10.0 * np.log10(np.maximum(mel, 1e-10))).T


@pytest.fixture(scope="module")
def laion_front_end_scorer(tiny_clap) -> ClapScorer:
    """The tiny model behind the real checkpoint's front end (64 mels, hop 480, n_fft 1024, 50-14000 Hz),
    whose saved config asks for the wrong modes: the scorer must pass LAION's own explicitly."""
    from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizer

    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=SR, hop_length=480, max_length_s=10,
                              fft_window_size=1024, frequency_min=50, frequency_max=14000,
                              truncation="fusion", padding="repeat")
    model = ClapModel.from_pretrained(tiny_clap)
    return ClapScorer.from_components(ClapConfig(model=str(tiny_clap)), model, fe,
                                      RobertaTokenizer.from_pretrained(tiny_clap))


@pytest.mark.slow
def test_input_features_are_laions_preprocessing_on_real_clips(laion_front_end_scorer, real_audio):
    scorer = laion_front_end_scorer
    assert (scorer.truncation, scorer.padding) == ("rand_trunc", "repeatpad")
    # a full 10 s window of each real clip, and 3.3 s of one (repeat-padded to 10 s)
    audios = [real_audio[0], real_audio[1], real_audio[1][: int(3.3 * SR)]]
    feats = scorer.input_features([clap_window(a, scorer.window_samples) for a in audios])
    assert feats.shape == (3, 1, 1001, 64)
    moved = 0.0
    for audio, got in zip(audios, feats[:, 0]):
        expected = _laion_reference_features(audio, 1024, 480, 64, 50, 14000)
        np.testing.assert_allclose(got, expected, atol=2e-3)
        unquantised = _laion_reference_features(audio, 1024, 480, 64, 50, 14000, quantize=False)
        moved = max(moved, float(np.abs(got - unquantised).max()))
    assert moved > 1.0  # the int16 round trip is visible in near-silent bins: a test that can fail


def test_laion_quantize_truncates_toward_zero_and_clips():
    x = np.array([0.0, 1.0, -1.0, 1.7, -3.0, 0.5, -0.5, 1 / 32767 * 0.99, -1 / 32767 * 1.5], np.float32)
    q = clap_mod.laion_quantize(x)
    assert q.dtype == np.float32
    expected = np.array([0, 32767, -32767, 32767, -32767, 16383, -16383, 0, -1]) / 32767.0
    np.testing.assert_array_equal(q, expected.astype(np.float32))


def test_fused_checkpoint_uses_fusion_and_repeatpad(tiny_clap_fused):
    scorer = ClapScorer(ClapConfig(model=str(tiny_clap_fused))).load(device="cpu")
    assert (scorer.truncation, scorer.padding) == ("fusion", "repeatpad")
    np.random.seed(7)
    feats = scorer.input_features([_noise(4.0, 11)])
    assert np.random.randint(1 << 30) == np.random.RandomState(7).randint(1 << 30)  # global RNG untouched
    assert feats.shape[1] == 4 and np.array_equal(feats[0, 0], feats[0, 3])  # four copies for <= 10 s
    meta = scorer.metadata()
    assert meta["clap_truncation"] == "fusion" and meta["clap_padding"] == "repeatpad"
    assert meta["clap_enable_fusion"] is True and "int16" in meta["clap_quantize"]


def test_check_available_returns_what_run_json_records(tiny_clap):
    meta = check_available(ClapConfig(model=str(tiny_clap)))
    assert meta["clap_truncation"] == "rand_trunc" and meta["clap_padding"] == "repeatpad"
    assert meta["clap_is_longer"] is False and "clap_device" not in meta
    json.dumps(meta)
