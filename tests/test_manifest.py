"""Manifests: every input line becomes exactly one row, problems become decided rows."""
import json
import shutil
from pathlib import Path

import pytest

from core.config import SignalConfig
from core.keys import is_safe
from pipeline.manifest import WindowConfig, load_excluded_ids, vggsound_rows, windows_for, youtube_rows

FIXTURES = Path(__file__).parent / "data" / "vggsound"


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_real_fixture_csv_gives_one_pending_row_per_line():
    rows = vggsound_rows(FIXTURES / "vggsound.csv", FIXTURES / "video")
    assert len(rows) == 5
    assert all(r["status"] == "" for r in rows)
    assert rows[0]["key"] == "vggsound--26aVYRtEAc-000030"
    assert rows[0]["label"] == "playing acoustic guitar" and rows[0]["split"] == "test"
    assert Path(rows[0]["video_path"]).name == "-26aVYRtEAc_000030.mp4"


def test_csv_edge_cases_each_line_accounted_for(tmp_path):
    video = tmp_path / "video"
    video.mkdir()
    for stem, ext in [("aaaaaaaaaaa_000010", ".mp4"), ("bbbbbbbbbbb_000000", ".mkv"), ("ccccccccccc_000005", ".webm")]:
        shutil.copy(FIXTURES / "video" / "-26aVYRtEAc_000030.mp4", video / (stem + ext))
    csv_path = _write_csv(tmp_path / "vggsound.csv", "\n".join([
        'aaaaaaaaaaa,10,"hammering, nailing",train',   # quoted label with a comma
        "bbbbbbbbbbb,0,dog barking,test",              # .mkv clip
        "ccccccccccc,5,people clapping,train",         # .webm clip
        "ddddddddddd,7,cat meowing,train",             # missing file
        "aaaaaaaaaaa,10,hammering,train",              # duplicate id
        "eeeeeeeeeee,abc,car engine,train",            # non-numeric start
        "only,two",                                    # too few fields
        "fffffffffff,3,wind,validation",               # unknown split
        "",                                            # blank line: not an item
        "ggg/../x,1,label,train",                      # unsafe id
        "hhhhhhhhhhh,4,engine, idling,train",          # unquoted comma label: recoverable
    ]) + "\n")
    rows = vggsound_rows(csv_path, video)
    assert len(rows) == 10
    by_line = {r["line"]: r for r in rows}
    assert by_line[1]["label"] == "hammering, nailing" and by_line[1]["status"] == ""
    assert by_line[2]["video_path"].endswith(".mkv") and by_line[3]["video_path"].endswith(".webm")
    assert by_line[4]["status"] == "failed" and by_line[4]["reason"].startswith("missing_file")
    assert by_line[5]["status"] == "failed" and by_line[5]["reason"].startswith("duplicate_id")
    for line in (6, 7, 8, 10):
        assert by_line[line]["status"] == "failed" and by_line[line]["reason"].startswith("bad_csv_row"), line
    assert by_line[11]["label"] == "engine, idling" and by_line[11]["reason"].startswith("missing_file")
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys)
    assert all(is_safe(k) and "." not in k and "/" not in k for k in keys)


def test_exclude_ids_marks_test_leak(tmp_path):
    excluded = load_excluded_ids(FIXTURES / "vggsound.csv")
    assert "-26aVYRtEAc" in excluded and len(excluded) == 5
    rows = vggsound_rows(FIXTURES / "vggsound.csv", FIXTURES / "video", excluded=excluded)
    assert {(r["status"], r["reason"]) for r in rows} == {("filtered", "test_leak")}
    plain = _write_csv(tmp_path / "ids.txt", "# evaluation ids\n0Bp8c3PfAAA\n")
    assert load_excluded_ids(plain) == {"0Bp8c3PfAAA"}


def test_windows_cover_long_videos():
    signal = SignalConfig()
    assert windows_for(7.0, signal, WindowConfig()) == [(0.0, 7.0)]
    assert windows_for(10.0, signal, WindowConfig()) == [(0.0, 10.0)]
    assert windows_for(27.0, signal, WindowConfig()) == [(0.0, 10.0), (10.0, 10.0), (20.0, 7.0)]
    assert windows_for(23.0, signal, WindowConfig()) == [(0.0, 10.0), (10.0, 10.0)]
    assert windows_for(25.0, signal, WindowConfig(stride_s=5)) == [(0.0, 10.0), (5.0, 10.0), (10.0, 10.0), (15.0, 10.0)]
    with pytest.raises(ValueError):
        WindowConfig(stride_s=0)


