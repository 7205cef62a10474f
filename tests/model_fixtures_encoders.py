"""Tiny random CLIP and AudioLDM-VAE folders, and small ledgers, for the encode tests.

The folders come from ``shards.random_models`` (the same builder the demo and benchmark use),
saved with ``save_pretrained`` in a temporary folder, so tests load them exactly as a user loads
real weights. Projections are 16-d to keep the tests fast; the VAE keeps AudioLDM's contract
(1 mel channel in, 8 latent channels, x4 downsampling).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.ledger import Ledger, to_table
from shards.random_models import build_random_clip, build_random_vae

TINY_CLIP_DIM = 16
DATA = Path(__file__).parent / "data" / "vggsound"
REAL_CLIP = DATA / "video" / "0DCit2EBtjs_000030.mp4"  # 480x360, 30 fps, 9.98 s of audio
THRESHOLDS = {"av_align_min": 0.2, "clap_min": 0.3}


_BUILT: dict[str, Path] = {}


def _once(tmp_path_factory, name: str, build) -> Path:
    """Build a folder once per test session: pytest makes one fixture per module that imports it,
    so session scope alone would build it again in every such module."""
    if name not in _BUILT:
        _BUILT[name] = build(tmp_path_factory.mktemp(name))
    return _BUILT[name]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "tiny_clip",
                 lambda d: build_random_clip(d, size="tiny", projection_dim=TINY_CLIP_DIM))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "tiny_vae", lambda d: build_random_vae(d, size="tiny"))


def ledger_row(key: str, video_path: str | Path, *, label: str = "dog barking", split: str = "train",
               status: str = "ok", reason: str = "", start_s: float = 0.0, duration_s: float = 10.0,
               clap: float | None = 0.5, av_align: float | None = 0.4) -> dict:
    """One row of ``OUT/ledger.parquet`` as ``pipeline.clean`` writes it."""
    return {"key": key, "source": "vggsound", "youtube_id": key.split("-")[1] if "-" in key else key,
            "video_path": str(video_path), "label": label, "caption": f"the sound of {label}", "split": split,
            "start_s": start_s, "duration_s": duration_s, "video_fps": 25.0, "status": status, "reason": reason,
            "clap_score": clap, "av_align": av_align, "audio_peaks": 3, "video_peaks": 3, "speech_score": None,
            "music_score": None, "event_score": None, "av_align_2025": av_align, "av_align_2023": av_align,
            "video_peaks_2025": 3, "video_peaks_2023": 3, "line": None}


def write_ledger(out: Path, rows: list[dict]) -> Path:
    """Write ``out/ledger.parquet`` and ``out/run.json`` with the clean CLI's writer."""
    meta = {"dataset": "vggsound", "filters": THRESHOLDS, "code_version": "test"}
    return Ledger(out).write_final(to_table(rows).to_pandas(), meta)  # a column a row lacks is missing


def assert_same_samples(ours: Path, ref: Path) -> None:
    """Two shards hold the same samples and members: non-array members byte for byte, arrays within
    one float16 step (float kernels with another thread count may move a latent that much)."""
    import io

    import numpy as np

    from shards.shard_writer import read_tar_samples

    a_samples, b_samples = list(read_tar_samples(ours)), list(read_tar_samples(ref))
    assert [k for k, _ in a_samples] == [k for k, _ in b_samples], ours.name
    for (key, a), (_, b) in zip(a_samples, b_samples):
        assert a.keys() == b.keys(), key
        for member in a:
            if member.endswith(".npy"):
                x, y = (np.load(io.BytesIO(m[member])).astype(np.float32) for m in (a, b))
                np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-3, err_msg=f"{key}.{member}")
            else:
                assert a[member] == b[member], f"{key}.{member}"
