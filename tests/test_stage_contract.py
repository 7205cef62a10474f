"""Every stage touches only the row fields it declares (``Stage.reads`` / ``writes``), and its chain
fits together: real stages on real rows, each access recorded."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.stage import ALWAYS_WRITTEN, ChainError, Stage, check_chain, transient_fields

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures_encoders import ledger_row, tiny_clip_dir, tiny_vae_dir  # noqa: E402,F401


class RecordingRow(dict):
    """A row dict that notes which fields are read and which are written."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: set[str] = set()
        self.written: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)

    def pop(self, k, *default):
        self.read.add(k)
        return super().pop(k, *default)

    def __setitem__(self, k, v):
        self.written.add(k)
        super().__setitem__(k, v)

    def update(self, *a, **k):
        for key, value in dict(*a, **k).items():
            self[key] = value

    def setdefault(self, k, default=None):
        self.read.add(k)
        if not super().__contains__(k):
            self[k] = default
        return super().__getitem__(k)


def _run_checked(stages: list[Stage], rows: list[dict]) -> list[dict]:
    """Run the chain stage by stage; fail on any field a stage touches without declaring it."""
    check_chain(stages)
    for stage in stages:
        stage.setup()
        recorded = [RecordingRow(r) for r in rows]
        out = stage.process_batch(recorded)
        for row in recorded:
            undeclared_reads = row.read - set(stage.reads) - set(stage.writes) - set(ALWAYS_WRITTEN)
            undeclared_writes = row.written - set(stage.writes) - set(ALWAYS_WRITTEN)
            assert not undeclared_reads, f"{stage.name} reads undeclared {sorted(undeclared_reads)}"
            assert not undeclared_writes, f"{stage.name} writes undeclared {sorted(undeclared_writes)}"
        stage.teardown()
        rows = [dict(r) for r in out]
    return rows


def test_clean_stages_touch_only_declared_fields(sample_root, tiny_clap_dir):
    from filters.clap import ClapConfig
    from filters.speech_music import SpeechMusicConfig
    from pipeline.clean_stages import AUDIO_FOR_AES, AUDIO_FOR_CLAP, CleanStageConfig, build_clean_stages
    from pipeline.manifest import vggsound_rows

    rows = vggsound_rows(sample_root / "vggsound.csv", sample_root / "video")
    clips = [r for r in rows if not r["status"]][:3] + [r for r in rows if r["status"]][:1]
    config = CleanStageConfig(clap=ClapConfig(model=str(tiny_clap_dir), device="cpu"),
                              speech_music=SpeechMusicConfig(), batch_size=4)
    stages = build_clean_stages(config)
    assert transient_fields(stages) == (AUDIO_FOR_AES, AUDIO_FOR_CLAP)
    out = _run_checked(stages, clips)
    assert [r["status"] for r in out[:3]] == ["ok"] * 3 and all(r["clap_score"] is not None for r in out[:3])


def test_encode_stages_touch_only_declared_fields(tiny_clip_dir, tiny_vae_dir, real_clips_dir):
    from shards.config import EncoderConfig
    from shards.encode_stage import TRANSIENT, EncodeStageConfig, build_encode_stages
    from core.models import resolve_pretrained

    clip_cfg = resolve_pretrained(str(tiny_clip_dir)).config()
    size = int(clip_cfg.get("vision_config", clip_cfg).get("image_size", 224))
    enc = EncoderConfig(clip_model=str(tiny_clip_dir), vae=str(tiny_vae_dir), device="cpu")
    stages = build_encode_stages(EncodeStageConfig(encoders=enc, clip_image_size=size, batch_size=2))
    assert set(transient_fields(stages)) == set(TRANSIENT)
    video = next(iter(sorted((real_clips_dir / "video").glob("*.mp4"))))
    rows = [ledger_row("vggsound-a-000000", video), ledger_row("vggsound-b-000000", video.with_name("gone.mp4"))]
    for r in rows:
        r.update(status="", kind="clip")
    out = _run_checked(stages, rows)
    assert out[0]["status"] == "ok" and "latent.npy" in out[0] and out[1]["status"] == "failed"


def test_check_chain_catches_a_consumer_before_its_producer():
    class Producer(Stage):
        name, writes, transient = "producer", ("audio",), ("audio",)

        def process_batch(self, rows):
            return rows

    class Consumer(Stage):
        name, reads, writes = "consumer", ("audio", "key"), ("score",)

        def process_batch(self, rows):
            return rows

    check_chain([Producer(), Consumer()])
    with pytest.raises(ChainError, match="consumer reads audio before any earlier stage writes it"):
        check_chain([Consumer(), Producer()])

    class Stray(Stage):
        name, transient = "stray", ("x",)

        def process_batch(self, rows):
            return rows

    with pytest.raises(ChainError, match="does not write: x"):
        check_chain([Stray()])
