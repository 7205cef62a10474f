"""Audio-only corpora (``pipeline.clean --dataset audio``): the manifest in its three caption formats.

Real audio files (``core.synth.write_audio_file``: WAV, FLAC, OGG) in a folder laid out as users
have them: a plain ``captions.csv``, a WavCaps JSON and AudioCaps's ``train.csv``/``val.csv``. Every
entry becomes rows, bad ones included; long files are cut into the signal config's windows.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from core.synth import write_audio_file


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio_corpus")
    write_audio_file(root / "long.wav", duration_s=25.0, seed=1)
    write_audio_file(root / "sub" / "short.flac", duration_s=4.0, seed=2)
    write_audio_file(root / "wc" / "fs1.ogg", duration_s=12.0, seed=3)
    write_audio_file(root / "wc" / "fs2.wav", duration_s=3.0, seed=4)
    write_audio_file(root / "ac" / "101.wav", duration_s=10.0, seed=5)
    write_audio_file(root / "ac" / "YabcdEFGH123.wav", duration_s=30.0, seed=6)
    write_audio_file(root / "ac" / "202.wav", duration_s=10.0, seed=7)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    _write_csv(root / "captions.csv", [
        ["file", "caption", "split"], ["long.wav", "rain on a tin roof, then thunder", "train"],
        ["sub/short.flac", "a bell rings", "test"], ["nope.wav", "gone", "train"], ["a", "b", "c", "d"],
        ["long.wav", "", "train"], ["sub/short.flac", "the same file again", "test"],
        ["broken.wav", "a broken file", "train"]])
    (root / "wavcaps.json").write_text(json.dumps({"data": [
        {"id": "fs1", "caption": "wind through trees", "audio": "wc/fs1.ogg", "duration": 12.0},
        {"id": "fs2", "caption": "a dog barks", "wav_path": str(root / "wc" / "fs2.wav"), "duration": 3.0},
        {"id": "fs3", "caption": "", "audio": "wc/fs3.wav"},
        {"caption": "no id at all"},
        {"id": "fs4", "caption": "a car passes", "audio": "wc/fs4.flac"}]}))
    _write_csv(root / "train.csv", [
        ["audiocap_id", "youtube_id", "start_time", "caption"], ["101", "zzzzzzzzzzz", "30", "a man speaks"],
        ["102", "abcdEFGH123", "12", "birds chirp in the distance"], ["103", "qqqqqqqqqqq", "abc", "bad start"]])
    _write_csv(root / "val.csv", [["audiocap_id", "youtube_id", "start_time", "caption"],
                                  ["202", "yyyyyyyyyyy", "0", "water flows"]])
    return root


@pytest.fixture(scope="module")
def rows(corpus) -> dict[str, dict]:
    from pipeline.manifest import audio_rows

    found = audio_rows(corpus)
    by_key = {r["key"]: r for r in found}
    assert len(by_key) == len(found), "keys must be unique"
    return by_key


def test_plain_captions_csv_windows_long_files_and_keeps_bad_rows(rows, corpus):
    windows = sorted((r["start_s"], r["duration_s"]) for k, r in rows.items() if k.startswith("audio-long-0"))
    assert windows == [(0.0, 10.0), (10.0, 10.0), (20.0, 5.0)]  # 25 s: two full windows and a 5 s tail
    assert all(rows[f"audio-long-{s:06d}"]["caption"] == "rain on a tin roof, then thunder" for s in (0, 10, 20))
    short = rows["audio-sub_short-000000"]
    assert (short["status"], short["split"], short["duration_s"]) == ("", "test", 4.0)  # pending: to be scored
    assert short["video_path"] == str(corpus / "sub" / "short.flac")
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "failed"}
    assert reasons["audio-nope"].startswith("missing_file: ") and "captions.csv line 4" in reasons["audio-nope"]
    assert "expected 3 fields" in reasons["audio-captions-L000005"]
    assert reasons["audio-captions-L000006"].startswith("bad_manifest_row: empty caption")
    dup = next(k for k in reasons if k.startswith("audio-sub_short-000000-dup"))
    assert reasons[dup].startswith("duplicate_id: sub/short")
    assert reasons["audio-broken-000000"].startswith("decode_error")


def test_wavcaps_json_entries(rows, corpus):
    # 12 s: one window; the 2 s tail is shorter than --min-last-window-s (5 s) and left out
    assert sorted(k for k in rows if k.startswith("audio-fs1-")) == ["audio-fs1-000000"]
    assert (rows["audio-fs1-000000"]["start_s"], rows["audio-fs1-000000"]["duration_s"]) == (0.0, 10.0)
    assert rows["audio-fs1-000000"]["caption"] == "wind through trees"
    assert rows["audio-fs2-000000"]["video_path"] == str(corpus / "wc" / "fs2.wav")  # absolute wav_path
    assert rows["audio-fs3"]["reason"].startswith("bad_manifest_row: empty caption (wavcaps.json entry 3)")
    assert rows["audio-wavcaps_json-E000004"]["reason"].startswith("bad_manifest_row: entry is not an object with an id")
    assert rows["audio-fs4"]["reason"] == f"missing_file: {corpus / 'wc' / 'fs4.flac'} (wavcaps.json entry 5)"


def test_audiocaps_csv_trimmed_and_untrimmed_files(rows):
    trimmed = rows["audio-101-000000"]  # found by audiocap_id: a 10 s clip, used whole
    assert (trimmed["start_s"], trimmed["duration_s"], trimmed["split"]) == (0.0, 10.0, "train")
    assert trimmed["youtube_id"] == "zzzzzzzzzzz" and trimmed["caption"] == "a man speaks"
    untrimmed = rows["audio-102-000012"]  # Y{youtube_id}.wav is the whole video's audio: cut at start_time
    assert (untrimmed["start_s"], untrimmed["duration_s"]) == (12.0, 10.0)
    assert not [k for k in rows if k.startswith("audio-102-") and k != "audio-102-000012"]
    assert rows["audio-103"]["reason"].startswith("bad_manifest_row: start_seconds 'abc' is not a number")
    assert rows["audio-202-000000"]["split"] == "test"  # val.csv


def test_excluded_ids_and_no_manifest(corpus, tmp_path):
    from pipeline.manifest import audio_rows

    rows = {r["key"]: r for r in audio_rows(corpus, excluded={"abcdEFGH123"})}
    assert (rows["audio-102-000012"]["status"], rows["audio-102-000012"]["reason"]) == ("filtered", "test_leak")
    write_audio_file(tmp_path / "x.wav", duration_s=1.0)
    with pytest.raises(ValueError, match="no caption manifest"):
        audio_rows(tmp_path)


def test_clean_refuses_desync_for_an_audio_corpus(corpus, tmp_path, capsys):
    from pipeline.clean import main

    assert main(["--dataset", "audio", "--root", str(corpus), "--out", str(tmp_path / "out"), "--clap-model", "none",
                 "--desync-max", "0.5"]) == 2
    assert "no video" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_ambiguous_names_and_paths_outside_the_root_are_refused_not_guessed(tmp_path):
    from pipeline.manifest import audio_rows

    root = tmp_path / "corpus"
    write_audio_file(root / "a" / "91139.flac", duration_s=2.0, seed=1)
    write_audio_file(root / "b" / "91139.wav", duration_s=2.0, seed=2)
    write_audio_file(tmp_path / "outside.wav", duration_s=2.0, seed=3)
    write_audio_file(root / "ok.wav", duration_s=2.0, seed=4)
    _write_csv(root / "captions.csv", [["file", "caption"], ["../outside.wav", "leaves the root"],
                                       ["./ok.wav", "a clap"]])
    (root / "wavcaps.json").write_text(json.dumps({"data": [
        {"id": "91139", "caption": "which one?", "wav_path": "/mnt/original/91139.flac"},
        {"id": "b", "caption": "by its own path", "audio": "b/91139.wav"}]}))
    rows = {r["key"]: r for r in audio_rows(root)}
    assert rows["audio-91139"]["reason"].startswith("bad_manifest_row: several audio files below the root")
    assert rows["audio-b-000000"]["video_path"].endswith("b/91139.wav")  # an exact path is never ambiguous
    assert rows["audio-___outside"]["reason"].startswith("missing_file")  # never opened outside the root
    ok = rows["audio-__ok-000000"]  # "./ok.wav" is below the root
    assert ok["status"] != "failed" and ok["video_path"].endswith("ok.wav")
