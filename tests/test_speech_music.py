"""Speech/music rule on controlled embeddings, prompt embedding with a real (tiny) CLAP, config/CLI."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from filters.clap import ClapConfig, ClapScorer
from filters.speech_music import (
    PromptSets,
    SpeechMusicConfig,
    decide,
    decide_batch,
    embed_prompts,
    score_speech_music,
    verdict,
)

D = 8
E = np.eye(D, dtype=np.float32)
SPEECH_DIR, MUSIC_DIR, EVENT_DIR, LABEL_DIR, OTHER_DIR = E[0], E[1], E[2], E[3], E[4]


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _prompt_set(direction: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n prompts near one direction (the best match is close to the direction itself)."""
    rng = np.random.default_rng(seed)
    return np.stack([_unit(direction + 0.05 * rng.standard_normal(D)) for _ in range(n)])


PROMPTS = PromptSets(speech=_prompt_set(SPEECH_DIR, 4, 0), music=_prompt_set(MUSIC_DIR, 3, 1),
                     event=_prompt_set(EVENT_DIR, 6, 2))
CFG = SpeechMusicConfig()


def _audio(speech=0.0, music=0.0, event=0.0, label=0.0, other=0.0) -> np.ndarray:
    return _unit(speech * SPEECH_DIR + music * MUSIC_DIR + event * EVENT_DIR + label * LABEL_DIR + other * OTHER_DIR)


@pytest.mark.parametrize("audio, expected", [
    (_audio(speech=1.0, event=0.2), "speech"),
    (_audio(music=1.0, event=0.3), "music"),
    (_audio(event=1.0, speech=0.3, music=0.2), ""),
    (_audio(speech=0.6, music=0.8, event=0.1), "music"),   # both beat the event: the larger wins
    (_audio(speech=0.1, music=0.1, other=1.0), ""),         # everything weak: below the floor
])
def test_verdicts_on_controlled_embeddings(audio, expected):
    decision = decide(audio, PROMPTS, CFG)
    assert decision.verdict == expected
    speech, music, event, _ = decision  # unpacks as (speech_score, music_score, event_score, verdict)
    assert (speech, music, event) == (decision.speech, decision.music, decision.event)
    assert -1.0 <= min(speech, music, event) and max(speech, music, event) <= 1.0


def test_scores_are_the_best_prompt_cosines():
    audio = _audio(speech=1.0, event=0.5)
    d = decide(audio, PROMPTS, CFG)
    assert d.speech == pytest.approx(float(np.max(PROMPTS.speech @ audio)), abs=1e-6)
    assert d.music == pytest.approx(float(np.max(PROMPTS.music @ audio)), abs=1e-6)
    assert d.event == pytest.approx(float(np.max(PROMPTS.event @ audio)), abs=1e-6)


def test_label_prompt_replaces_the_general_event_set():
    audio = _audio(speech=0.7, label=1.0)  # a labelled clip whose audio matches its label
    without_label = decide(audio, PROMPTS, CFG)
    with_label = decide(audio, PROMPTS, CFG, label_emb=LABEL_DIR)
    assert without_label.verdict == "speech"  # the general event prompts do not describe it
    assert with_label.event == pytest.approx(float(audio @ LABEL_DIR), abs=1e-6)
    assert with_label.verdict == ""


def test_margin_and_floor_are_configurable():
    audio = _audio(speech=1.0, event=0.9)  # speech only slightly above the event
    d = decide(audio, PROMPTS, CFG)
    assert d.verdict == "speech"
    gap = d.speech - d.event
    assert 0 < gap < 0.1
    assert decide(audio, PROMPTS, SpeechMusicConfig(speech_music_margin=0.1)).verdict == ""
    assert decide(audio, PROMPTS, SpeechMusicConfig(speech_music_min=0.99)).verdict == ""
    stricter = _audio(speech=0.9, event=1.0)  # event slightly ahead: only a negative margin drops it
    assert decide(stricter, PROMPTS, CFG).verdict == ""
    assert decide(stricter, PROMPTS, SpeechMusicConfig(speech_music_margin=-0.1)).verdict == "speech"


