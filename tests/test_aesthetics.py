"""audiobox-aesthetics (filters/aesthetics.py): the release's state dict loads; scores reach the ledger."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.decode import DecodeRequest, decode
from core.resample import resample
from filters.aesthetics import (AES_COLUMNS, AXES, AestheticsConfig, AestheticsScorer, AestheticsUnavailable,
                                build_model, release_key)
from filters.curation import CurationFilters, curation_reasons

DATA = Path(__file__).parent / "data"
CLIP = DATA / "vggsound" / "video" / "0DCit2EBtjs_000030.mp4"
# the shapes of audiobox-aesthetics 0.0.4's AesMultiOutput state dict, as its checkpoint.pt names them
RELEASE = json.loads((DATA / "audiobox_aesthetics_keys.json").read_text())["shapes"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_buckets=32, max_bucket_distance=80)


def _our_key(release: str) -> str:
    key = re.sub(r"^model\.", "", release)
    return "wavlm_model." + release_key(key[len("wavlm_model."):]) if key.startswith("wavlm_model.") else key


def test_every_release_weight_maps_onto_the_network_with_its_shape():
    import torch

    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in build_model({}).state_dict().items()}
    mapped = {_our_key(k): shape for k, shape in RELEASE.items()}
    assert len(mapped) == len(RELEASE) == 260
    assert mapped == ours


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny encoder with random weights, saved under the release's key names and file layout."""
    import torch

    torch.manual_seed(0)
    model_cfg = {"proj_num_layer": 1, "nth_layer": 3, "wavlm_config": TINY}
    net = build_model(model_cfg).state_dict()
    state = {}
    for release in RELEASE:  # the release's names, for the layers the tiny encoder has
        layer = re.search(r"\.layers\.(\d+)\.", release)
        if layer and int(layer.group(1)) >= TINY["num_hidden_layers"]:
            continue
        shape = net[_our_key(release)].shape
        state[release] = torch.randn(shape) * 0.1 if len(shape) else torch.ones(())
    path = tmp_path_factory.mktemp("aes") / "checkpoint.pt"
    torch.save({"state_dict": state, "model_cfg": model_cfg,
                "target_transform": {a: {"mean": 5.5, "std": 1.5} for a in AXES}}, path)
    return path


def _audio16k() -> np.ndarray:
    clip = decode(str(CLIP), DecodeRequest(audio_native=True, need_video=False))
    return resample(clip.audio_native.mean(axis=0), clip.native_sr, 16000, "torchaudio")


def test_scores_are_finite_and_long_clips_are_length_weighted_windows(tiny_checkpoint):
    scorer = AestheticsScorer(AestheticsConfig(model=str(tiny_checkpoint))).load()
    audio = _audio16k()
    ten = np.tile(audio, 2)[:160000]  # exactly 10 s (the clip's audio is a little shorter)
    long = np.concatenate([ten, audio[:32000]])  # 12 s: a 10 s and a 2 s window
    whole, first, tail, empty = scorer.scores_batch([ten, long, long[160000:], np.zeros(0, np.float32)])
    assert all(np.isfinite(whole[c]) for c in AES_COLUMNS) and empty == dict.fromkeys(AES_COLUMNS)
    for c in AES_COLUMNS:
        assert first[c] == pytest.approx((whole[c] * 10 + tail[c] * 2) / 12, abs=1e-5)
    assert whole["aes_pq"] != whole["aes_ce"]


def test_a_checkpoint_with_missing_or_foreign_weights_is_refused(tiny_checkpoint, tmp_path):
    import torch

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["state_dict"].pop("model.proj_layer.PQ.0.weight")
    ckpt["state_dict"]["model.wavlm_model.encoder.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(AestheticsUnavailable, match="1 weight\\(s\\) missing.*1 unknown"):
        AestheticsScorer(AestheticsConfig(model=str(tmp_path / "broken.pt"))).load()
    with pytest.raises(AestheticsUnavailable, match="no file"):
        AestheticsScorer(AestheticsConfig(model=str(tmp_path / "absent.pt"))).load()


@pytest.mark.slow  # two clean runs with a model stage (about 20 s of CPU)
def test_clean_records_the_axes_and_filters_on_pq_only_when_asked(tiny_checkpoint, tmp_path):
    from pipeline.clean import main
    from pipeline.ledger import read_ledger

    root = tmp_path / "root"
    (root / "video").mkdir(parents=True)
    (root / "video" / CLIP.name).symlink_to(CLIP)
    (root / "vggsound.csv").write_text("0DCit2EBtjs,30,playing acoustic guitar,train\n")
    args = ["--dataset", "vggsound", "--root", str(root), "--out", str(tmp_path / "out"), "--clap-model", "none",
            "--workers", "1", "--aes-model", str(tiny_checkpoint)]
    assert main(args) == 0
    ledger, meta = read_ledger(tmp_path / "out" / "ledger.parquet")
    row = ledger.iloc[0]
    assert all(np.isfinite(row[c]) for c in AES_COLUMNS) and "low_quality" not in row["reason"]
    assert "audio quality PQ (audiobox-aesthetics" in (tmp_path / "out" / "report.html").read_text()
    strict = CurationFilters(quality="on", quality_pq_min=row["aes_pq"] + 0.01)
    assert list(curation_reasons(ledger, strict, "vggsound")) == ["low_quality"]
    assert list(curation_reasons(pd.DataFrame({"aes_pq": [np.nan]}), strict, "vggsound")) == [""]
    assert main(args + ["--quality", "on", "--quality-pq-min", str(row["aes_pq"] + 0.01)]) == 0  # re-filters only
    again, meta = read_ledger(tmp_path / "out" / "ledger.parquet")
    assert again["reason"].iloc[0].endswith("low_quality") and meta["reasons"]["low_quality"] == 1
    assert meta["aesthetics"]["model"] == str(tiny_checkpoint)
