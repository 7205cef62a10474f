"""Rendering recipes: every event of an augmented sample lands where its recipe maps it.

Sources are generated clips with known events (a square jumps and a click starts at each event
time). Audio onsets are measured as the first loud sample, visual events as spikes of the
frame difference; each must lie within one output frame of the mapped time.
"""
from __future__ import annotations

import dataclasses

import av
import numpy as np
import pandas as pd
import pytest

from pipeline.ledger import Ledger

from augment.config import AugmentConfig
from augment.plan import build_plan
from augment.recipe import PlanError, Recipe, Segment, write_plan
from augment.render import RenderRequest, render, render_mp4, render_row
from augment.stretch import stretch_audio
from filters.av_align import AVAlignConfig, score_clip
from pipeline.augment import main
from core.config import DecodeLimits
from core.decode import DecodeError, DecodeRequest, decode
from core.synth import write_event_clip

SR = 16000
JUMP_DIFF = 2.0  # mean |frame difference| of a jump is ~8; compression flicker stays below 0.5


def audio_onsets(x: np.ndarray, sr: int) -> np.ndarray:
    """First sample above a quarter of the peak after at least 0.1 s below it."""
    loud = np.nonzero(np.abs(x) > 0.25 * np.abs(x).max())[0]
    starts = [loud[0]] + [b for a, b in zip(loud, loud[1:]) if b - a > 0.1 * sr]
    return np.array(starts) / sr


def jump_times(gray: np.ndarray, times: np.ndarray) -> np.ndarray:
    diff = np.abs(np.diff(gray.astype(np.int16), axis=0)).mean(axis=(1, 2))
    return times[np.nonzero(diff > JUMP_DIFF)[0] + 1]


def assert_matches(found: np.ndarray, expected: list[float], frame_s: float, what: str) -> None:
    expected = np.sort(np.asarray(expected))
    assert len(found) == len(expected), f"{what}: found {np.round(found, 3)}, expected {np.round(expected, 3)}"
    err = np.abs(np.sort(found) - expected)
    assert err.max() < frame_s, f"{what}: off by {err.max() * 1000:.1f} ms > one frame ({frame_s * 1000:.1f} ms)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("augment")
    clips = {
        "k-a": (write_event_clip(d / "a.mp4", fps=25, event_times=(1.2, 2.7, 4.3, 6.2, 8.8), seed=1), "dog"),
        "k-b": (write_event_clip(d / "b.mp4", fps=30, size=(192, 144), event_times=(0.8, 3.3, 5.6, 7.2, 9.1),
                                 seed=2), "cat"),
        "k-c": (write_event_clip(d / "c.mp4", duration_s=6.0, fps=25, event_times=(1.3, 3.2, 4.7), seed=3), "saw"),
    }
    rows = [dict(key=k, source="sample", youtube_id=k.upper(), video_path=str(c.path), label=lab,
                 caption=f"{lab} sound", split="train", start_s=0.0, duration_s=c.duration_s, video_fps=c.fps,
                 status="ok") for k, (c, lab) in clips.items()]
    recipes, _ = build_plan(pd.DataFrame(rows), AugmentConfig(concat_per_clip=2, stretch_rates=(0.8, 1.25)))
    plan_path = write_plan(d / "plan.parquet", recipes, {})
    ledger = Ledger(d).write_final(pd.DataFrame([{**r, "reason": ""} for r in rows]), {"dataset": "sample"})
    return {"dir": d, "clips": {k: c for k, (c, _) in clips.items()}, "recipes": recipes, "plan": plan_path,
            "ledger": ledger}


def expected_events(recipe: Recipe, clips: dict) -> tuple[list[float], list[float]]:
    audio, visual = [], []
    for i, seg in enumerate(recipe.segments):
        clip = clips[seg.source_key]
        audio += [seg.to_output(t) for t in clip.audio_event_times if seg.src_start_s <= t < seg.src_end_s]
        visual += [seg.to_output(t) for t in clip.event_times if seg.src_start_s <= t < seg.src_end_s]
        if i > 0:
            visual.append(seg.dst_start_s)  # the cut itself is a change of scene
    return audio, visual


