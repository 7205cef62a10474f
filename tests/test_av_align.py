"""AV-Align: the published numbers of both revisions on real clips, the loud-clip audio path,
fast-mode agreement, the metric's own rules, the CLI.

Reference mode runs Farneback at native resolution on the five real clips: the costly part of
this file (tens of seconds per 720p clip here), so those tests are marked slow. Each clip is
scored once per session and shared by the tests that need it.
"""
import functools
import json
import subprocess
import sys
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile as sf

from augment.render import write_mp4
from filters.av_align import (LEDGER_FIELDS, REVISIONS, VERSIONS, AVAlignConfig, av_align_score, audio_onsets, decode_request_for,
                              match_peaks, reference_audio, run_metadata, score_clip, score_decoded, video_motion,
                              video_peaks)
from filters.rules import FilterConfig
from core.decode import DecodedClip, DecodeError, DecodeRequest, decode
from core.synth import write_event_clip

DATA = Path(__file__).parent / "data" / "vggsound"
PUBLISHED = json.loads((DATA / "av_align_reference.json").read_text())
CLIPS = sorted(PUBLISHED)
THRESHOLD = FilterConfig().av_align_min
ROOT = Path(__file__).resolve().parents[1]
# the fixture's names for each revision's score and video peak count
FIXTURE_KEYS = {"2025": ("score", "video_peaks"), "2023": ("score_2023", "video_peaks_2023")}


@functools.cache
def scored(name: str, mode: str):
    return score_clip(DATA / "video" / name, AVAlignConfig(mode=mode))


# ---------------------------------------------------------------------------- real clips


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIPS)
def test_reference_mode_reproduces_both_published_revisions(name):
    result, published = scored(name, "reference"), PUBLISHED[name]
    assert result.fps == published["fps"] and result.frames == published["frames"]
    assert result.audio_peaks == published["audio_peaks"]
    for version, (score_key, peaks_key) in FIXTURE_KEYS.items():
        rev = result.revisions[version]
        assert round(rev.score, 6) == published[score_key], version
        assert rev.video_peaks == published[peaks_key], version
    # the selected revision (2025 by default) is the top-level score
    assert result.version == "2025" and result.score == result.revisions["2025"].score


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_fast_mode_makes_the_reference_decisions(version):
    score_key = FIXTURE_KEYS[version][0]
    published = np.array([PUBLISHED[n][score_key] for n in CLIPS])
    ref = np.array([scored(n, "reference").revisions[version].score for n in CLIPS])
    fast = np.array([scored(n, "fast").revisions[version].score for n in CLIPS])
    np.testing.assert_allclose(ref, published, atol=5e-7)
    assert list(fast > THRESHOLD) == list(published > THRESHOLD)
    assert np.corrcoef(published, fast)[0, 1] >= 0.9
    assert np.all(np.abs(fast - published) < 0.1)


def test_fast_mode_scores_small_frames_in_native_pixels():
    clip = decode(DATA / "video" / CLIPS[0], decode_request_for(AVAlignConfig(mode="fast")))
    assert max(clip.gray.shape[1:]) <= AVAlignConfig().fast_max_side and clip.gray_scale < 1.0
    with pytest.raises(ValueError, match="native-resolution"):
        score_decoded(clip, AVAlignConfig(mode="reference"))


# fast mode as it was before its decode options (deblocked frames, luma + OpenCV pyramid): the
# options may move a score by at most this, and must keep every keep/drop decision (docs/benchmarks.md)
FAST_BEFORE = AVAlignConfig(fast_skip_loop_filter=False, fast_scaler="opencv")
OPTION_TOLERANCE = 0.03


@functools.cache
def scored_with(path: Path, config: AVAlignConfig):
    return score_clip(path, config)


QUICK_CLIP = "-BAKe6QGTUk_000030.mp4"  # the cheapest of the five to decode: `make test-fast` scores only it


