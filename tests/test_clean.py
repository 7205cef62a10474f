"""`python -m pipeline.clean` end to end on the generated sample: every row accounted for."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.clean import main
from core.keys import is_safe
from pipeline.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[1]


def _clean(sample_root: Path, out: Path, *extra: str) -> int:
    return main(["--dataset", "sample", "--root", str(sample_root), "--out", str(out), "--clap-model", "none",
                 "--workers", "2", "--batch-size", "2", *extra])


@pytest.fixture(scope="module")
def clean_out(sample_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    assert _clean(sample_root, out) == 0
    return out


def _expectations(sample_root: Path) -> dict[int, dict]:
    manifest = json.loads((sample_root / "sample_manifest.json").read_text())
    return {r["csv_line"]: r for r in manifest["rows"]}


@pytest.mark.slow
def test_every_csv_line_has_one_row_with_the_expected_outcome(clean_out, sample_root):
    ledger, meta = read_ledger(clean_out / "ledger.parquet")
    expected = _expectations(sample_root)
    assert sorted(ledger["line"]) == sorted(expected)  # one row per line, nothing lost
    assert ledger["key"].is_unique and all(is_safe(k) for k in ledger["key"])
    for _, row in ledger.iterrows():
        exp = expected[row["line"]]
        if exp["expect"] == "ok":
            assert row["status"] in ("ok", "filtered"), (exp, row["reason"])
            expected_reasons = set(exp["expect_curation"]) | ({"av_align<0.2"} if exp["expect_av_align"] == "low" else set())
            assert set(filter(None, row["reason"].split(","))) == expected_reasons, (exp, row["reason"])
            if exp["expect_av_align"] == "high":
                assert row["av_align"] > 0.5 and row["status"] == "ok", (exp, row["av_align"])
            else:
                assert row["av_align"] < 0.2 and row["status"] == "filtered", (exp, row["av_align"])
        else:
            assert row["status"] == "failed", exp
            assert row["reason"].startswith(exp["expect"]), (exp, row["reason"])
    assert ledger["clap_score"].isna().all() and meta["clap_skipped"] is True


@pytest.mark.slow
def test_untrimmed_file_is_cut_to_its_window(clean_out, sample_root):
    ledger, _ = read_ledger(clean_out / "ledger.parquet")
    exp = next(r for r in _expectations(sample_root).values() if r["kind"] == "untrimmed")
    row = ledger[ledger["line"] == exp["csv_line"]].iloc[0]
    assert row["start_s"] == exp["start_seconds"] and row["duration_s"] == pytest.approx(10.0, abs=0.05)


@pytest.mark.slow
def test_rerun_with_new_thresholds_rescoring_nothing(clean_out, sample_root, capsys):
    before, _ = read_ledger(clean_out / "ledger.parquet")
    parts_before = sorted(p.name for p in (clean_out / "ledger.parts").iterdir())
    assert _clean(sample_root, clean_out, "--av-align-min", "-1") == 0
    assert "this run: 0 clips" in capsys.readouterr().out
    assert sorted(p.name for p in (clean_out / "ledger.parts").iterdir()) == parts_before
    after, meta = read_ledger(clean_out / "ledger.parquet")
    assert meta["filters"]["av_align_min"] == -1.0
    pd.testing.assert_series_equal(before["av_align"], after["av_align"])
    assert "av_align<0.2" not in set(after["reason"])
    assert (after["status"] == "ok").sum() > (before["status"] == "ok").sum()
    assert _clean(sample_root, clean_out) == 0  # and back


def test_switching_av_align_revision_refilters_without_rescoring(clean_out, sample_root, capsys):
    before, meta_before = read_ledger(clean_out / "ledger.parquet")
    assert meta_before["av_align_version"] == "2025" and meta_before["av_align"]["version"] == "2025"
    assert meta_before["av_align_revisions"]["2023"] == {"peak_floor": None, "one_to_one": False}
    scored = before[before["av_align"].notna()]
    assert len(scored) and scored["av_align_2023"].notna().all() and scored["video_peaks_2023"].notna().all()
    assert (scored["av_align"] == scored["av_align_2025"]).all()
    assert (scored["video_peaks"] == scored["video_peaks_2025"]).all()
    assert "2025 revision" in (clean_out / "report.html").read_text()
    parts_before = sorted(p.name for p in (clean_out / "ledger.parts").iterdir())
    assert _clean(sample_root, clean_out, "--av-align-version", "2023") == 0
    assert "this run: 0 clips" in capsys.readouterr().out
    assert sorted(p.name for p in (clean_out / "ledger.parts").iterdir()) == parts_before
    after, meta = read_ledger(clean_out / "ledger.parquet")
    assert meta["av_align_version"] == "2023"
    assert json.loads((clean_out / "run.json").read_text())["av_align_version"] == "2023"
    rescored = after[after["av_align"].notna()]
    assert (rescored["av_align"] == rescored["av_align_2023"]).all()
    pd.testing.assert_series_equal(before["av_align_2023"], after["av_align_2023"])
    dropped = ["av_align<0.2" in reason.split(",") for reason in rescored["reason"]]
    assert dropped == list(rescored["av_align_2023"] <= 0.2)
    assert "2023 revision" in (clean_out / "report.html").read_text()
    assert _clean(sample_root, clean_out) == 0  # and back
    pd.testing.assert_frame_equal(read_ledger(clean_out / "ledger.parquet")[0], before)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_ledger(clean_out, sample_root, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.clean", "--dataset", "sample", "--root", str(sample_root),
           "--out", str(out), "--clap-model", "none", "--workers", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "ledger.parts"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    journaled = len(list(parts.glob("part-*.parquet")))
    assert 5 <= journaled and not (out / "ledger.parquet").exists()
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    a, _ = read_ledger(clean_out / "ledger.parquet")
    b, _ = read_ledger(out / "ledger.parquet")
    cols = ["key", "status", "reason", "av_align", "audio_peaks", "video_peaks", "start_s", "duration_s"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_missing_root_says_where_it_looked(tmp_path, capsys):
    code = main(["--dataset", "vggsound", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2 and "nowhere" in capsys.readouterr().err


PROJECT_PACKAGES = ("core", "pipeline", "filters", "augment", "shards", "train")


def forbid_decoding(monkeypatch) -> list[str]:
    """Make ``core.decode.decode``/``probe`` raise wherever a project module bound them by name
    (``from core.decode import decode`` copies the reference, so patching ``core.decode`` alone
    intercepts nothing); returns the patched names."""
    import core.decode

    def no_decoding(*a, **k):
        raise AssertionError("decoding started although the CLAP model is missing")

    originals = {"decode": core.decode.decode, "probe": core.decode.probe}
    patched = []
    for name, module in sorted(sys.modules.items()):
        if module is None or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        for attr, original in originals.items():
            if getattr(module, attr, None) is original:
                monkeypatch.setattr(module, attr, no_decoding)
                patched.append(f"{name}.{attr}")
    return patched


def test_the_decoding_guard_intercepts_the_clean_stages(sample_root, monkeypatch):
    """The guard below must catch a decode by the clean stages in this process (the driver, where every
    check before decoding runs; the local runner's workers are separate processes, so the tests that
    use the guard also check that nothing was journaled)."""
    from pipeline.clean_stages import CleanStageConfig, build_clean_stages
    from pipeline.manifest import vggsound_rows
    from pipeline.runners import run_chain

    patched = forbid_decoding(monkeypatch)
    assert {"pipeline.clean_stages.decode", "pipeline.clean_stages.probe", "core.decode.decode"} <= set(patched)
    rows = [r for r in vggsound_rows(sample_root / "vggsound.csv", sample_root / "video") if not r["status"]][:3]
    done = run_chain(build_clean_stages(CleanStageConfig()), rows)
    assert len(done) == 3 and all("decoding started" in r["reason"] for r in done), [r["reason"] for r in done]


def test_missing_clap_model_stops_before_decoding(sample_root, tmp_path, monkeypatch, capsys):
    forbid_decoding(monkeypatch)
    code = main(["--dataset", "sample", "--root", str(sample_root), "--out", str(tmp_path / "o"),
                 "--clap-model", str(tmp_path / "no-such-clap"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no-such-clap" in err and "--clap-model none" in err and "HF_HOME" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_clap_scores_real_model_folder_and_report(sample_root, tiny_clap_dir, tmp_path):
    out = tmp_path / "clap"
    assert main(["--dataset", "sample", "--root", str(sample_root), "--out", str(out), "--workers", "1",
                 "--limit", "8", "--clap-model", str(tiny_clap_dir), "--clap-template", "a recording of {label}"]) == 0
    ledger, meta = read_ledger(out / "ledger.parquet")
    scored = ledger[ledger["clap_score"].notna()]
    assert len(scored) == (ledger["av_align"].notna()).sum() > 0
    assert scored["clap_score"].between(-1, 1).all()
    assert scored[["speech_score", "music_score", "event_score"]].notna().all().all()
    assert meta["clap_skipped"] is False and meta["clap"]["clap_template"] == "a recording of {label}"
    html = (out / "report.html").read_text()
    assert "CLAP" in html and not any("CLAP" in n for n in _notices(html)), _notices(html)
    assert "CLAP skipped" not in html


def _notices(html: str) -> list[str]:
    """The plain statements the report shows at the top (``pipeline.report.notices``)."""
    return re.findall(r"<div class='notice'>(.*?)</div>", html, flags=re.S)


@pytest.mark.slow
def test_clap_none_is_said_plainly(clean_out):
    html = (clean_out / "report.html").read_text()
    notices = _notices(html)
    assert any(n.startswith("CLAP was skipped (--clap-model none): no clip was scored") for n in notices), notices
    assert "CLAP skipped (--clap-model none): no scores." in html  # and again where the scores would be
    _, meta = read_ledger(clean_out / "ledger.parquet")
    assert meta["clap_skipped"] is True


@pytest.mark.slow
def test_youtube_corpus_end_to_end_through_the_cli(youtube_root, sample_root, tiny_clap_dir, tmp_path):
    """``python -m pipeline.clean --dataset youtube`` on real files: every window of every video is a row,
    the broken download fails, the VGGSound test-split id is filtered as a leak, AV-Align tells the
    aligned videos from the shifted one, captions come from the yt-dlp sidecars, speech/music is scored."""
    from core.config import SignalConfig
    from pipeline.manifest import WindowConfig, windows_for

    out = tmp_path / "yt"
    done = subprocess.run([sys.executable, "-m", "pipeline.clean", "--dataset", "youtube", "--root", str(youtube_root),
                           "--out", str(out), "--clap-model", str(tiny_clap_dir), "--clap-device", "cpu",
                           "--exclude-ids", str(sample_root / "vggsound.csv"), "--workers", "2", "--batch-size", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clean summary:" in done.stdout
    ledger, meta = read_ledger(out / "ledger.parquet")
    files = json.loads((youtube_root / "sample_manifest.json").read_text())["files"]
    assert meta["dataset"] == "youtube" and ledger["key"].is_unique and all(is_safe(k) for k in ledger["key"])
    assert set(ledger["source"]) == {"youtube"} and (ledger["label"] == "").all()
    expected_rows = 0
    for f in files:
        rows = ledger[ledger["video_path"] == str(youtube_root / f["file"])]
        if f["expect"] == "decode_error":
            assert len(rows) == 1 and rows.iloc[0]["status"] == "failed", f
            assert rows.iloc[0]["reason"].startswith("decode_error"), rows.iloc[0]["reason"]
            expected_rows += 1
            continue
        windows = windows_for(f["file_duration_s"], SignalConfig(), WindowConfig())
        expected_rows += len(windows)
        assert sorted(rows["start_s"]) == [s for s, _ in windows], f["file"]
        assert set(rows["youtube_id"]) == {f["youtube_id"]}
        assert all(f["title"] in c for c in rows["caption"]) if f["title"] else (rows["caption"] == "").all()
        if f["in_vggsound_test_split"]:
            assert set(rows["status"]) == {"filtered"} and set(rows["reason"]) == {"test_leak"}
            continue
        full = rows[rows["duration_s"] >= 10.0 - 0.05]
        assert len(full) >= 2 and full["speech_score"].notna().all()
        # the audio-text score needs a text: a video without a sidecar has no caption, so no score
        assert (full["clap_score"].notna() if f["title"] else full["clap_score"].isna()).all(), f["file"]
        if f["expect_av_align"] == "high":
            assert (full["av_align"] > 0.5).all(), (f["file"], full["av_align"].tolist())
        else:
            assert (full["av_align"] < 0.2).all(), (f["file"], full["av_align"].tolist())
    assert len(ledger) == expected_rows
    assert (out / "report.html").is_file() and "Clean run report: youtube" in (out / "report.html").read_text()


def test_rerun_with_other_scoring_settings_stops_before_decoding(clean_out, sample_root, monkeypatch, capsys):
    parts = sorted(p.name for p in (clean_out / "ledger.parts").iterdir())
    forbid_decoding(monkeypatch)
    code = _clean(sample_root, clean_out, "--av-align-mode", "reference")
    err = capsys.readouterr().err
    assert code == 2
    assert "scored with other scoring settings" in err and "av_align.mode: 'fast' -> 'reference'" in err
    assert "--rescore" in err and "--out DIR" in err
    assert sorted(p.name for p in (clean_out / "ledger.parts").iterdir()) == parts
    _, meta = read_ledger(clean_out / "ledger.parquet")
    assert meta["av_align"]["mode"] == "fast"  # run.json still describes the scores it holds


@pytest.mark.slow
def test_rescore_recomputes_rows_made_with_other_settings(sample_root, tmp_path, capsys):
    out = tmp_path / "rescore"
    assert _clean(sample_root, out, "--limit", "4") == 0
    first, meta_first = read_ledger(out / "ledger.parquet")
    capsys.readouterr()
    assert _clean(sample_root, out, "--limit", "4", "--av-align-fast-max-side", "32", "--rescore") == 0
    printed = capsys.readouterr().out
    after, meta = read_ledger(out / "ledger.parquet")
    scored = int(first["av_align"].notna().sum())
    assert scored >= 1 and f"rescoring: {scored} journaled row(s)" in printed and f"this run: {scored} clips" in printed
    assert meta["av_align"]["fast_max_side"] == 32 and meta["settings_fp"] != meta_first["settings_fp"]
    assert (after["settings_fp"] == meta["settings_fp"]).all()
    assert _clean(sample_root, out, "--limit", "4", "--av-align-fast-max-side", "32", "--clap-min", "0.5") == 0
    assert "this run: 0 clips" in capsys.readouterr().out  # a threshold change never rescores


@pytest.mark.parametrize("flag,value", [("--limit", "-3"), ("--av-align-min", "nan"), ("--av-align-min", "2"),
                                        ("--clap-min", "inf"), ("--timeout-s", "-1"), ("--workers", "-1"),
                                        ("--batch-size", "0"), ("--min-duration-s", "nan")])
def test_bad_flag_is_one_line_error_and_exit_2(flag, value, sample_root, tmp_path, monkeypatch, capsys):
    forbid_decoding(monkeypatch)
    out = tmp_path / "o"
    code = main(["--dataset", "sample", "--root", str(sample_root), "--out", str(out), "--clap-model", "none",
                 flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {flag}:"), err
    assert not out.exists()


def test_second_run_into_a_held_folder_refuses_and_a_stale_lock_is_taken_over(sample_root, tmp_path, capsys):
    import socket

    from core.lock import LOCK_NAME, FolderLock

    out = tmp_path / "locked"
    out.mkdir()
    with FolderLock(out, purpose="another clean"):
        assert _clean(sample_root, out, "--limit", "2") == 2
    err = capsys.readouterr().err
    assert f"in use by PID {os.getpid()} on this host" in err and "another clean" in err
    assert not (out / "ledger.parts").exists()  # refused before anything was written
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "command": "x"}))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        assert _clean(sample_root, out, "--limit", "2") == 0
    assert not (out / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_a_systematic_stage_error_stops_the_command_with_exit_1_and_keeps_the_journal(sample_root, tmp_path,
                                                                                      monkeypatch, capsys):
    """``python -m pipeline.clean`` where every clip but the first raises (``V2A_INJECT_FAULT``, as a
    broken library would): the breaker stops the command with exit code 1 and the first traceback; the
    journal keeps the scored clips, the manifest's decisions and the failures, and a rerun would redo
    exactly the failures."""
    from pipeline.ledger import Ledger
    from pipeline.manifest import vggsound_rows
    from pipeline.runners.faults import FAULT_ENV

    rows = vggsound_rows(sample_root / "vggsound.csv", sample_root / "video")
    pending = [r["key"] for r in rows if not r["status"]]
    good, broken = pending[:1], pending[1:]
    monkeypatch.setenv(FAULT_ENV, ",".join(f"decode_av_align:{k}" for k in broken))
    out = tmp_path / "out"
    code = main(["--dataset", "sample", "--root", str(sample_root), "--out", str(out), "--clap-model", "none",
                 "--workers", "1", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "stopped: " in err and "failed with stage_error" in err
    first = broken[0]  # one worker takes the batches in order: the first broken clip failed first
    assert f"First error: stage_error: decode_av_align: InjectedFault: {FAULT_ENV} decode_av_align:{first}" in err
    assert err.count("Traceback (most recent call last)") == 1 and "inject_faults" in err
    assert not (out / "ledger.parquet").exists()  # not finalized: the run did not finish

    journal = Ledger(out).read_journal().set_index("key")
    assert set(good) <= set(journal.index) and (journal.loc[good, "status"] != "failed").all()
    decided = [r["key"] for r in rows if r["status"]]
    assert set(decided) <= set(journal.index)  # the manifest's own failures (missing files, bad lines)
    errors = journal[journal["reason"].str.startswith("stage_error")]
    assert set(errors.index) <= set(broken) and len(pending) / 2 < len(errors) < len(broken)
    done = Ledger(out).done_keys()
    assert set(good) <= done and not done & set(broken)  # a rerun retries the failures, keeps the rest