def test_plan_covers_both_kinds_and_a_short_source(world):
    kinds = {r.kind for r in world["recipes"]}
    assert kinds == {"concat", "stretch"}
    short = [r for r in world["recipes"] if r.duration_s < r.target_s]
    assert any(r.key == "k-c-ts125" for r in short) and any(r.kind == "concat" for r in short)


@pytest.mark.parametrize("method", ["resample", "wsola"])
def test_every_event_lands_at_its_mapped_time(world, method):
    for recipe in world["recipes"]:
        if method == "wsola" and recipe.kind == "concat":
            continue  # concat plays at rate 1: no stretch involved
        clip = render(recipe, RenderRequest(audio_rates=(SR,), gray=True, stretch_method=method))
        frame_s = 1.0 / clip.video_fps
        assert clip.video_fps == pytest.approx(recipe.video_fps)
        assert clip.audio[SR].size == round(recipe.duration_s * SR)
        assert len(clip.gray) == len(clip.gray_times) == int(np.ceil(recipe.duration_s * clip.video_fps - 1e-9))
        audio, visual = expected_events(recipe, world["clips"])
        assert_matches(audio_onsets(clip.audio[SR], SR), audio, frame_s, f"{recipe.key} audio ({method})")
        assert_matches(jump_times(clip.gray, clip.gray_times), visual, frame_s, f"{recipe.key} video")


def test_frames_are_the_source_frames_shown_at_the_mapped_times(world):
    for key in ("k-a-ts080", "k-a-ts125", next(r.key for r in world["recipes"] if r.key.startswith("cat-k-a-"))):
        recipe = next(r for r in world["recipes"] if r.key == key)
        clip = render(recipe, RenderRequest(rgb_fps=2.0, gray=True, gray_fps=10.0))
        assert np.allclose(clip.rgb_times, np.arange(len(clip.rgb)) / 2.0)
        assert len(clip.rgb) == int(np.ceil(recipe.duration_s * 2.0 - 1e-9))
        seg = recipe.segments[0]
        for k, t in enumerate(clip.rgb_times):
            if t >= seg.dst_end_s:
                break
            src = decode(seg.video_path, DecodeRequest(start_s=float(seg.to_source(t)), duration_s=0.2, rgb_fps=10.0,
                                                       need_audio=False), DecodeLimits(min_duration_s=0.0))
            assert np.array_equal(clip.rgb[k], src.rgb[0]), f"{key}: frame at {t}s is not the source frame"
        # greyscale at a requested rate: jumps still land within one (requested) frame
        _, visual = expected_events(recipe, world["clips"])
        assert_matches(jump_times(clip.gray, clip.gray_times), visual, 0.1, f"{key} video at 10 fps")


def test_short_source_gives_a_shorter_sample_of_the_recorded_length(world):
    recipe = next(r for r in world["recipes"] if r.key == "k-c-ts125")
    assert recipe.duration_s == pytest.approx(6.0 / 1.25) and recipe.target_s == 10.0
    clip = render(recipe, RenderRequest(audio_rates=(SR,), rgb_fps=2.0))
    assert clip.duration_s == pytest.approx(4.8)
    assert clip.audio[SR].size == round(4.8 * SR)
    assert len(clip.rgb) == 10  # grid points 0, 0.5, ... 4.5 lie inside the 4.8 s of valid output


def test_rendered_mp4_has_the_events_in_place_and_lossless_audio(world):
    for recipe in (world["recipes"][0], next(r for r in world["recipes"] if r.key == "k-b-ts125")):
        out = world["dir"] / f"{recipe.key}.mp4"
        render_mp4(recipe, out, sample_rate=SR)
        with av.open(str(out)) as c:
            assert c.streams.audio[0].codec_context.name == "flac"
            assert float(c.streams.video[0].average_rate) == pytest.approx(recipe.video_fps)
        back = decode(out, DecodeRequest(audio_rates=(SR,), gray=True))
        assert back.duration_s == pytest.approx(recipe.duration_s, abs=1.0 / recipe.video_fps)
        audio, visual = expected_events(recipe, world["clips"])
        frame_s = 1.0 / recipe.video_fps
        assert_matches(audio_onsets(back.audio[SR], SR), audio, frame_s, f"{recipe.key} mp4 audio")
        assert_matches(jump_times(back.gray, back.gray_times), visual, frame_s, f"{recipe.key} mp4 video")