@pytest.mark.parametrize("name", [n if n == QUICK_CLIP else pytest.param(n, marks=pytest.mark.slow) for n in CLIPS])
def test_fast_decode_options_keep_scores_within_tolerance(name):
    now = scored(name, "fast").score
    before = scored_with(DATA / "video" / name, FAST_BEFORE).score
    assert abs(now - before) <= OPTION_TOLERANCE, (now, before)
    assert (now > THRESHOLD) == (PUBLISHED[name]["score"] > THRESHOLD)


def test_reference_mode_keeps_the_full_quality_decode():
    req = decode_request_for(AVAlignConfig(mode="reference", fast_skip_loop_filter=True, fast_scaler="area"))
    assert req.gray_max_side is None and not req.skip_loop_filter and req.gray_scaler == "opencv"
    fast = decode_request_for(AVAlignConfig())
    assert fast.skip_loop_filter and fast.gray_scaler == "opencv" and fast.gray_max_side == 64
    with pytest.raises(ValueError, match="fast_scaler"):
        AVAlignConfig(fast_scaler="sharp")


@pytest.fixture(scope="module")
def loud_clip(tmp_path_factory):
    """A real clip (small frames) whose stereo track is gained to just under full scale, FLAC-coded."""
    src = DATA / "video" / "0DCit2EBtjs_000030.mp4"
    frames, chunks = [], []
    with av.open(str(src)) as c:
        for frame in c.decode(c.streams.video[0]):
            frames.append(frame.reformat(width=160, height=120, format="rgb24").to_ndarray())
    with av.open(str(src)) as c:
        stream = c.streams.audio[0]
        rate, layout = stream.rate, stream.layout.name
        chunks = [f.to_ndarray() for f in c.decode(stream)]
    audio = np.concatenate(chunks, axis=1).astype(np.float32)
    audio *= 0.999 / np.abs(audio).max()
    clip = DecodedClip(path=str(src), start_s=0.0, duration_s=10.0, video_fps=30.0, rgb=np.stack(frames),
                       native_sr=rate, audio_native=audio, audio_layout=layout)
    return write_mp4(clip, tmp_path_factory.mktemp("loud") / "loud.mp4", fps=30.0)


