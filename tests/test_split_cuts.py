"""``--split-at-cuts``: a window with a real hard cut becomes its parts, each scored like any window."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import pipeline.clean_stages as clean_stages
from core.keys import is_safe
from filters.curation import CurationConfig, split_parts
from pipeline.clean import main, plan_resume
from pipeline.clean_stages import CleanStageConfig, DecodeScoreStage
from pipeline.ledger import current_rows, read_ledger
from test_curation import _concat_of_two_real_clips

SCORES = ("av_align", "av_align_2023", "audio_peaks", "video_peaks", "speech_share", "speech_run_s", "peak_db",
          "rms_db", "silent_share", "motion_max", "motion_mean", "duration_s")


@pytest.fixture(scope="module")
def cut_clip(tmp_path_factory):
    """10 s: a real guitar clip, then a hard cut at 4 s to another real guitar clip."""
    folder = tmp_path_factory.mktemp("cutclip")
    return _concat_of_two_real_clips(folder / "cutclip.mkv", cut_s=4.0)


def _row(path, start=0.0, duration=None, key="k"):
    return {"key": key, "video_path": str(path), "source": "youtube", "youtube_id": "cutclip", "label": "",
            "caption": "a guitar", "split": "train", "line": None, "start_s": start, "duration_s": duration,
            "status": "", "reason": ""}


def test_split_parts_between_cuts():
    assert split_parts([4.0], 10.0, 3.0) == [(0.0, 4.0), (4.0, 10.0)]
    assert split_parts([4.0], 10.0, 5.0) == [(4.0, 10.0)]
    assert split_parts([2.0, 7.5], 10.0, 5.0) == [(2.0, 7.5)]
    assert split_parts([1.0, 9.0], 10.0, 9.0) == []
    with pytest.raises(ValueError, match="split_min_s"):
        CurationConfig(split_min_s=0)


def test_parts_are_scored_from_one_decode_like_separately_decoded_windows(cut_clip, monkeypatch):
    calls = []
    real_decode = clean_stages.decode
    monkeypatch.setattr(clean_stages, "decode", lambda *a, **k: calls.append(a[0]) or real_decode(*a, **k))
    split = DecodeScoreStage(CleanStageConfig(curation=CurationConfig(split_at_cuts=True, split_min_s=3.0)))
    split.setup()
    window, first, second = split.process_batch([_row(cut_clip)])
    assert len(calls) == 1  # the parts are cut from the arrays of the one decode
    assert window["status"] == "filtered" and window["reason"].startswith("split_at_cuts: 2 part(s)")
    assert window["scene_cuts"] == [pytest.approx(4.0, abs=0.04)] and window["av_align"] is not None
    assert [r["key"] for r in (first, second)] == ["k-at000000ms", "k-at004000ms"]
    assert all(is_safe(r["key"]) and r["parent_key"] == "k" and r["status"] == "ok" for r in (first, second))
    assert (first["start_s"], second["start_s"]) == (0.0, pytest.approx(4.0, abs=0.04))
    assert first["caption"] == "a guitar" and second["youtube_id"] == "cutclip"
    plain = DecodeScoreStage(CleanStageConfig())
    plain.setup()
    for part in (first, second):
        alone = plain.process_batch([_row(cut_clip, part["start_s"], part["duration_s"])])[0]
        assert part["scene_cuts"] == [] == alone["scene_cuts"]
        for name in SCORES:
            assert part[name] == pytest.approx(alone[name], abs=1e-6), name
    assert first["speech_share"] != second["speech_share"] or first["motion_max"] != second["motion_max"]
    # the default minimum (5 s) keeps only the 6 s part; a cut-free window is never split
    default = DecodeScoreStage(CleanStageConfig(curation=CurationConfig(split_at_cuts=True)))
    default.setup()
    rows = default.process_batch([_row(cut_clip), _row(cut_clip, 5.0, 5.0, key="later")])
    assert [r["key"] for r in rows] == ["k", "k-at004000ms", "later"]
    assert rows[0]["reason"] == "split_at_cuts: 1 part(s) >= 5s" and rows[2]["status"] == "ok"


def _clean(root, out, *extra):
    return main(["--dataset", "youtube", "--root", str(root), "--out", str(out), "--clap-model", "none",
                 "--workers", "1", *extra])


@pytest.mark.slow  # one clean run that scores, three that stop before decoding
def test_clean_splits_resumes_and_refuses_to_mix_split_settings(cut_clip, tmp_path, capsys):
    root, out = cut_clip.parent, tmp_path / "out"
    assert _clean(root, out, "--split-at-cuts", "--split-min-s", "3") == 0
    ledger, meta = read_ledger(out / "ledger.parquet")
    window = ledger[ledger["parent_key"] == ""].iloc[0]
    parts = ledger[ledger["parent_key"] == window["key"]]
    assert window["status"] == "filtered" and window["reason"].startswith("split_at_cuts")
    assert len(parts) == 2 and set(parts["status"]) == {"ok"} and meta["reasons"]["split_at_cuts"] == 1
    assert meta["curation"]["split_at_cuts"] is True and meta["counts"]["total"] == 3
    capsys.readouterr()
    assert _clean(root, out, "--split-at-cuts", "--split-min-s", "3") == 0  # resumes: nothing decoded
    assert "resuming: 1 of 1 items" in capsys.readouterr().out
    again, _ = read_ledger(out / "ledger.parquet")
    pd.testing.assert_frame_equal(again, ledger)
    assert _clean(root, out, "--split-at-cuts", "--split-min-s", "5") == 2  # other parts: refuses
    assert "split_min_s" in capsys.readouterr().err
    assert _clean(root, out) == 2  # not splitting any more: refuses too (--rescore redoes the window whole)
    assert json.loads((out / "run.json").read_text())["counts"]["total"] == 3


def test_resume_redoes_a_window_whose_part_failed_retryably():
    scan = pd.DataFrame({"key": ["w", "w-at000000ms", "w-at004000ms", "v"],
                         "status": ["filtered", "ok", "failed", "ok"],
                         "reason": ["split_at_cuts: 2 part(s) >= 3s", "", "stage_error: clap: boom", ""],
                         "settings_fp": ["fp"] * 4, "parent_key": ["", "w", "w", ""]})
    rows = [{"key": "w", "status": ""}, {"key": "v", "status": ""}]
    assert plan_resume(rows, scan, "fp") == ([], [rows[0]])
    # parts of a split made with other settings, or of a window no longer split, are not current
    stale = scan.assign(settings_fp=["fp", "old", "old", "fp"])
    assert list(current_rows(stale, {"w", "v"}, "fp")["key"]) == ["w", "v"]
    assert list(current_rows(scan, {"w", "v"}, "fp")["key"]) == ["w", "v", "w-at000000ms", "w-at004000ms"]