@pytest.mark.slow
def test_augmented_samples_of_an_aligned_clip_keep_a_high_av_align(world):
    cfg = AVAlignConfig(mode="reference")
    source = score_clip(world["clips"]["k-a"].path, cfg)
    assert source.score == pytest.approx(1.0)
    concat = next(r for r in world["recipes"] if r.key.startswith("cat-k-a-"))
    for recipe in (next(r for r in world["recipes"] if r.key == "k-a-ts080"),
                   next(r for r in world["recipes"] if r.key == "k-a-ts125"), concat):
        out = world["dir"] / f"avalign-{recipe.key}.mp4"
        render_mp4(recipe, out)  # the source's own rate and channels
        got = score_clip(out, cfg)
        # stretch keeps every pair; a concat adds one unmatched visual peak (the cut) to ~5 events
        floor = 0.95 if recipe.kind == "stretch" else 0.75
        assert got.score >= floor, f"{recipe.key}: AV-Align {got.score:.3f} (source {source.score:.3f})"


def test_crossfade_is_equal_power_and_centred_on_the_cut(tmp_path):
    rate = 44100  # the clips' native rate: decoded audio is used as is, so the mix can be checked exactly
    cut, b0, xf = 5.0, 2.0, 0.020  # 882 samples: both halves whole
    # clicks start 4 ms before the cut in A and before B's segment: both sides sound in the fade
    a_clip = write_event_clip(tmp_path / "a.mp4", event_times=(2.0, 5.0), audio_shift_s=-0.004, seed=4)
    b_clip = write_event_clip(tmp_path / "b.mp4", event_times=(2.0, 6.0), audio_shift_s=-0.004, seed=5)

    def recipe(b_start: float) -> Recipe:
        segs = (Segment("a", str(a_clip.path), 0.0, cut, 0.0, 1.0),
                Segment("b", str(b_clip.path), b_start, b_start + 5.0, cut, 1.0))
        return Recipe(key="cat-a-b", kind="concat", caption="", label="", split="train", source="", duration_s=10.0,
                      target_s=10.0, video_fps=25.0, segments=segs, cut_s=cut, crossfade_s=xf)

    a = decode(a_clip.path, DecodeRequest(audio_rates=(rate,), need_video=False)).audio[rate]
    b = decode(b_clip.path, DecodeRequest(audio_rates=(rate,), need_video=False)).audio[rate]
    k = int(cut * rate)
    h = int(round(xf / 2 * rate))
    out = render(recipe(b0), RenderRequest(audio_rates=(rate,))).audio[rate]
    b_at = int(b0 * rate) - k  # B sample index = output index + b_at
    assert np.abs(a[k - h: k + h]).max() > 0.1 and np.abs(b[k - h + b_at: k + h + b_at]).max() > 0.1
    np.testing.assert_array_equal(out[: k - h], a[: k - h])
    np.testing.assert_array_equal(out[k + h:], b[k + h + b_at: 10 * rate + b_at])
    theta = (np.arange(2 * h) + 0.5) / (2 * h) * np.pi / 2
    mix = a[k - h: k + h] * np.cos(theta) + b[k - h + b_at: k + h + b_at] * np.sin(theta)
    np.testing.assert_allclose(out[k - h: k + h], mix, atol=1e-6)
    # B played from the start of its file has no audio before the cut: the fade moves after it
    out0 = render(recipe(0.0), RenderRequest(audio_rates=(rate,))).audio[rate]
    np.testing.assert_array_equal(out0[:k], a[:k])
    np.testing.assert_allclose(out0[k: k + 2 * h], a[k: k + 2 * h] * np.cos(theta) + b[: 2 * h] * np.sin(theta),
                               atol=1e-6)
    np.testing.assert_array_equal(out0[k + 2 * h:], b[2 * h: 10 * rate - k])


def tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def dominant_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * SR / x.size)


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_stretch_methods_trade_pitch_as_documented(rate):
    assert dominant_hz(stretch_audio(tone(440.0), SR, rate, "wsola")) == pytest.approx(440.0, rel=0.02)
    assert dominant_hz(stretch_audio(tone(440.0), SR, rate, "resample")) == pytest.approx(440.0 * rate, rel=0.02)


@pytest.mark.parametrize("method", ["resample", "wsola"])
@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_stretch_keeps_a_click_sharp(method, rate):
    x = np.zeros(2 * SR, np.float32)
    rng = np.random.default_rng(0)
    n = int(0.005 * SR)
    x[SR: SR + n] = rng.uniform(-0.8, 0.8, n)  # a 5 ms burst at 1.0 s
    y = stretch_audio(x, SR, rate, method)
    assert y.size == round(x.size / rate)
    energy = np.cumsum(y.astype(np.float64) ** 2)
    lo, hi = np.searchsorted(energy, [0.02 * energy[-1], 0.98 * energy[-1]])
    assert abs(lo / SR - 1.0 / rate) < 0.005, f"onset moved to {lo / SR:.4f}s, expected {1 / rate:.4f}s"
    assert (hi - lo) / SR < 0.005 / rate + 0.012, f"click smeared over {(hi - lo) / SR * 1000:.1f} ms"


def test_render_row_is_what_the_encode_stage_calls(world):
    row = {**world["recipes"][0].as_row(), "status": "", "reason": ""}
    clip = render_row(row)  # defaults: 16 kHz audio, 2 fps RGB (SignalConfig)
    assert set(clip.audio) == {16000} and np.allclose(clip.rgb_times, np.arange(20) / 2.0)
    assert clip.duration_s == row["duration_s"] and clip.path == f"augment:{row['key']}"


def test_missing_or_short_sources_and_bad_recipes_fail_clearly(world, tmp_path):
    recipe = world["recipes"][0]
    gone = dataclasses.replace(recipe, segments=(
        recipe.segments[0], dataclasses.replace(recipe.segments[1], video_path=str(tmp_path / "gone.mp4"))))
    with pytest.raises(DecodeError) as e:
        render(gone, RenderRequest(audio_rates=(SR,)))
    assert e.value.reason == "missing_file" and recipe.key in str(e.value) and "segment 1" in str(e.value)
    stretch = next(r for r in world["recipes"] if r.key == "k-c-ts080")  # k-c is 6 s long
    seg = stretch.segments[0]
    too_long = dataclasses.replace(stretch, duration_s=10.0, segments=(dataclasses.replace(
        seg, src_start_s=0.0, src_end_s=8.0),))
    with pytest.raises(DecodeError, match="ends at 6.00s, the recipe plays it to 8.00s") as e:
        render(too_long, RenderRequest(audio_rates=(SR,)))
    assert e.value.reason == "too_short"
    bad = {**recipe.as_row(), "segments": []}
    with pytest.raises(PlanError, match="segments must be a non-empty list"):
        render_row(bad)
    with pytest.raises(ValueError, match="asks for nothing"):
        render(recipe, RenderRequest())


