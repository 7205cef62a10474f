"""Run report: self-contained page with counts, histograms, keep rates, parameters; CLAP-skipped notice."""
from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.report import keep_rates, write_report

META = {
    "dataset": "vggsound",
    "thresholds": {"clap_min": 0.3, "av_align_min": 0.2},
    "clap_model": "laion/clap-htsat-unfused",
    "clap_template": "the sound of {label}",
    "av_align_mode": "fast",
    "runner": "local",
}


def _row(i, label, status, reason="", clap=np.nan, av=np.nan, speech=np.nan, music=np.nan):
    return {"key": f"vggsound-id{i}-000030", "label": label, "status": status, "reason": reason,
            "clap_score": clap, "av_align": av, "speech_score": speech, "music_score": music,
            "event_score": clap, "duration_s": 10.0}


def _ledger() -> pd.DataFrame:
    rows = []
    i = 0
    # "dog barking": 4 of 4 kept; "<script>alert(1)</script>": 1 of 4; "$5 coin spinning": 0 of 2 + 1 failed
    for _ in range(4):
        rows.append(_row(i := i + 1, "dog barking", "ok", clap=0.55, av=0.4, speech=0.1, music=0.05))
    rows.append(_row(i := i + 1, "<script>alert(1)</script>", "ok", clap=0.45, av=0.3))
    for _ in range(3):
        rows.append(_row(i := i + 1, "<script>alert(1)</script>", "filtered", "clap<0.3", clap=0.1, av=0.5))
    rows.append(_row(i := i + 1, "$5 coin spinning", "filtered", "av_align<0.2", clap=0.4, av=0.05))
    rows.append(_row(i := i + 1, "$5 coin spinning", "filtered", "clap<0.3", clap=0.2, av=0.1))
    rows.append(_row(i := i + 1, "$5 coin spinning", "failed", "decode_error: moov atom not found"))
    rows.append(_row(i := i + 1, "", "failed", "bad_csv_row"))
    return pd.DataFrame(rows)


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"<h2>(.*?)</h2>", page)
    return {parts[k]: parts[k + 1] for k in range(1, len(parts) - 1, 2)}


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_contents(tmp_path):
    df = _ledger()
    path = write_report(df, META, tmp_path / "report.html")
    assert path == tmp_path / "report.html"
    page = path.read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)  # self-contained
    images = _pngs(page)
    assert len(images) >= 4  # reasons, CLAP histogram, AV-Align histogram, keep rates (+ speech/music)
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 1000 for img in images)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "CLAP was skipped" not in page

    s = _sections(page)
    assert re.search(r"<td>ok</td><td class='num'>5</td>", s["Counts by status"])
    assert re.search(r"<td>filtered</td><td class='num'>5</td>", s["Counts by status"])
    assert re.search(r"<td>failed</td><td class='num'>2</td>", s["Counts by status"])
    reasons = s["Counts by reason"]
    assert "<td>filtered</td><td>clap&lt;0.3</td><td class='num'>4</td>" in reasons
    assert "<td>filtered</td><td>av_align&lt;0.2</td><td class='num'>1</td>" in reasons
    assert "decode_error: moov atom not found" in reasons and "bad_csv_row" in reasons

    scores = s["Score distributions"]
    assert "CLAP score" in scores and "AV-Align" in scores and "speech score" in scores
    assert "10 scored, 2 missing" in scores  # CLAP: the two failed rows have no score
    assert "6 above the threshold 0.3" in scores and "8 above the threshold 0.2" in scores

    labels = s["Keep rate per label"]
    top, bottom = labels.split("Bottom")
    assert top.index("dog barking") < top.index("&lt;script&gt;")
    assert "100%" in top and "25%" in top
    assert bottom.index("$5 coin spinning") < bottom.index("dog barking")
    assert "0%" in bottom

    params = s["Run parameters"]
    for text in ("thresholds.clap_min", "0.3", "the sound of {label}", "laion/clap-htsat-unfused", "fast", "local"):
        assert text in params


