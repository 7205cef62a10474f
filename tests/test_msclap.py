"""MS-CLAP 2023 for PAM: the release's names and shapes, the HTSAT key mapping, a tiny random model scoring clips."""
from __future__ import annotations

import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from metrics.msclap import MsClap, MsClapSize, release_to_project, size_of
from metrics.pam import SAMPLE_RATE, TEXT_LEN, WINDOW, PamScorer, pam_probabilities, prompt_tokens

KEYS = Path(__file__).parent / "data" / "msclap_2023_keys.json"
TINY = MsClapSize(audio_dim=8, audio_depths=(2, 2, 1, 1), audio_heads=(1, 2, 2, 2), text_dim=16, text_layers=1,
                  text_heads=2, vocab=257, proj_dim=16)


def test_the_release_layout_maps_onto_the_full_size_model_exactly():
    # the list was generated from msclap 1.3.4's own module tree (tests/data/derive_msclap_keys.py)
    release = {k: torch.empty(v, device="meta") for k, v in json.loads(KEYS.read_text()).items()}
    assert len(release) == 357 and tuple(release["audio_encoder.base.htsat.layers.3.blocks.1.attn.qkv.weight"].shape) \
        == (2304, 768)
    with torch.device("meta"):
        model = MsClap()
    mapped = release_to_project(release)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert size_of(release) == MsClapSize()  # the release's size read back from its shapes


def test_qkv_is_split_into_query_key_value_in_order():
    qkv = torch.arange(12.0).reshape(6, 2)
    out = release_to_project({"audio_encoder.base.htsat.layers.0.blocks.1.attn.qkv.weight": qkv,
                              "audio_encoder.base.htsat.layers.0.blocks.1.attn_mask": torch.zeros(1),
                              "audio_encoder.base.htsat.head.weight": torch.zeros(1),
                              "caption_encoder.base.h.0.attn.masked_bias": torch.zeros(1)})
    prefix = "audio_encoder.base.htsat.encoder.layers.0.blocks.1.attention.self."
    assert sorted(out) == [prefix + "key.weight", prefix + "query.weight", prefix + "value.weight"]
    for i, part in enumerate(("query", "key", "value")):
        torch.testing.assert_close(out[prefix + part + ".weight"], qkv[2 * i:2 * i + 2])


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet in id order: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def _tokenizer_dir(folder: Path) -> Path:
    """A GPT-2 tokenizer folder whose vocabulary is GPT-2's byte alphabet ('!' is id 0, as in GPT-2), no merges."""
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return folder


def _tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(str(_tokenizer_dir(folder)))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    torch.manual_seed(0)
    model = MsClap(TINY)
    return PamScorer(model, *prompt_tokens(_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_front_end_is_torchlibrosas_log_mel_with_htsats_32k_bank(scorer):
    htsat = scorer.model.audio_encoder["base"]["htsat"]
    audio = (0.1 * np.random.default_rng(2).standard_normal(SAMPLE_RATE)).astype(np.float32)
    got = htsat.log_mel(torch.from_numpy(audio)[None])[0, 0].detach().numpy()
    power = np.abs(librosa.stft(audio, n_fft=1024, hop_length=320, window="hann", center=True,
                                pad_mode="reflect")) ** 2
    bank = librosa.filters.mel(sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000)
    expected = 10 * np.log10(np.maximum(bank @ power, 1e-10)).T
    assert got.shape == (1 + SAMPLE_RATE // 320, 64)
    loud = expected > -50  # below, float32 rounding of the conv STFT shows (about 0.05 dB at -80 dB)
    assert loud.mean() > 0.9
    np.testing.assert_allclose(got[loud], expected[loud], atol=2e-3)
    np.testing.assert_allclose(got, expected, atol=0.1)


def test_prompts_end_with_endoftext_and_pad_with_id_zero(tmp_path):
    ids, mask = prompt_tokens(_tokenizer(tmp_path))
    assert ids.shape == mask.shape == (2, TEXT_LEN)
    text = "the sound is clear and clean."
    n = len(text) + 2  # one id per character (no merges), the space ('\u0120', 220), <|endoftext|>
    assert ids[0, n - 2] == 220 and ids[0, n - 1] == 256
    assert torch.all(ids[0, n:] == 0) and torch.all(ids[0, :n] != 0)
    assert mask[0].sum() == n


def test_tiny_model_scores_each_window_against_the_two_prompts(scorer):
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(2 * WINDOW + 44100)).astype(np.float32)  # 15 s: 3 windows
    result = scorer.score(audio)
    assert result.windows.shape == (3,) and np.all((result.windows > 0) & (result.windows < 1))
    assert result.score == pytest.approx(result.windows.mean())
    windows = torch.from_numpy(np.stack([audio[:WINDOW], audio[WINDOW:2 * WINDOW], audio[-WINDOW:]]))
    with torch.no_grad():
        emb = scorer.model.audio_embeddings(windows).double().numpy()
    np.testing.assert_allclose(result.windows, pam_probabilities(emb, scorer.prompts, scorer.scale), atol=1e-6)
    assert scorer.scale == pytest.approx(1 / 0.07)


def test_a_file_that_is_not_msclap_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="not an MS-CLAP 2023 state dict"):
        MsClap.load(bad, TINY)