def test_youtube_rows_windows_sidecars_and_broken_files(tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(FIXTURES / "video" / "-yoaSondvkw_000071.mp4", tmp_path / "a" / "Squash rally [abcdefghijk].mp4")
    shutil.copy(FIXTURES / "video" / "0DCit2EBtjs_000030.mp4", tmp_path / "b.mp4")
    (tmp_path / "b.info.json").write_text(json.dumps({"id": "BBBBBBBBBBB", "title": "Guitar", "tags": ["music", "live"]}))
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    rows = youtube_rows(tmp_path, excluded={"BBBBBBBBBBB"})
    by_id = {r["youtube_id"]: r for r in rows}
    assert len(rows) == 3
    assert by_id["abcdefghijk"]["status"] == "" and by_id["abcdefghijk"]["duration_s"] == pytest.approx(10.04, abs=0.05)
    assert by_id["BBBBBBBBBBB"]["caption"] == "Guitar (music, live)"
    assert by_id["BBBBBBBBBBB"]["status"] == "filtered" and by_id["BBBBBBBBBBB"]["reason"] == "test_leak"
    assert by_id["broken"]["status"] == "failed" and by_id["broken"]["reason"].startswith("decode_error")


def test_any_malformed_record_is_one_bad_row_with_its_physical_line(tmp_path):
    """nan/inf/1e400 starts, bytes that are not UTF-8, an oversized field, a BOM, multi-line labels:
    each record is one row at the physical line it starts on, and the lines after it still count."""
    video = tmp_path / "video"
    video.mkdir()
    shutil.copy(FIXTURES / "video" / "-26aVYRtEAc_000030.mp4", video / "aaaaaaaaaaa_000010.mp4")
    lines = [
        b"\xef\xbb\xbfaaaaaaaaaaa,10,dog barking,train",      # 1: BOM before the first record
        b"bbbbbbbbbbb,nan,cat,train",                         # 2
        b"ccccccccccc,inf,cat,train",                         # 3
        b"ddddddddddd,1e400,cat,train",                       # 4
        b"eeeeeeeeeee,5,caf\xe9 noise,train",                 # 5: Latin-1 byte
        b'fffffffffff,6,"two\nline label",train',             # 6-7: one record over two lines
        b"ggggggggggg,7," + b"x" * 140000 + b",train",       # 8: a field over 131072 characters
        b"hhhhhhhhhhh,99999999999999999999,cat,train",        # 9: exact integer, no float rounding
        b"iiiiiiiiiii,-inf,cat,train",                        # 10
        b"jjjjjjjjjjj,3.0,cat,train",                         # 11: an integral decimal is accepted
    ]
    csv_path = tmp_path / "vggsound.csv"
    csv_path.write_bytes(b"\n".join(lines) + b"\n")
    rows = vggsound_rows(csv_path, video)
    by_line = {r["line"]: r for r in rows}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    assert by_line[1]["key"] == "vggsound-aaaaaaaaaaa-000010" and by_line[1]["status"] == ""
    for line in (2, 3, 4, 5, 8, 10):
        assert by_line[line]["status"] == "failed" and by_line[line]["reason"].startswith("bad_csv_row"), line
    assert "UTF-8" in by_line[5]["reason"] and "field" in by_line[8]["reason"]
    assert by_line[6]["label"] == "two\nline label" and by_line[6]["reason"].startswith("missing_file")
    assert by_line[9]["key"] == "vggsound-hhhhhhhhhhh-99999999999999999999"
    assert by_line[9]["video_path"].endswith("hhhhhhhhhhh_99999999999999999999.mp4")
    assert by_line[11]["start_s"] == 3.0
    assert len({r["key"] for r in rows}) == len(rows)


def test_excluded_ids_survive_a_bom_and_bad_bytes(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(b"\xef\xbb\xbf0Bp8c3PfAAA\nbad\xff\n")
    assert "0Bp8c3PfAAA" in load_excluded_ids(path)