def test_cli_render_writes_a_watchable_mp4(world, tmp_path, capsys):
    out = tmp_path / "demo_stretch.mp4"
    assert main(["render", "--plan", str(world["plan"]), "--kind", "stretch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "k-a-ts080" in printed
    with av.open(str(out)) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}
    assert main(["render", "--plan", str(world["plan"]), "--key", "nope", "--out", str(out)]) == 2
    assert "no recipe 'nope'" in capsys.readouterr().err
    broken = world["dir"] / "broken-plan.parquet"
    r = world["recipes"][0]
    write_plan(broken, [dataclasses.replace(r, segments=(dataclasses.replace(r.segments[0], video_path="/nope.mp4"),
                                                         r.segments[1]))], {})
    assert main(["render", "--plan", str(broken), "--key", r.key, "--out", str(out)]) == 1
    assert "missing_file" in capsys.readouterr().err


def test_demo_plans_and_names_one_concat_and_one_stretch_mp4(world, tmp_path, capsys):
    """The commands ``make demo`` runs (pipeline.demo): plan, then one render of each kind."""
    plan = tmp_path / "plan.parquet"
    assert main(["plan", "--ledger", str(world["ledger"]), "--out", str(plan)]) == 0
    assert plan.is_file()
    for kind in ("concat", "stretch"):
        out = tmp_path / f"{kind}.mp4"
        assert main(["render", "--plan", str(plan), "--kind", kind, "--out", str(out)]) == 0
        assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
        back = decode(out, DecodeRequest(audio_rates=(SR,), gray=True))
        assert back.duration_s > 1.0 and np.abs(back.audio[SR]).max() > 0.1


def test_native_audio_keeps_the_source_channels_through_render_and_mp4(tmp_path):
    path = "tests/data/vggsound/video/0DCit2EBtjs_000030.mp4"  # stereo AAC, 44.1 kHz
    src = decode(path, DecodeRequest(start_s=1.0, duration_s=5.0, audio_native=True, need_video=False))
    assert src.audio_native.shape[0] == 2
    seg = Segment("real", path, 1.0, 6.0, 0.0, 1.0)
    copy = Recipe(key="real-copy", kind="stretch", caption="", label="", split="train", source="", duration_s=5.0,
                  target_s=5.0, video_fps=30.0, segments=(seg,), rate=1.0)
    clip = render(copy, RenderRequest(audio_native=True))
    assert clip.audio_layout == "stereo" and clip.native_sr == 44100
    lead = int(round(src.audio_lead_s * 44100))
    want = np.concatenate([np.zeros((2, lead), np.float32), src.audio_native], axis=1)
    np.testing.assert_allclose(clip.audio_native, want, atol=1e-6)  # the decoder's window, both channels
    fast = dataclasses.replace(copy, key="real-ts125", duration_s=4.0, rate=1.25,
                               segments=(dataclasses.replace(seg, rate=1.25),))
    out = render_mp4(fast, tmp_path / "fast.mp4")
    back = decode(tmp_path / "fast.mp4", DecodeRequest(audio_native=True, need_video=False))
    assert back.audio_native.shape == (2, 4 * 44100) and back.audio_layout == "stereo"
    np.testing.assert_allclose(back.audio_native, np.clip(out.audio_native, -1, 1), atol=2.0 / 32767)  # 16-bit


def test_native_audio_starts_where_the_source_track_starts(tmp_path):
    """A source whose audio track starts 38 ms after its picture keeps that offset (no silence is
    written in its place), so players and AV-Align's reference decoding see the source's timing."""
    path = "tests/data/vggsound/video/0DCit2EBtjs_000030.mp4"
    src = decode(path, DecodeRequest(duration_s=5.0, audio_native=True, need_video=False))
    assert src.audio_lead_s > 0.03
    seg = Segment("real", path, 0.0, 5.0, 0.0, 1.0)
    copy = Recipe(key="real-copy", kind="stretch", caption="", label="", split="train", source="", duration_s=5.0,
                  target_s=5.0, video_fps=30.0, segments=(seg,), rate=1.0)
    out = render_mp4(copy, tmp_path / "copy.mp4")
    assert out.audio_lead_s == pytest.approx(src.audio_lead_s, abs=1 / 44100)
    np.testing.assert_allclose(out.audio_native, src.audio_native, atol=1e-6)
    back = decode(tmp_path / "copy.mp4", DecodeRequest(audio_native=True, need_video=False))
    assert back.audio_lead_s == pytest.approx(src.audio_lead_s, abs=1 / 44100)