def test_keep_rate_excludes_failed_rows():
    rates = keep_rates(_ledger()).set_index("label")
    assert rates.loc["dog barking", "keep_rate"] == 1.0
    assert rates.loc["<script>alert(1)</script>", "keep_rate"] == 0.25
    assert rates.loc["$5 coin spinning", ["rows", "ok", "filtered", "failed"]].tolist() == [3, 0, 2, 1]
    assert rates.loc["$5 coin spinning", "keep_rate"] == 0.0
    assert "" not in rates.index  # rows without a label are not a class


def test_clap_skipped_is_said_at_the_top(tmp_path):
    df = _ledger()
    df[["clap_score", "speech_score", "music_score", "event_score"]] = np.nan
    meta = dict(META, clap_model="none", clap_skipped=True)
    page = write_report(df, meta, tmp_path / "report.html").read_text()
    notice = page.index("CLAP was skipped")
    assert notice < page.index("<h2>")
    assert "clap_score is missing for every row" in page
    scores = _sections(page)["Score distributions"]
    assert "CLAP skipped (--clap-model none): no scores." in scores
    assert "AV-Align" in scores and len(_pngs(scores)) == 1  # only AV-Align is drawn


def test_model_given_but_nothing_scored_is_said(tmp_path):
    df = _ledger()
    df["status"], df["reason"], df["clap_score"] = "failed", "missing_file", np.nan
    page = write_report(df, META, tmp_path / "r.html").read_text()
    assert "No CLAP score was computed" in page


@pytest.mark.parametrize("df", [pd.DataFrame(), pd.DataFrame(columns=["key", "label", "status", "reason",
                                                                        "clap_score", "av_align"])])
def test_empty_ledger(tmp_path, df):
    page = write_report(df, {}, tmp_path / "out" / "report.html").read_text()
    assert "The ledger is empty" in page and "No run metadata was recorded" in page
    assert "No row was filtered or failed" in page


def test_youtube_without_labels(tmp_path):
    df = _ledger()
    df["label"] = ""
    page = write_report(df, dict(META, dataset="youtube"), tmp_path / "report.html").read_text()
    assert "No labelled row was scored" in _sections(page)["Keep rate per label"]
    assert "Clean run report: youtube" in page


@pytest.mark.parametrize("meta", [
    {"clap": None, "clap_skipped": True},
    {"clap": {"clap_model": "none", "clap_skipped": True}},
    {"clap_model": "none"},
])
def test_skip_is_recognised_however_the_run_records_it(tmp_path, meta):
    df = _ledger().assign(clap_score=np.nan)
    page = write_report(df, dict(meta, filters={"clap_min": 0.3, "av_align_min": 0.2}),
                        tmp_path / "report.html").read_text()
    assert page.index("CLAP was skipped") < page.index("<h2>")
    assert "8 above the threshold 0.2" in page  # thresholds read from the "filters" section


def test_av_align_revision_and_disagreements_are_shown(tmp_path):
    df = _ledger()
    df["av_align_2023"] = df["av_align"]
    df["av_align_2025"] = df["av_align"]
    df.loc[0, "av_align_2025"] = 0.15  # the revisions disagree on one clip at 0.2
    page = write_report(df, {**META, "av_align_version": "2023"}, tmp_path / "report.html").read_text()
    scores = _sections(page)["Score distributions"]
    assert "AV-Align (2023 revision)" in scores and "Filtered on the <b>2023</b> revision" in scores
    assert "<td>2025</td><td class='num'>7</td><td class='num'>10</td>" in scores
    assert "<td>2023</td><td class='num'>8</td><td class='num'>10</td>" in scores
    assert "disagree on 1 of 10 scored clips" in scores
    # without the per-revision columns (an older ledger) the revision is still named
    old = write_report(_ledger(), {**META, "av_align": {"version": "2025"}}, tmp_path / "old.html").read_text()
    assert "Filtered on the <b>2025</b> revision" in old and "disagree" not in old
