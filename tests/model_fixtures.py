"""Tiny random models for the sampler tests, saved with ``save_pretrained`` like real checkpoints.

CLIP and the AudioLDM-shaped VAE come from ``shards.random_models`` (the encode stage's own
builders; CLIP keeps 768-d embeddings so the shards' contract holds), the HiFi-GAN from
``train.vocoder.build_random_vocoder`` (AudioLDM's interface: 64 mels in, x160 up, 16 kHz). Every
folder carries the random-weights marker, so outputs made with them say so.
"""
from __future__ import annotations

from pathlib import Path

from shards.random_models import build_random_clip, build_random_vae
from shards_fixture import VAE_SCALING
from train.vocoder import build_random_vocoder

AUDIOLDM_LATENT = (8, 256, 16)  # 1024 x 64 mel through the x4 VAE: 10.24 s at 16 kHz


def build_tiny_models(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    return {"clip": build_random_clip(folder / "clip", size="tiny", projection_dim=768),
            "vae": build_random_vae(folder / "vae", size="tiny", scaling_factor=VAE_SCALING),
            "vocoder": build_random_vocoder(folder / "vocoder", size="tiny")}
