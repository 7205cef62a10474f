"""Model resolution for ``pipeline.encode``: the real CLIP, VAE and vision encoders, or (demo only) tiny random ones.

Every model is found before any work starts. Only with ``--allow-random-weights`` does a missing
model fall back to tiny random-weight models (all of them, so a run never mixes real and random
features), built once under ``.work/random-models``; the run then says so in a banner, in its
summary and in card.json (``random_weights: true``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from core.config import DEFAULT_SIGNAL
from shards.config import EncoderConfig
from core.models import ModelUnavailable, ResolvedModel, resolve_pretrained
from shards.random_models import build_random_clip, build_random_vae, is_random
from shards.vision import VISION_KINDS, describe


@dataclass(frozen=True)
class Models:
    """The encoder config as run (random-model folders substituted), the models and their weight hashes."""

    encoders: EncoderConfig
    clip: ResolvedModel
    vae: ResolvedModel
    random_reason: str  # why random weights were used; empty for real weights
    vision: dict[str, ResolvedModel] = field(default_factory=dict)  # the chosen encoders besides CLIP

    @property
    def random(self) -> bool:
        return (bool(self.random_reason) or is_random(self.clip.path) or is_random(self.vae.path)
                or any(is_random(m.path) for m in self.vision.values()))

    def weight_hashes(self) -> dict[str, dict[str, str]]:
        return {"clip": self.clip.weight_hashes(), "vae": self.vae.weight_hashes(),
                **{f"vision_{name}": m.weight_hashes() for name, m in self.vision.items()}}

    def clip_image_size(self) -> int:
        cfg = self.clip.config()
        return int(cfg.get("vision_config", cfg).get("image_size", 224))

    def resolved(self, encoder: str) -> ResolvedModel:
        return self.clip if encoder == "clip" else self.vision[encoder]

    def describe(self, encoder: str) -> dict:
        """The card's record of one vision encoder (shards.vision.describe) with its model and hashes."""
        enc = self.encoders
        model = self.resolved(encoder)
        hashes = self.weight_hashes()["clip" if encoder == "clip" else f"vision_{encoder}"]
        return {"model": enc.model_of(encoder), "weights_sha256": hashes, "random_weights": is_random(model.path),
                **describe(encoder, model.config(), enc.fps_of(encoder), DEFAULT_SIGNAL.window_s)}

    def image_sizes(self) -> dict[str, int]:
        return {e: self.describe(e)["image_size"] for e in self.vision}


def _random_models(enc: EncoderConfig, work_dir: Path) -> EncoderConfig:
    folder = (work_dir / "random-models").resolve()
    clip_dir, vae_dir = folder / "clip", folder / "vae"
    if not is_random(clip_dir):
        build_random_clip(clip_dir, size="tiny", projection_dim=768)
    if not is_random(vae_dir):
        build_random_vae(vae_dir, size="tiny")
    swaps = {}
    for name in enc.encoders:
        if name != "clip":
            target = folder / name
            if not is_random(target):
                VISION_KINDS[name].build_random(target)
            swaps[f"{name}_model"] = str(target)
    return replace(enc, clip_model=str(clip_dir), vae=str(vae_dir), **swaps)


def _resolve(enc: EncoderConfig, reason: str) -> Models:
    vision = {e: resolve_pretrained(enc.model_of(e)) for e in enc.encoders if e != "clip"}
    return Models(enc, resolve_pretrained(enc.clip_model), resolve_pretrained(enc.vae, pipeline_subfolder="vae"),
                  reason, vision)


def resolve_models(enc: EncoderConfig, work_dir: Path) -> Models:
    """Find every model before any work starts; for the demo only, fall back to random weights."""
    try:
        return _resolve(enc, "")
    except ModelUnavailable as e:
        if not enc.allow_random_weights:
            raise
        reason = str(e)
    return _resolve(_random_models(enc, work_dir), reason)


def random_weights_banner(reason: str) -> str:
    bar = "!" * 96
    return (f"{bar}\n!!! RANDOM WEIGHTS: the real CLIP / AudioLDM VAE / vision-encoder weights could not be loaded,\n"
            f"!!! so these shards hold features from TINY RANDOM-WEIGHT models (--allow-random-weights). They are\n"
            f"!!! good for a demo of the data flow and NOTHING else; card.json says random_weights: true.\n"
            f"!!! cause: {reason[:300]}\n{bar}")
