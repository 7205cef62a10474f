"""The ledger journal and the threshold rules ("score once, filter many")."""
import math

import pandas as pd

from filters.rules import FilterConfig, apply_filters
from pipeline.ledger import COLUMNS, Ledger, read_ledger


def _row(key, status="ok", reason="", clap=None, av=None):
    return {"key": key, "source": "vggsound", "status": status, "reason": reason, "clap_score": clap, "av_align": av,
            "label": "dog barking", "split": "train", "start_s": 0.0, "duration_s": 10.0}


def test_journal_appends_resume_and_dedupes(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append([_row("a", av=0.5), _row("b", status="failed", reason="decode_error: x")])
    ledger.append([_row("a", av=0.6)])  # re-journaled key: last record wins
    assert ledger.done_keys() == {"a", "b"}
    journal = ledger.read_journal()
    assert list(journal.columns) == COLUMNS and len(journal) == 2
    assert journal.set_index("key").loc["a", "av_align"] == 0.6
    assert not list(tmp_path.glob("ledger.parts/.*tmp"))  # no temporary files left behind
    again = Ledger(tmp_path)  # a new process sees the same journal
    assert again.done_keys() == {"a", "b"}
    again.append([_row("c", status="failed", reason="decode_timeout: exceeded 120s"),
                  _row("d", status="failed", reason="stage_error: clap: RuntimeError: CUDA out of memory")])
    assert again.done_keys() == {"a", "b"}  # transient failures are retried on resume
    again.append([_row("c", av=0.4)])
    assert again.done_keys() == {"a", "b", "c"}


def test_thresholds_reapplied_from_stored_scores(tmp_path):
    journal = pd.DataFrame([
        _row("keep", clap=0.5, av=0.5),
        _row("low_av", clap=0.5, av=0.2),       # strict: 0.2 is not > 0.2
        _row("low_both", clap=0.1, av=0.05),
        _row("no_clap", clap=math.nan, av=0.9),  # missing score never filters
        _row("leak", status="filtered", reason="test_leak", av=0.9),
        _row("broken", status="failed", reason="no_audio_stream"),
        {**_row("web", clap=0.05, av=0.5), "label": "", "source": "youtube"},  # title score never decides
    ])
    out = apply_filters(journal, FilterConfig()).set_index("key")
    assert out.loc["keep", "status"] == "ok" and out.loc["keep", "reason"] == ""
    assert (out.loc["low_av", "status"], out.loc["low_av", "reason"]) == ("filtered", "av_align<0.2")
    assert out.loc["low_both", "reason"] == "clap<0.3,av_align<0.2"
    assert out.loc["no_clap", "status"] == "ok"
    assert (out.loc["leak", "status"], out.loc["leak", "reason"]) == ("filtered", "test_leak")
    assert (out.loc["broken", "status"], out.loc["broken", "reason"]) == ("failed", "no_audio_stream")
    assert out.loc["web", "status"] == "ok"
    looser = apply_filters(journal, FilterConfig(av_align_min=0.1, clap_min=0.0)).set_index("key")
    assert looser.loc["low_av", "status"] == "ok" and looser.loc["low_both", "reason"] == "av_align<0.1"


def test_final_ledger_sorted_with_metadata(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append([_row("b", av=0.5), _row("a", av=0.5)])
    ledger.write_final(ledger.read_journal(), {"filters": {"av_align_min": 0.2}})
    df, meta = read_ledger(tmp_path / "ledger.parquet")
    assert list(df["key"]) == ["a", "b"] and meta["filters"]["av_align_min"] == 0.2
    assert (tmp_path / "run.json").exists()
