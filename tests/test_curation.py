"""Curation scores and rules (filters/curation.py): a real VAD on real speech, silence, cuts, static video."""
from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import soxr

from core.decode import DecodeRequest, decode
from core.mux import AudioTrack, VideoTrack, mux
from filters.curation import (CurationConfig, CurationFilters, SpeechDetector, curation_reasons, motion_scores,
                              scene_cut_times, silence_scores)
from pipeline.clean_stages import CleanStageConfig, DecodeScoreStage

VIDEO = Path(__file__).parent / "data" / "vggsound" / "video"
SR = 16000
# Two real VGGSound clips without any voice (a drum kit, an acoustic guitar), checked by the VAD and
# by looking at their spectrograms: no harmonic speech contours anywhere.
VOICELESS = ("-BAKe6QGTUk_000030.mp4", "0DCit2EBtjs_000030.mp4")
# The squash clip's audio is people talking over the rallies (harmonic contours through most of
# the 10 s): the VAD is right to call it speech.
TALKING = "-yoaSondvkw_000071.mp4"
SENTENCE = ("Hello everyone and welcome back to the channel. Today I will show you how to fix a "
            "bicycle tire in less than ten minutes, so let us get started right away.")


def _audio(name: str) -> np.ndarray:
    return decode(str(VIDEO / name), DecodeRequest(audio_rates=(SR,), need_video=False)).audio[SR][: 10 * SR]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """Real synthetic speech (espeak-ng), 16 kHz mono."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (the Makefile and .ci/run install it with apt-get)")
    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), SENTENCE], check=True, timeout=60)
    x, sr = sf.read(str(wav), dtype="float32")
    return soxr.resample(x, sr, SR).astype(np.float32)


@pytest.fixture(scope="module")
def vad() -> SpeechDetector:
    detector = SpeechDetector(CurationConfig())
    detector.load()
    return detector


def _mix(background: np.ndarray, speech: np.ndarray, snr_db: float, at_s: float = 1.0) -> np.ndarray:
    """Speech from ``at_s`` over the background, scaled to ``snr_db`` (speech power / background power)."""
    out = background.copy()
    start = int(at_s * SR)
    n = min(speech.size, out.size - start)
    gain = np.sqrt(np.mean(background ** 2) / np.mean(speech[:n] ** 2) * 10 ** (snr_db / 10))
    out[start:start + n] += gain * speech[:n]
    return out


def _verdicts(scores: list[dict], dataset: str = "youtube") -> list[str]:
    return list(curation_reasons(pd.DataFrame(scores), CurationFilters(), dataset))


@pytest.mark.parametrize("clip", VOICELESS)
def test_vad_keeps_voiceless_clips_and_drops_them_with_speech_mixed_in(clip, speech, vad):
    background = _audio(clip)
    clean = vad.scores(background)
    assert clean["speech_share"] < 0.05 and clean["speech_run_s"] < 0.5, clean
    mixed = [vad.scores(_mix(background, speech, snr)) for snr in (20, 10, 0, -5)]
    for m in mixed:
        assert m["speech_share"] > CurationFilters().speech_share_max, m
    assert _verdicts([clean] + mixed) == ["", "speech", "speech", "speech", "speech"]


def test_vad_hears_the_talking_in_the_squash_clip(vad):
    talking = vad.scores(_audio(TALKING))
    assert talking["speech_share"] > 0.8 and talking["speech_run_s"] > 4.0, talking
    assert _verdicts([talking]) == ["speech"]


def test_speech_rule_is_on_for_youtube_only_by_default_and_recorded_everywhere(speech, vad):
    scores = [vad.scores(_mix(_audio(VOICELESS[0]), speech, 0))]
    assert _verdicts(scores, "youtube") == ["speech"]
    assert _verdicts(scores, "vggsound") == [""]
    assert list(curation_reasons(pd.DataFrame(scores), CurationFilters(speech="on"), "vggsound")) == ["speech"]


def test_silence_levels_and_the_published_rules():
    real = silence_scores(_audio(VOICELESS[0]), SR, CurationConfig().silent_frame_db)
    digital = silence_scores(np.zeros(10 * SR, np.float32), SR, -60.0)
    assert digital["silent_share"] == 1.0 and digital["peak_db"] == pytest.approx(-200.0)
    assert real["silent_share"] < 0.2 and real["peak_db"] > -20.0 and real["rms_db"] < real["peak_db"]
    quiet = silence_scores(_audio(VOICELESS[0]) * 10 ** (-75 / 20), SR, -60.0)  # a real clip at near-silence
    assert quiet["silent_share"] > 0.8 and quiet["peak_db"] > -120.0
    tiny = np.zeros(10 * SR, np.float32)
    tiny[100] = 1e-6  # MMAudio: a peak <= 1e-6 is silence
    rows = [real, digital, quiet, silence_scores(tiny, SR, -60.0)]
    assert _verdicts(rows, "vggsound") == ["", "silent", "silent", "silent"]
    assert _verdicts(rows, "vggsound")[0] == ""


def test_static_rule_uses_the_motion_trajectory():
    moving = motion_scores(np.array([0.02, 0.5, 0.03, 2.0]))
    still = motion_scores(np.array([0.01, 0.02, 0.015, 0.03]))
    assert moving == {"motion_max": 2.0, "motion_mean": pytest.approx(0.6375)}
    assert _verdicts([moving, still], "vggsound") == ["", "static"]
    assert motion_scores(None) == {"motion_max": None, "motion_mean": None}


def test_missing_scores_never_drop_and_rules_change_without_rescoring():
    rows = pd.DataFrame([{"speech_share": np.nan, "peak_db": np.nan, "motion_max": np.nan, "scene_cuts": None},
                         {"speech_share": 0.3, "speech_run_s": 2.0, "peak_db": -10.0, "silent_share": 0.1,
                          "motion_max": 1.0, "scene_cuts": [4.2]}])
    assert list(curation_reasons(rows, CurationFilters(), "youtube")) == ["", ""]
    stricter = CurationFilters(speech_share_max=0.2, scene_cuts="drop")
    assert list(curation_reasons(rows, stricter, "youtube")) == ["", "speech,scene_cut"]


def _concat_of_two_real_clips(path: Path, cut_s: float) -> Path:
    """An mp4 that plays one real clip, then hard-cuts to another at ``cut_s`` (lossless audio)."""
    a = decode(str(VIDEO / "-26aVYRtEAc_000030.mp4"), DecodeRequest(rgb_fps=25, audio_rates=(SR,)))
    b = decode(str(VIDEO / "0DCit2EBtjs_000030.mp4"), DecodeRequest(rgb_fps=25, audio_rates=(SR,)))
    h = min(a.rgb.shape[1], b.rgb.shape[1]) // 2 * 2
    w = min(a.rgb.shape[2], b.rgb.shape[2]) // 2 * 2
    n_cut = int(cut_s * 25)
    frames = np.concatenate([a.rgb[:n_cut, :h, :w], b.rgb[n_cut:250, :h, :w]])
    audio = np.concatenate([a.audio[SR][: n_cut * SR // 25], b.audio[SR][n_cut * SR // 25: 10 * SR]])
    track = VideoTrack(frames=((f, Fraction(i, 25)) for i, f in enumerate(frames)), size=(w, h), rate=Fraction(25))
    return mux(path, track, AudioTrack(pcm=audio[None, :], sample_rate=SR, codec="flac"), container_format="matroska")


@pytest.fixture(scope="module")
def cut_clip(tmp_path_factory) -> Path:
    return _concat_of_two_real_clips(tmp_path_factory.mktemp("cut") / "cut.mkv", cut_s=4.0)


@pytest.mark.parametrize("mode", ["fast", pytest.param("reference", marks=pytest.mark.slow)])
def test_scene_cut_found_on_the_frames_av_align_decoded(cut_clip, mode):
    from filters.av_align import AVAlignConfig

    path = cut_clip
    stage = DecodeScoreStage(CleanStageConfig(av_align=AVAlignConfig(mode=mode)))
    stage.setup()
    row = stage.process_row({"key": "k", "video_path": str(path), "source": "youtube", "start_s": 0.0,
                             "duration_s": None, "status": "", "reason": ""})
    assert row["status"] == "ok", row["reason"]
    assert len(row["scene_cuts"]) == 1 and abs(row["scene_cuts"][0] - 4.0) <= 1 / 25 + 1e-6, row["scene_cuts"]
    assert row["motion_max"] > 0.1 and row["silent_share"] < 0.5


def test_real_single_shot_clips_have_no_cut():
    for name in ("-26aVYRtEAc_000030.mp4", "-BAKe6QGTUk_000030.mp4", "0DCit2EBtjs_000030.mp4"):
        clip = decode(str(VIDEO / name), DecodeRequest(gray=True, gray_max_side=64))
        assert scene_cut_times(clip.gray, clip.gray_times, clip.video_fps, CurationConfig()) == [], name


def test_sequence_vad_gives_silero_streaming_spans(speech, vad):
    """The sequence model's spans equal ``silero_vad.get_speech_timestamps`` with the streaming
    model (the one Silero's README runs), clip by clip."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    streaming = load_silero_vad()
    clips = [_audio(name) for name in (*VOICELESS, TALKING)] + [_mix(_audio(VOICELESS[1]), speech, 0)[:7 * SR]]
    for clip, got in zip(clips, vad.scores_batch(clips)):
        spans = get_speech_timestamps(torch.from_numpy(clip), streaming, sampling_rate=SR)
        runs = [(s["end"] - s["start"]) / SR for s in spans]
        assert got["speech_share"] == pytest.approx(sum(runs) / (clip.size / SR), abs=1e-9)
        assert got["speech_run_s"] == pytest.approx(max(runs, default=0.0), abs=1e-9)
    assert vad.scores_batch([np.zeros(100, np.float32)]) == [{"speech_share": None, "speech_run_s": None}]


def test_scene_cuts_equal_pyscenedetect_frame_by_frame(cut_clip):
    """The vectorised scores + FlashFilter give ContentDetector.process_frame's cuts on real frames:
    a real cut, flashes closer than min_scene_len (merged), and a single-shot clip."""
    import cv2
    from scenedetect import ContentDetector, FrameTimecode

    clip = decode(str(cut_clip), DecodeRequest(gray=True, gray_max_side=64))
    flashes = clip.gray.copy()
    flashes[[60, 63, 200]] = 255 - flashes[[60, 63, 200]]  # two flashes 3 frames apart, one alone
    still = decode(str(VIDEO / VOICELESS[0]), DecodeRequest(gray=True, gray_max_side=64))
    config = CurationConfig()
    for gray, times, fps in ((clip.gray, clip.gray_times, clip.video_fps), (flashes, clip.gray_times, clip.video_fps),
                             (still.gray, still.gray_times, still.video_fps)):
        detector = ContentDetector(threshold=config.scene_threshold, luma_only=True,
                                   min_scene_len=max(1, int(round(config.scene_min_len_s * fps))))
        expected = [c for i, f in enumerate(gray)
                    for c in detector.process_frame(FrameTimecode(i, fps), cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))]
        assert scene_cut_times(gray, times, fps, config) == [round(float(times[c.frame_num]), 4) for c in expected]
    assert len(scene_cut_times(flashes, clip.gray_times, clip.video_fps, config)) >= 2


def test_rules_on_a_journal_without_scored_rows():
    empty = pd.DataFrame({"speech_share": [], "motion_max": []})
    assert curation_reasons(empty, CurationFilters(), "youtube").empty
