"""bench/speech_rules.py: the VAD against the CLAP speech rule, refusing random CLAP weights."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "tests" / "data" / "vggsound" / "video" / "-BAKe6QGTUk_000030.mp4"  # a drum kit, no voice


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("speech_rules", ROOT / "bench" / "speech_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    shutil.copy(CLIP, folder / CLIP.name)
    return folder


def test_random_clap_is_refused_then_labelled_meaningless(bench, one_clip, tiny_clap_dir, tmp_path, capsys):
    args = ["--clap-model", str(tiny_clap_dir), "--clips", str(one_clip), "--snrs", "0"]
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert "not the released LAION-CLAP" in err and "projection_dim = 16 (the release has 512)" in err
    assert bench.main(args + ["--allow-random-weights", "--json", str(tmp_path / "t.json")]) == 0
    assert bench.MEANINGLESS in capsys.readouterr().out
    figures = json.loads((tmp_path / "t.json").read_text())
    assert figures["meaningless_clap"] is True
    tables = figures["tables"]
    assert tables["as is"]["vad_speech"] == 0 and tables["speech 0 dB"]["vad_speech"] == 1  # the real VAD
    assert tables["all"]["windows"] == tables["all"]["decided_by_both"] == 2
    t = tables["all"]
    assert t["both_speech"] + t["vad_only"] + t["clap_only"] + t["neither"] == 2


def test_ledger_scores_are_compared_and_a_missing_clap_side_is_said(bench, tmp_path, capsys):
    rows = pd.DataFrame({"key": ["a", "b", "c", "d"], "source": "youtube", "status": ["ok", "filtered", "ok", "failed"],
                         "reason": ["", "speech", "", "decode_error"], "speech_share": [0.1, 0.9, 0.2, None],
                         "speech_run_s": [0.5, 6.0, 4.5, None]})
    Ledger(tmp_path).write_final(rows, {"clap": {"clap_skipped": True}})
    assert bench.main(["--ledger", str(tmp_path / "ledger.parquet"), "--json", str(tmp_path / "t.json")]) == 0
    assert "CLAP side not measured: it needs the released LAION-CLAP weights" in capsys.readouterr().out
    t = json.loads((tmp_path / "t.json").read_text())["tables"]["all"]
    assert (t["windows"], t["vad_speech"], t["decided_by_both"], t["agreement"]) == (3, 2, 0, None)
    scored = rows.assign(speech_score=[0.1, 0.5, 0.4, None], event_score=[0.3, 0.2, 0.1, None])
    decided = bench.decide(scored.iloc[:3], bench.SpeechMusicConfig())
    assert list(decided["vad"]) == [False, True, True] and list(decided["clap"]) == [False, True, True]
    assert bench.confusion(decided)["agreement"] == 1.0