def _published_onsets(path: Path, wav: Path) -> np.ndarray:
    """The published ``detect_audio_peaks``: every channel of the file's track, as float, in a WAV
    that ``librosa.load`` reads (decoded with PyAV directly, not through the project)."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate = stream.rate
        pcm = np.concatenate([f.to_ndarray().reshape(-1, stream.channels) for f in c.decode(stream)])
    sf.write(wav, pcm.astype(np.float32) / 32768.0, rate, subtype="FLOAT")
    y, sr = librosa.load(wav)
    env = librosa.onset.onset_strength(y=y, sr=sr)
    return librosa.frames_to_time(librosa.onset.onset_detect(onset_envelope=env, sr=sr), sr=sr)


@pytest.mark.slow
def test_loud_stereo_clip_is_mixed_like_librosa_load_not_clipped(loud_clip, tmp_path):
    expected = _published_onsets(loud_clip, tmp_path / "loud.wav")
    result = score_clip(loud_clip, AVAlignConfig(mode="reference"))
    np.testing.assert_array_equal(result.audio_peak_times, expected)
    # the clip really is loud enough that a clipped (L + R) / sqrt(2) mix, the old path, loses onsets
    channels = decode(loud_clip, DecodeRequest(audio_native=True, need_video=False)).audio_native
    assert channels.shape[0] == 2 and np.abs(channels).max() > 0.99
    clipped = np.clip((channels[0] + channels[1]) * np.float32(np.sqrt(0.5)), -1.0, 1.0)
    assert (np.abs(clipped) >= 1.0).mean() > 1e-4
    old = audio_onsets(librosa.resample(clipped, orig_sr=44100, target_sr=22050), 22050)
    assert len(old) != len(expected) or not np.array_equal(old, expected)


# ---------------------------------------------------------------------------- synthetic clips


@pytest.fixture(scope="module")
def event_clips(tmp_path_factory):
    """A square jumps on five frames; clicks sound on the same frames, or 0.5 s later."""
    folder = tmp_path_factory.mktemp("av_align")
    aligned = write_event_clip(folder / "aligned.mp4", duration_s=6.0, fps=25.0, event_times=(1.0, 2.2, 3.0, 4.4, 5.2))
    shifted = write_event_clip(folder / "shifted.mp4", duration_s=6.0, fps=25.0, event_times=(1.0, 2.2, 3.0, 4.4, 5.2),
                               audio_shift_s=0.5)
    return aligned, shifted


@pytest.mark.parametrize("mode", [pytest.param("reference", marks=pytest.mark.slow), "fast"])
def test_aligned_clip_scores_high_and_shifted_clip_low(event_clips, mode):
    aligned, shifted = event_clips
    good = score_clip(aligned.path, AVAlignConfig(mode=mode))
    bad = score_clip(shifted.path, AVAlignConfig(mode=mode))
    assert good.score > 0.5 > THRESHOLD > bad.score
    # every jump is a motion peak at the jump's frame, every click an onset within a frame of it
    frame = 1.0 / good.fps
    for t in aligned.event_times:
        assert np.min(np.abs(good.video_peak_times - t)) < frame / 2
        assert np.min(np.abs(good.audio_peak_times - t)) < frame


def test_window_is_scored_from_its_start(event_clips):
    aligned, _ = event_clips
    result = score_clip(aligned.path, AVAlignConfig(mode="fast"), start_s=2.0, duration_s=3.0)
    assert result.frames == 75
    inside = [t - 2.0 for t in aligned.event_times if 2.0 <= t < 5.0]
    assert len(result.video_peak_times) == len(inside)
    np.testing.assert_allclose(result.video_peak_times, inside, atol=0.02)


@pytest.mark.slow
def test_fast_decode_options_make_the_reference_decisions_on_generated_clips(event_clips, tmp_path):
    still = write_event_clip(tmp_path / "still.mp4", duration_s=4.0, fps=30.0, event_times=(1.0,), motion=False)
    odd = write_event_clip(tmp_path / "odd.mp4", duration_s=5.0, fps=14.96, size=(320, 240),
                           event_times=(1.0, 2.0, 3.2, 4.0))
    for path in (*[c.path for c in event_clips], still.path, odd.path):
        ref = scored_with(path, AVAlignConfig(mode="reference")).score
        now = scored_with(path, AVAlignConfig()).score
        before = scored_with(path, FAST_BEFORE).score
        assert (now > THRESHOLD) == (ref > THRESHOLD), (path.name, now, ref)
        assert abs(now - before) <= OPTION_TOLERANCE, (path.name, now, before)


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_still_and_silent_clip_has_no_peaks_and_scores_zero(tmp_path, mode):
    clip = write_event_clip(tmp_path / "still.mp4", duration_s=3.0, fps=25.0, event_times=(1.0,),
                            motion=False, sound=False)
    result = score_clip(clip.path, AVAlignConfig(mode=mode))
    assert (result.score, result.audio_peaks, result.video_peaks) == (0.0, 0, 0)


def test_decode_without_native_audio_is_refused(event_clips):
    clip = decode(event_clips[0].path, DecodeRequest(audio_rates=(22050,), gray=True, gray_max_side=96))
    with pytest.raises(ValueError, match="decode_request_for"):
        score_decoded(clip, AVAlignConfig(mode="fast"))


# ---------------------------------------------------------------------------- the metric's rules


def test_empty_peak_sets_score_zero():
    for version in VERSIONS:
        assert av_align_score([], [], 30.0, version) == 0.0
        assert av_align_score([1.0, 2.0], [], 30.0, version) == 0.0
        assert av_align_score([], [1.0], 30.0, version) == 0.0


def test_2025_matching_is_one_to_one_and_greedy():
    # two onsets near one motion peak: only one may match it
    assert match_peaks([1.0, 1.01], [1.0], 30.0) == 1
    assert av_align_score([1.0, 1.01], [1.0], 30.0) == pytest.approx(1 / 2)
    # one onset near two motion peaks: it takes one, the other stays unmatched
    assert match_peaks([1.0], [0.99, 1.01], 30.0) == 1
    # greedy in order: the first onset takes the first free peak in its window
    assert match_peaks([0.98, 1.0], [0.96, 1.01], 30.0) == 2
    assert av_align_score([0.98, 1.0], [0.96, 1.01], 30.0) == 1.0


def test_2023_matching_lets_onsets_share_a_peak_and_can_exceed_one():
    # both onsets match the one motion peak: I = 2, union = 2 + 1 - 2 = 1
    assert match_peaks([1.0, 1.01], [1.0], 30.0, one_to_one=False) == 2
    assert av_align_score([1.0, 1.01], [1.0], 30.0, "2023") == pytest.approx(2.0)
    assert av_align_score([1.0, 1.01, 2.0], [1.0, 3.0], 30.0, "2023") == pytest.approx(2 / 3)
    assert av_align_score([1.0, 1.01, 2.0], [1.0, 3.0], 30.0, "2025") == pytest.approx(1 / 4)
    # an onset takes the first peak in its window, not the nearest one
    assert match_peaks([0.98, 1.0], [0.96, 1.01], 30.0, one_to_one=False) == 2
    with pytest.raises(KeyError):
        av_align_score([1.0], [1.0], 30.0, "2024")


def test_match_window_is_open_one_frame():
    # fps 4: one frame is exactly 0.25 s (exact in binary)
    for one_to_one in (True, False):
        assert match_peaks([1.0], [1.25], 4.0, one_to_one) == 0
        assert match_peaks([1.0], [1.2499], 4.0, one_to_one) == 1
        assert match_peaks([1.0], [0.75], 4.0, one_to_one) == 0


def test_video_peaks_are_strict_interior_maxima_above_the_2025_floor_only():
    motion = np.array([0.9, 0.5, 0.05, 0.3, 0.3, 0.0, 0.1, 0.0999, 0.2, 0.0999, 0.4, 0.1, 0.8])
    # 0.9 and 0.8 are endpoints; 0.3, 0.3 is a plateau; 0.1 counts (floor inclusive), 0.0999 would not
    np.testing.assert_allclose(video_peaks(motion, 10.0, 0.1), [0.6, 0.8, 1.0])
    assert video_peaks(np.array([0.0, 0.0999, 0.0]), 10.0, 0.1).size == 0
    assert video_peaks(np.array([1.0, 2.0]), 10.0, 0.1).size == 0
    # 2023: no floor, a tiny flicker of a static scene is a peak too
    np.testing.assert_allclose(video_peaks(np.array([0.0, 0.01, 0.0, 0.02, 0.0]), 10.0, None), [0.1, 0.3])
    assert REVISIONS["2023"].peak_floor is None and REVISIONS["2025"].peak_floor == 0.1


def test_motion_is_in_native_pixels_whatever_the_frame_size():
    rng = np.random.default_rng(0)
    import cv2

    texture = cv2.GaussianBlur(rng.uniform(0, 255, (240, 400)).astype(np.float32), (0, 0), 3)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    frames = np.stack([texture[40:200, 40 + 2 * i: 360 + 2 * i] for i in range(4)])  # 2 px per frame
    small = np.stack([cv2.resize(f, (160, 80), interpolation=cv2.INTER_AREA) for f in frames])
    cfg = AVAlignConfig()
    native = video_motion(frames, cfg)
    scaled = video_motion(small, cfg, scale=0.5)
    assert native[0] == native[1]  # the first value is the first pair's, duplicated
    np.testing.assert_allclose(native, 2.0, rtol=0.15)
    np.testing.assert_allclose(scaled, 2.0, rtol=0.15)


def test_reference_audio_is_the_channel_mean_never_clipped():
    left = np.full(4410, 0.9, np.float32)
    right = np.full(4410, 0.8, np.float32)
    stereo = reference_audio(np.stack([left, right]), 44100, 44100)
    np.testing.assert_allclose(stereo, 0.85, rtol=1e-6)  # the mean, as librosa.to_mono
    loud = reference_audio(np.stack([left, right]) * 2, 44100, 44100)
    np.testing.assert_allclose(loud, 1.7, rtol=1e-6)  # a float WAV holds it: nothing clips
    mono = reference_audio(left[None] / 2, 44100, 22050)
    assert mono.size == 2205 and mono.dtype == np.float32
    odd = reference_audio(np.ones((1, 4411), np.float32), 44100, 22050)
    assert odd.size == 2206  # librosa's length rule: ceil(n * ratio)
    surround = reference_audio(np.eye(6, dtype=np.float32).repeat(100, axis=1), 44100, 44100)
    np.testing.assert_allclose(surround, 1 / 6, rtol=1e-6)  # every channel weighs the same


def test_config_is_the_published_definition():
    cfg = AVAlignConfig()
    assert cfg.farneback == (0.5, 3, 15, 3, 5, 1.2, 0) and cfg.sample_rate == 22050
    assert cfg.mode == "fast" and cfg.version == "2025" and cfg.revision.peak_floor == 0.1
    assert AVAlignConfig(version="2023").revision == REVISIONS["2023"]
    with pytest.raises(ValueError):
        AVAlignConfig(mode="slow")
    with pytest.raises(ValueError, match="version"):
        AVAlignConfig(version="2024")
    assert decode_request_for(AVAlignConfig(mode="reference")).gray_max_side is None
    req = decode_request_for(cfg)
    assert req.gray and req.audio_native and req.gray_max_side == cfg.fast_max_side
    meta = run_metadata(AVAlignConfig(version="2023"))
    assert meta["version"] == "2023" and meta["revisions"]["2023"] == {"peak_floor": None, "one_to_one": False}
    json.dumps(meta)


def test_selected_version_picks_the_score_and_both_are_kept(event_clips):
    _, shifted = event_clips
    new = score_clip(shifted.path, AVAlignConfig(mode="fast"))
    old = score_clip(shifted.path, AVAlignConfig(mode="fast", version="2023"))
    assert (new.version, old.version) == ("2025", "2023")
    assert new.score == new.revisions["2025"].score and old.score == old.revisions["2023"].score
    assert old.video_peaks == old.revisions["2023"].video_peaks
    for v in VERSIONS:
        assert new.revisions[v].score == old.revisions[v].score
    fields = old.ledger_fields()
    assert fields["av_align"] == fields["av_align_2023"] and fields["video_peaks"] == fields["video_peaks_2023"]
    assert set(fields) == set(LEDGER_FIELDS) and {"av_align_2025", "video_peaks_2023"} <= set(fields)


# ---------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_prints_a_json_line_per_file_and_fails_at_the_end(tmp_path, event_clips):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    missing = tmp_path / "missing.mp4"
    aligned, shifted = event_clips
    proc = subprocess.run([sys.executable, "-m", "filters.av_align", "--mode", "fast", str(aligned.path), str(bad),
                           str(missing), str(shifted.path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(aligned.path), str(bad), str(missing), str(shifted.path)]
    first, broken, absent, last = lines
    assert set(first) == {"path", "version", "score", "audio_peaks", "video_peaks", "fps", "seconds", "score_2025",
                          "score_2023", "video_peaks_2025", "video_peaks_2023"}
    assert first["version"] == "2025" and first["score"] == first["score_2025"]
    assert first["score"] > THRESHOLD > last["score"] and first["fps"] == 25.0
    assert broken["error"].startswith("decode_error") and absent["error"].startswith("missing_file")
    assert "2 of 4" in proc.stderr


@pytest.mark.slow
def test_cli_exit_code_zero_when_all_files_score(event_clips):
    proc = subprocess.run([sys.executable, "-m", "filters.av_align", "--version", "2023", str(event_clips[0].path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["version"] == "2023" and line["score"] == line["score_2023"] > THRESHOLD


def test_bad_file_raises_decode_error(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(DecodeError):
        score_clip(bad)
