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


def test_truncated_or_empty_part_is_set_aside_and_its_rows_recomputed(tmp_path):
    import pytest

    ledger = Ledger(tmp_path)
    ledger.append([_row("a", av=0.5)])
    ledger.append([_row("b", av=0.5)])
    ledger.append([_row("c", av=0.5)])
    parts = sorted((tmp_path / "ledger.parts").glob("part-*.parquet"))
    parts[1].write_bytes(parts[1].read_bytes()[:50])  # a power loss tore this one
    parts[2].write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="set aside"):
        assert Ledger(tmp_path).done_keys() == {"a"}
    assert sorted(p.name for p in (tmp_path / "ledger.parts").glob("*.corrupt")) == sorted(
        p.name + ".corrupt" for p in parts[1:])
    again = Ledger(tmp_path)
    again.append([_row("b", av=0.7)])
    assert again.read_journal().set_index("key")["av_align"].to_dict() == {"a": 0.5, "b": 0.7}


def test_latest_record_follows_run_sequence_not_wall_clock(tmp_path, monkeypatch):
    """A writer whose clock is behind (skew between workers) still wins when it wrote later."""
    import time

    clock = iter([2_000_000_000.0, 1_000_000_000.0, 500_000_000.0])
    monkeypatch.setattr(time, "time", lambda: next(clock, 100.0))
    monkeypatch.setattr(pd.Timestamp, "now", classmethod(lambda cls, tz=None: pd.Timestamp(time.time(), unit="s", tz=tz)))
    Ledger(tmp_path).append([_row("a", av=0.1)])
    Ledger(tmp_path).append([_row("a", av=0.2)])  # a later run, with an earlier clock
    later = Ledger(tmp_path)
    later.append([_row("a", av=0.3)])
    later.append([_row("b", av=0.3)])
    assert later.read_journal().set_index("key").loc["a", "av_align"] == 0.3


def test_compaction_merges_parts_keeping_the_latest_records(tmp_path):
    ledger = Ledger(tmp_path, compact_every=4)
    for i in range(10):
        ledger.append([_row(f"k{i % 6}", av=i / 10)])
    parts = list((tmp_path / "ledger.parts").glob("part-*.parquet"))
    assert len(parts) < 10  # compacted during the run, after every 4 parts
    merged = ledger.compact()
    assert len(list((tmp_path / "ledger.parts").glob("part-*.parquet"))) == 1
    assert merged.set_index("key")["av_align"].to_dict() == {f"k{i}": (i + 6) / 10 if i < 4 else i / 10
                                                             for i in range(6)}
    resumed = Ledger(tmp_path)
    resumed.append([_row("k0", av=0.99)])  # a later run still wins over the compacted part
    assert resumed.read_journal().set_index("key").loc["k0", "av_align"] == 0.99


def test_read_ledger_checks_columns_and_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from pipeline.ledger import LedgerError

    pq.write_table(pa.table({"key": ["a"], "status": ["ok"]}), tmp_path / "partial.parquet")
    with pytest.raises(LedgerError, match="missing columns.*video_path"):
        read_ledger(tmp_path / "partial.parquet")
    table = pa.table({c: ["x"] for c in COLUMNS}).replace_schema_metadata(
        {b"v2a_run": b'{"ledger_format": "v2a-ledger/9"}'})
    pq.write_table(table, tmp_path / "future.parquet")
    with pytest.raises(LedgerError, match="v2a-ledger/9"):
        read_ledger(tmp_path / "future.parquet")
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LedgerError, match="not a readable ledger"):
        read_ledger(tmp_path / "torn.parquet")
