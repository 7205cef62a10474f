"""The encode-to-train contract: the trainer reads the shards ``python -m pipeline.encode`` wrote.

Other tests build shards by hand (``shards_fixture``) or train on them; this one joins the two real
commands, so a change to the shard layout, the card or the reader that breaks training fails here.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures_encoders import (TINY_CLIP_DIM, ledger_row, tiny_clip_dir, tiny_vae_dir,  # noqa: E402,F401
                                     write_ledger)


@pytest.mark.slow
def test_trainer_trains_on_the_shards_pipeline_encode_wrote(tiny_clip_dir, tiny_vae_dir, tmp_path):
    from core.synth import write_event_clip
    from pipeline.encode import main as encode
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig, TrainConfig
    from train.trainer import train

    video = tmp_path / "video"
    rows = [ledger_row(f"vggsound-gen{i}-000000", write_event_clip(video / f"gen{i}_000000.mp4", seed=i).path,
                       label=("dog barking", "glass breaking")[i % 2], split="test" if i == 3 else "train")
            for i in range(4)]
    ledger = write_ledger(tmp_path / "clean", rows)
    shards = tmp_path / "shards"
    assert encode(["--ledger", str(ledger), "--out", str(shards), "--clip-model", str(tiny_clip_dir),
                   "--vae", str(tiny_vae_dir), "--shard-size", "2", "--device", "cpu", "--workers", "1"]) == 0
    card = json.loads((shards / "card.json").read_text())
    assert card["counts"] == {"train": 3, "test": 1}

    run = tmp_path / "run"
    tcfg = TrainConfig(shards=str(shards), out=str(run), batch_size=2, max_steps=3, ckpt_every=3, val_every=0,
                       workers=0, log_every=1, warmup_steps=1)
    summary = train(tcfg, ModelConfig(unet_config=TINY_UNET_CONFIG, clip_dim=TINY_CLIP_DIM), NoiseConfig())
    assert summary["steps"] == 3 and summary["batches_per_rank"] == [3]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 3 and all(math.isfinite(x) and x > 0 for x in losses)
    step = run / "checkpoints" / "step-00000003"
    assert (step / "model.safetensors").is_file()
    config = json.loads((step / "run_config.json").read_text())
    assert config["data"]["card"]["samples"] == card["samples"]  # the run records the card it trained on
    assert config["data"]["latent_shape"] == card["latent_shape"]
