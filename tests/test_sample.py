"""The sample datasets are only useful if their ground truth is true: measure it by decoding."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import librosa
import numpy as np
import pytest

from core.decode import DecodeError, DecodeRequest, decode
from core.synth import EventClip, write_audio_only, write_event_clip, write_video_only
from pipeline.sample import MANIFEST_NAME, generate, main, youtube_ids

SR = 16000
REQ = DecodeRequest(audio_rates=(SR,), gray=True, gray_max_side=None)
ONSET_TOL_S = 2.0 / SR  # two samples at 16 kHz
JUMP_DIFF = 2.0  # mean |frame difference| of a jump is ~8; compression flicker stays below 0.5


def audio_onsets(x: np.ndarray, sr: int) -> list[float]:
    """Times where the signal first exceeds a quarter of its peak after at least 0.1 s below it."""
    if not np.any(x):
        return []
    loud = np.nonzero(np.abs(x) > 0.25 * np.abs(x).max())[0]
    starts = [loud[0]] + [b for a, b in zip(loud, loud[1:]) if b - a > 0.1 * sr]
    return [s / sr for s in starts]


def jump_times(clip) -> list[float]:
    """Presentation times of frames that differ strongly from the frame before."""
    diff = np.abs(np.diff(clip.gray.astype(np.int16), axis=0)).mean(axis=(1, 2))
    return [float(clip.gray_times[i + 1]) for i in np.nonzero(diff > JUMP_DIFF)[0]]


@pytest.fixture(scope="module")
def vgg(sample_root):
    """The session's generated VGGSound sample (conftest: ``generate(root, "vggsound", seed=0)``)."""
    return sample_root, json.loads((sample_root / MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def yt(youtube_root):
    """The session's generated YouTube corpus (conftest: ``generate(root, "youtube", seed=0)``)."""
    return youtube_root, json.loads((youtube_root / MANIFEST_NAME).read_text())


def rows(manifest, *kinds):
    return [r for r in manifest["rows"] if r["kind"] in kinds]


def decode_row(root: Path, row: dict, req: DecodeRequest = REQ):
    start = row.get("window_start_s", 0.0)
    return decode(root / row["file"], dataclasses.replace(req, start_s=start, duration_s=10.0))


def test_aligned_clicks_and_jumps_fall_exactly_on_the_event_times(vgg):
    root, manifest = vgg
    checked = rows(manifest, "aligned", "untrimmed", "odd_fps", "variable_fps")
    assert {r["kind"] for r in checked} == {"aligned", "untrimmed", "odd_fps", "variable_fps"}
    for row in checked:
        clip = decode_row(root, row)
        events = row["event_times"]
        assert len(events) >= 3, row
        assert row["audio_event_times"] == pytest.approx(events, abs=1e-4)
        onsets = audio_onsets(clip.audio[SR], SR)
        assert len(onsets) == len(events), row
        assert np.max(np.abs(np.subtract(onsets, events))) <= ONSET_TOL_S, (row["file"], onsets, events)
        # the jump is on the frame whose presentation time is the event time, not one frame off
        assert jump_times(clip) == pytest.approx(events, abs=1e-6), row["file"]


def test_untrimmed_file_holds_other_events_outside_its_csv_window(vgg):
    root, manifest = vgg
    (row,) = rows(manifest, "untrimmed")
    start = row["window_start_s"]
    outside = [t for t in row["file_event_times"] if not start <= t < start + 10.0]
    assert outside and row["file_duration_s"] > 10.0 + 0.5
    whole = decode(root / row["file"], REQ)
    assert jump_times(whole) == pytest.approx(row["file_event_times"], abs=1e-6)
    assert f"_{row['start_seconds']:06d}.mp4" in row["file"]


def test_odd_and_variable_frame_rates_are_what_they_claim(vgg):
    root, manifest = vgg
    (odd,) = rows(manifest, "odd_fps")
    clip = decode_row(root, odd)
    assert clip.video_fps == pytest.approx(24000 / 1001)
    assert clip.gray_times[:3] == pytest.approx([0.0, 1001 / 24000, 2002 / 24000])
    (vfr,) = rows(manifest, "variable_fps")
    steps = np.diff(decode_row(root, vfr).gray_times)
    assert steps.max() - steps.min() > 0.4 / 25  # frame durations really vary


def test_shifted_clips_measure_shifted_by_the_requested_amount(vgg):
    root, manifest = vgg
    shifted = rows(manifest, "shifted")
    assert len(shifted) == 3
    for row in shifted:
        assert abs(row["audio_shift_s"]) >= 0.3
        clip = decode_row(root, row)
        jumps = jump_times(clip)
        onsets = audio_onsets(clip.audio[SR], SR)
        assert jumps == pytest.approx(row["event_times"], abs=1e-6)
        assert len(onsets) == len(jumps)
        assert np.subtract(onsets, jumps) == pytest.approx([row["audio_shift_s"]] * len(jumps), abs=ONSET_TOL_S)
        # no click is within one frame of any jump, so AV-Align's one-frame window can never pair them
        assert min(abs(a - v) for a in onsets for v in jumps) > 2 / 25


def test_librosa_onsets_pair_with_jumps_only_in_aligned_clips(vgg):
    """The audio side of AV-Align (librosa defaults at 22050 Hz) sees the clicks where the jumps are."""
    root, manifest = vgg
    for row in rows(manifest, "aligned", "shifted"):
        clip = decode_row(root, row, DecodeRequest(audio_rates=(22050,), need_video=False))
        onsets = librosa.onset.onset_detect(y=clip.audio[22050], sr=22050, units="time")
        assert len(onsets) == len(row["event_times"]), row["file"]
        paired = sum(any(abs(a - v) < 1 / row["fps"] for v in row["event_times"]) for a in onsets)
        assert paired == (len(onsets) if row["expect_av_align"] == "high" else 0), row["file"]


def test_static_silent_clip_has_no_motion_and_digital_silence(vgg):
    root, manifest = vgg
    (row,) = rows(manifest, "static_silent")
    clip = decode_row(root, row)
    assert not np.any(clip.audio[SR])
    assert jump_times(clip) == []
    assert row["event_times"] == [] and row["audio_event_times"] == []


def test_broken_files_fail_decoding_with_their_ledger_reason(vgg):
    root, manifest = vgg
    broken = [r for r in manifest["rows"] if r["file"] and r["expect"] != "ok"]
    assert {r["kind"] for r in broken} == {"broken_empty", "broken_truncated", "broken_not_video", "no_audio",
                                           "no_video", "too_short"}
    for row in broken:
        with pytest.raises(DecodeError) as err:
            decode(root / row["file"], REQ)
        assert err.value.reason == row["expect"], (row["kind"], str(err.value))
    (missing,) = rows(manifest, "missing_file")
    path = root / "video" / f"{missing['youtube_id']}_{missing['start_seconds']:06d}.mp4"
    assert not path.exists()
    with pytest.raises(DecodeError) as err:
        decode(path, REQ)
    assert err.value.reason == "missing_file"


def test_csv_is_the_headerless_vggsound_format_with_quoted_labels_and_bad_rows(vgg):
    root, manifest = vgg
    text = (root / "vggsound.csv").read_text(encoding="utf-8")
    assert '"hammering, nailing"' in text
    lines = list(csv.reader(text.splitlines()))
    assert len(lines) == len(manifest["rows"])
    for fields, row in zip(lines, manifest["rows"]):
        if row["kind"] != "malformed":
            assert fields == [row["youtube_id"], str(row["start_seconds"]), row["label"], row["split"]]
            assert len(fields[0]) == 11
    labels = {f[2] for f in lines if len(f) == 4}
    assert {"hammering, nailing", "bird chirping, tweeting"} <= labels
    assert {f[3] for f in lines if len(f) == 4} == {"train", "test"}
    bad = rows(manifest, "malformed")
    assert {len(lines[r["csv_line"] - 1]) for r in bad} == {2, 4}
    assert any(not lines[r["csv_line"] - 1][1].isdigit() for r in bad)
    (dup,) = rows(manifest, "duplicate")
    first = manifest["rows"][dup["duplicate_of_line"] - 1]
    assert (first["youtube_id"], first["start_seconds"]) == (dup["youtube_id"], dup["start_seconds"])
    assert first["csv_line"] < dup["csv_line"] and first["kind"] == "aligned" and (root / first["file"]).exists()
    on_disk = {p.name for p in (root / "video").iterdir()}
    assert on_disk == {Path(r["file"]).name for r in manifest["rows"] if r["file"]}


def test_same_seed_gives_identical_bytes_other_seed_other_ids(vgg, tmp_path):
    root, manifest = vgg
    again = json.loads(generate(tmp_path / "again", "vggsound", seed=0).read_text())
    assert again == manifest
    for rel in manifest["written"]:
        assert (tmp_path / "again" / rel).read_bytes() == (root / rel).read_bytes(), rel
    ids = {r["youtube_id"] for r in manifest["rows"]}
    assert ids <= set(youtube_ids(0, 30, "vggsound"))
    assert ids.isdisjoint(youtube_ids(1, 30, "vggsound"))


def test_youtube_corpus_has_sidecars_containers_and_a_broken_download(yt):
    root, manifest = yt
    files = manifest["files"]
    suffixes = {Path(f["file"]).suffix for f in files}
    assert {".mp4", ".mkv", ".webm"} <= suffixes
    assert all(len(Path(f["file"]).parts) == 2 for f in files)  # every video sits in a subfolder
    with_info = [f for f in files if f["info_json"]]
    assert 0 < len(with_info) < len(files)
    for f in with_info:
        info = json.loads((root / f["info_json"]).read_text())
        assert info["id"] == f["youtube_id"] and info["title"] and isinstance(info["tags"], list)
        assert (root / f["info_json"]).name == Path(f["file"]).stem + ".info.json"
    assert sum(f["in_vggsound_test_split"] for f in files) == 1
    for f in files:
        if f["expect"] != "ok":
            with pytest.raises(DecodeError) as err:
                decode(root / f["file"], REQ)
            assert err.value.reason == f["expect"]
            continue
        clip = decode(root / f["file"], REQ)
        assert 25.0 <= clip.duration_s <= 35.0 + 1e-6
        assert jump_times(clip) == pytest.approx(f["event_times"], abs=1e-6), f["file"]
        onsets = audio_onsets(clip.audio[SR], SR)
        assert onsets == pytest.approx(f["audio_event_times"], abs=ONSET_TOL_S), f["file"]


def test_write_event_clip_options(tmp_path):
    clip = write_event_clip(tmp_path / "a.mp4", duration_s=3.0, fps=15, event_times=(1.0, 2.03), audio_shift_s=-0.5,
                            sample_rate=48000)
    assert isinstance(clip, EventClip)
    assert clip.event_times == pytest.approx((1.0, 2.0))  # snapped to the 15 fps grid
    assert clip.audio_event_times == pytest.approx((0.5, 1.5))
    decoded = decode(clip.path, DecodeRequest(audio_rates=(48000,), gray=True))
    assert decoded.native_sr == 48000
    assert audio_onsets(decoded.audio[48000], 48000) == pytest.approx(clip.audio_event_times, abs=2 / 48000)
    assert jump_times(decoded) == pytest.approx(clip.event_times)

    still = write_event_clip(tmp_path / "b.mkv", duration_s=3.0, event_times=(1.0,), motion=False)
    decoded = decode(still.path, REQ)
    assert still.event_times == () and jump_times(decoded) == []
    assert audio_onsets(decoded.audio[SR], SR) == pytest.approx([1.0], abs=ONSET_TOL_S)

    with pytest.raises(ValueError, match="outside the audio"):
        write_event_clip(tmp_path / "c.mp4", duration_s=3.0, event_times=(0.2,), audio_shift_s=-0.5)
    with pytest.raises(ValueError, match="not inside the video"):
        write_event_clip(tmp_path / "c.mp4", duration_s=3.0, event_times=(3.5,))
    with pytest.raises(ValueError, match="two frames"):
        write_event_clip(tmp_path / "c.mp4", duration_s=3.0, event_times=(1.0, 1.04))
    with pytest.raises(ValueError, match="Opus"):
        write_event_clip(tmp_path / "c.webm", duration_s=3.0, event_times=(1.0,))

    with pytest.raises(DecodeError, match="no_audio_stream"):
        decode(write_video_only(tmp_path / "v.mp4", duration_s=2.0, event_times=(1.0,)).path, REQ)
    with pytest.raises(DecodeError, match="no_video_stream"):
        decode(write_audio_only(tmp_path / "s.mp4", duration_s=2.0, event_times=(1.0,)).path, REQ)


def test_cli_writes_prints_and_regenerates_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "yt"
    assert main(["--out", str(out), "--kind", "youtube", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "broken_truncated" in printed and "wrote youtube sample (seed 2)" in printed
    first = json.loads((out / MANIFEST_NAME).read_text())
    assert main(["--out", str(out), "--kind", "youtube", "--seed", "5"]) == 0
    second = json.loads((out / MANIFEST_NAME).read_text())
    now = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert now == sorted(second["written"] + [MANIFEST_NAME])  # seed 2's files are gone
    assert set(first["written"]).isdisjoint(now)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("keep me")
    assert main(["--out", str(foreign)]) == 2
    assert "refusing" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["x"] and (foreign / "x").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