def test_rule_reapplies_from_stored_scores():
    """Score once, filter many: the verdict follows from the three stored numbers alone."""
    audios = [_audio(speech=1.0), _audio(music=1.0, event=0.5), _audio(event=1.0), _audio(speech=1.0, music=1.0)]
    for d in decide_batch(np.stack(audios), PROMPTS, CFG):
        assert verdict(d.speech, d.music, d.event, CFG) == d.verdict
    assert verdict(0.5, 0.5, 0.1, CFG) == "speech"  # a tie goes to speech
    assert verdict(float("nan"), 0.5, 0.1, CFG) == ""  # missing scores never drop a clip


def test_decide_batch_mixes_labelled_and_unlabelled_rows():
    audios = np.stack([_audio(speech=0.7, label=1.0), _audio(speech=0.7, label=1.0)])
    out = decide_batch(audios, PROMPTS, CFG, label_embs=[LABEL_DIR, None])
    assert [d.verdict for d in out] == ["", "speech"]
    with pytest.raises(ValueError):
        decide_batch(audios, PROMPTS, CFG, label_embs=[LABEL_DIR])


def test_on_by_default_for_youtube_only():
    assert SpeechMusicConfig().enabled_for("youtube")
    assert not SpeechMusicConfig().enabled_for("vggsound")
    assert not SpeechMusicConfig().enabled_for("sample")
    assert SpeechMusicConfig(speech_music="on").enabled_for("vggsound")
    assert not SpeechMusicConfig(speech_music="off").enabled_for("youtube")


@pytest.mark.parametrize("kwargs", [{"speech_prompts": ()}, {"music_prompts": ("music", " ")},
                                    {"event_prompts": "a sound"}, {"speech_music": "maybe"}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        SpeechMusicConfig(**kwargs)


def test_cli_flags_come_from_the_config():
    from core.cli_config import add_config_args, from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, SpeechMusicConfig)
    ns = parser.parse_args(["--speech-music", "on", "--music-prompts", "music,a song,an orchestra",
                            "--speech-music-margin", "0.05"])
    cfg = from_args(SpeechMusicConfig, ns)
    assert cfg.speech_music == "on" and cfg.speech_music_margin == 0.05
    assert cfg.music_prompts == ("music", "a song", "an orchestra")
    assert from_args(SpeechMusicConfig, parser.parse_args([])) == SpeechMusicConfig()


def test_prompt_embeddings_come_from_the_same_clap(tiny_clap_dir):
    scorer = ClapScorer(ClapConfig(model=str(tiny_clap_dir))).load(device="cpu")
    cfg = SpeechMusicConfig()
    sets = embed_prompts(scorer, cfg)
    assert sets.speech.shape == (len(cfg.speech_prompts), scorer.embedding_dim)
    assert sets.event.shape == (len(cfg.event_prompts), scorer.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(sets.music, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(sets.speech[0], scorer.text_embeddings(["a person talking"])[0], atol=1e-6)
    audio = scorer.audio_embeddings([np.random.default_rng(0).standard_normal(48000 * 3).astype(np.float32) * 0.1])
    d = decide(audio[0], sets, cfg)
    assert d.speech == pytest.approx(float(np.max(sets.speech @ audio[0])), abs=1e-5)

    # the stage entry point: a labelled row scores its event against its own caption, an unlabelled one
    # against the general event prompts
    caption = scorer.caption("dog barking")
    labelled, unlabelled = score_speech_music(scorer, np.repeat(audio, 2, axis=0), cfg, [caption, None])
    assert labelled.event == pytest.approx(float(scorer.score(audio, [caption])[0]), abs=1e-6)
    assert unlabelled.event == pytest.approx(float(np.max(sets.event @ audio[0])), abs=1e-5)
    assert labelled.speech == unlabelled.speech == pytest.approx(d.speech, abs=1e-6)
    assert score_speech_music(scorer, audio, cfg)[0] == d
