"""``pipeline.clean --desync-max``: DeSync scored once into the ledger, filtered many times, the
Synchformer resolved through the registry before any decoding."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_clean import forbid_decoding  # noqa: E402

from core.decode import decode  # noqa: E402
from metrics.desync import DesyncScorer, sync_request  # noqa: E402
from metrics.synchformer import Synchformer, SynchformerSize  # noqa: E402
from pipeline.clean import main  # noqa: E402
from pipeline.ledger import read_ledger  # noqa: E402

TINY = SynchformerSize(dim=32, video_depth=1, video_heads=2, audio_depth=1, audio_heads=2, sync_depth=1, sync_heads=2,
                       image_size=32)


def _clean(root: Path, out: Path, *extra: str) -> int:
    return main(["--dataset", "sample", "--root", str(root), "--out", str(out), "--clap-model", "none",
                 "--workers", "1", "--limit", "4", *extra])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny Synchformer in the release's layout whose offset head always picks -0.6 s or +1.4 s,
    whichever the features lean to (so scores are real model outputs, but known to be 0.6 or 1.4)."""
    g = torch.Generator().manual_seed(0)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in Synchformer(TINY).state_dict().items()}
    state["transformer.off_head.bias"] = torch.full((21,), -100.0)
    state["transformer.off_head.bias"][[7, 17]] = 0.0  # -0.6 s and +1.4 s
    path = tmp_path_factory.mktemp("synchformer") / "synchformer_state_dict.pth"
    torch.save(state, path)
    return path


def test_missing_synchformer_stops_before_decoding(sample_root, tmp_path, monkeypatch, capsys):
    forbid_decoding(monkeypatch)
    code = _clean(sample_root, tmp_path / "o", "--desync-max", "0.5", "--desync-models-dir", str(tmp_path / "none"))
    err = capsys.readouterr().err
    assert code == 2
    assert "synchformer" in err and "synchformer_state_dict.pth" in err and "MMAudio/releases" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # three clean runs (one scoring): about 80 s on the loaded 2-core machine
def test_desync_is_scored_once_and_filtered_many_times(sample_root, weights, tmp_path, capsys):
    out = tmp_path / "clean"
    assert _clean(sample_root, out, "--desync-score", "--desync-weights", str(weights)) == 0
    ledger, meta = read_ledger(out / "ledger.parquet")
    scored = ledger[ledger["desync"].notna()]
    assert len(scored) >= 2 and meta["desync"]["weights_path"] == str(weights)
    assert set(scored["desync"].round(6)) <= {0.6, 1.0, 1.4}
    assert (ledger.loc[ledger["status"] == "failed", "desync"].isna()).all()
    row = scored.iloc[0]
    clip = decode(row["video_path"], sync_request(row["start_s"], duration_s=row["duration_s"], size=32))
    expected = DesyncScorer.load(weights).score(clip.rgb, clip.audio[16000])
    assert (row["desync"], row["desync_first_s"], row["desync_last_s"]) == pytest.approx(
        (expected.desync, expected.first_s, expected.last_s))
    kept = {k: s for k, s in zip(ledger["key"], ledger["status"])}
    capsys.readouterr()

    limit = float(scored["desync"].min()) - 1e-6  # drops every scored clip
    assert _clean(sample_root, out, "--desync-max", f"{limit}", "--desync-weights", str(weights)) == 0
    assert "this run: 0 clips" in capsys.readouterr().out  # a threshold: no rescoring
    after, _ = read_ledger(out / "ledger.parquet")
    dropped = after[after["key"].isin(scored["key"])]
    assert (dropped["status"] == "filtered").all() and dropped["reason"].str.contains(f"desync>{limit:g}").all()
    others = after[~after["key"].isin(scored["key"])]  # failed, or too short to score: never filtered by it
    assert all(kept[k] == s for k, s in zip(others["key"], others["status"]))

    assert _clean(sample_root, out, "--desync-max", "2", "--desync-weights", str(weights)) == 0
    again, _ = read_ledger(out / "ledger.parquet")
    assert {k: s for k, s in zip(again["key"], again["status"])} == kept


def test_desync_max_must_be_a_finite_number_of_seconds(sample_root, tmp_path, monkeypatch, capsys):
    forbid_decoding(monkeypatch)
    assert _clean(sample_root, tmp_path / "o", "--desync-max", "-1") == 2
    assert "--desync-max" in capsys.readouterr().err
