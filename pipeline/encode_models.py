"""Model resolution for ``pipeline.encode``: the real CLIP and VAE, or (demo only) tiny random ones.

Both models are found before any work starts. Only with ``--allow-random-weights`` does a missing
model fall back to tiny random-weight models, built once under ``.work/random-models``; the run
then says so in a banner, in its summary and in card.json (``random_weights: true``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from shards.config import EncoderConfig
from core.models import ModelUnavailable, ResolvedModel, resolve_pretrained
from shards.random_models import build_random_clip, build_random_vae, is_random


@dataclass(frozen=True)
class Models:
    """The encoder config as run (random-model folders substituted), both models and their weight hashes."""

    encoders: EncoderConfig
    clip: ResolvedModel
    vae: ResolvedModel
    random_reason: str  # why random weights were used; empty for real weights

    @property
    def random(self) -> bool:
        return bool(self.random_reason) or is_random(self.clip.path) or is_random(self.vae.path)

    def weight_hashes(self) -> dict[str, dict[str, str]]:
        return {"clip": self.clip.weight_hashes(), "vae": self.vae.weight_hashes()}

    def clip_image_size(self) -> int:
        cfg = self.clip.config()
        return int(cfg.get("vision_config", cfg).get("image_size", 224))


def _random_models(enc: EncoderConfig, work_dir: Path) -> EncoderConfig:
    folder = (work_dir / "random-models").resolve()
    clip_dir, vae_dir = folder / "clip", folder / "vae"
    if not is_random(clip_dir):
        build_random_clip(clip_dir, size="tiny", projection_dim=768)
    if not is_random(vae_dir):
        build_random_vae(vae_dir, size="tiny")
    return replace(enc, clip_model=str(clip_dir), vae=str(vae_dir))


def resolve_models(enc: EncoderConfig, work_dir: Path) -> Models:
    """Find both models before any work starts; for the demo only, fall back to random weights."""
    try:
        return Models(enc, resolve_pretrained(enc.clip_model), resolve_pretrained(enc.vae, pipeline_subfolder="vae"),
                      "")
    except ModelUnavailable as e:
        if not enc.allow_random_weights:
            raise
        reason = str(e)
    enc = _random_models(enc, work_dir)
    return Models(enc, resolve_pretrained(enc.clip_model), resolve_pretrained(enc.vae, pipeline_subfolder="vae"),
                  reason)


def random_weights_banner(reason: str) -> str:
    bar = "!" * 96
    return (f"{bar}\n!!! RANDOM WEIGHTS: the real CLIP / AudioLDM VAE weights could not be loaded, so these shards\n"
            f"!!! hold features from TINY RANDOM-WEIGHT models (--allow-random-weights). They are good for a\n"
            f"!!! demo of the data flow and NOTHING else; card.json says random_weights: true.\n"
            f"!!! cause: {reason[:300]}\n{bar}")
