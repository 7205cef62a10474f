"""The dataset card (``OUT/shards/card.json``): what made the shards, as one typed record.

Every field is documented in docs/formats.md. ``build_card`` fills it from the resolved models and
the run's configs; ``DatasetCard.to_json`` is the one serialisation (sorted keys, so reruns give
the same bytes); ``DatasetCard.from_json`` reads it back and refuses other card formats.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from core.config import DEFAULT_SIGNAL
from core.resample import RESAMPLER_NOTES
from core.version import code_version
from shards.config import (MEMBER_CLIP, MEMBER_MEL, MEMBER_ORDER, EncoderConfig, MelConfig, ShardConfig,
                           flow_member, latent_shape, vision_member)
from core.models import ResolvedModel
from shards.random_models import is_random

CARD_FORMAT = "v2a-shards/1"
_MEL_FIXED = {"layout": "[n_mels, frames]", "window": "hann (periodic)", "center": True, "pad_mode": "reflect",
              "mel_scale": "slaney", "mel_norm": "slaney", "magnitude": True}


class CardError(ValueError):
    """A card.json this code cannot read (another format, missing fields)."""


@dataclass(frozen=True)
class Counts:
    """What the run encoded: samples per split and where the work came from."""

    counts: dict[str, int]  # encoded samples per split
    samples: int
    from_ledger: int  # ok ledger clips asked for
    from_plan: int  # recipes in the plan, valid or not
    failed: int
    failed_reasons: dict[str, int]  # reason prefix (before ':') -> samples


@dataclass(frozen=True)
class DatasetCard:
    """Encoders and weight hashes, signal and mel parameters, thresholds, counts, code version."""

    code_version: str
    random_weights: bool
    random_weights_reason: str  # empty for real weights
    clip_model: str
    clip_weights_sha256: dict[str, str]
    clip_normalize: bool
    clip_pixel_range: str
    clip_fps: float
    clip_image_size: int
    clip_resize: str
    clip_dim: int
    clip_feature: str
    text_model: str
    text_dim: int
    text_feature: str
    vae_model: str
    vae_weights_sha256: dict[str, str]
    vae_scaling_factor: float
    latent_shape: list[int]
    latent_dtype: str
    latent_layout: str
    sample_rate: int
    audio_seconds: float
    window_s: float
    audio_member: str
    mel: dict[str, Any]
    with_mel: bool
    members: list[str]
    thresholds: dict[str, Any] | None  # the ledger's filter thresholds
    ledger_run: dict[str, Any]  # the ledger's run metadata (dataset, code version, counts, CLAP)
    augmentation_plan: dict[str, Any] | None  # the plan's parameters, None without a plan
    shard_size: int
    shards: int
    counts: dict[str, int]
    samples: int
    from_ledger: int
    from_plan: int
    failed: int
    failed_reasons: dict[str, int]
    format: str = field(default=CARD_FORMAT)
    # how the 16 kHz feature audio was resampled (name, definition, implementation); cards written
    # before it was recorded lack it
    feature_resampler: dict[str, Any] = field(default_factory=dict)
    av_align_version: str | None = None  # the AV-Align revision the ledger filtered on
    # an audio-only corpus: latent + text (the caption) members, no video features; the clip_* fields
    # describe the CLIP whose text tower made text.npy
    audio_only: bool = False
    # per vision encoder (vision-<name>.npy): model, weights_sha256, fps, image_size, token_layout,
    # frames and tokens of a full window, dim, feature; cards written before them lack it (clip.npy)
    vision_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    with_flow: bool = False  # flow-<name>.npy members, one per vision encoder
    flow: dict[str, Any] = field(default_factory=dict)  # how the flow images were made

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DatasetCard:
        raw = json.loads(text)
        if raw.get("format") != CARD_FORMAT:
            raise CardError(f"card format {raw.get('format')!r}: this code reads {CARD_FORMAT!r}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(raw))
        if missing:
            raise CardError(f"card lacks fields {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in names})


def _clip_fields(enc: EncoderConfig, clip: ResolvedModel, hashes: dict[str, str]) -> dict[str, Any]:
    cfg = clip.config()
    vision, text = cfg.get("vision_config", cfg), cfg.get("text_config", {})
    return {
        "clip_model": enc.clip_model, "clip_weights_sha256": hashes, "clip_normalize": enc.clip_normalize,
        "clip_pixel_range": "CLIP mean/std normalised" if enc.clip_normalize else "[0, 1] (VTA-LDM release)",
        "clip_fps": DEFAULT_SIGNAL.clip_fps, "clip_image_size": int(vision.get("image_size", 224)),
        "clip_resize": "short side to image_size, bicubic (antialiased), centre crop",
        "clip_dim": int(vision.get("projection_dim", cfg.get("projection_dim", 0))),
        "clip_feature": "CLIPVisionModelWithProjection.image_embeds, one token per frame",
        "text_model": enc.clip_model, "text_dim": int(text.get("projection_dim", cfg.get("projection_dim", 0))),
        "text_feature": "CLIPTextModelWithProjection.text_embeds of the caption (label when empty)",
    }


def _audio_fields(enc: EncoderConfig, vae: ResolvedModel, hashes: dict[str, str], mel: MelConfig) -> dict[str, Any]:
    cfg = vae.config()
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    return {
        "vae_model": enc.vae, "vae_weights_sha256": hashes, "vae_scaling_factor": float(cfg.get("scaling_factor", 1.0)),
        "latent_shape": list(latent_shape(int(cfg["latent_channels"]), mel, down)), "latent_dtype": "float16",
        "latent_layout": "[posterior mean, posterior std] of AutoencoderKL.encode(mel [1, frames, n_mels])",
        "sample_rate": mel.sample_rate, "audio_seconds": mel.seconds, "window_s": DEFAULT_SIGNAL.window_s,
        "audio_member": "audio.flac: 16-bit mono at sample_rate, the decoded window (not padded)",
        "mel": {**asdict(mel), **_MEL_FIXED}, "with_mel": enc.with_mel,
        "members": members(enc),
    }


def members(enc: EncoderConfig, audio_only: bool = False) -> list[str]:
    """A sample's members in shard order (by name); an audio-only set has no vision or flow ones."""
    fixed = [m for m in MEMBER_ORDER if m != MEMBER_CLIP and (enc.with_mel or m != MEMBER_MEL)]
    vision = [] if audio_only else ([vision_member(e) for e in enc.encoders]
                                    + [flow_member(e) for e in enc.encoders if enc.with_flow])
    return sorted(fixed + vision)


def flow_fields(enc: EncoderConfig) -> dict[str, Any]:
    if not enc.with_flow:
        return {}
    return {"method": "Farneback (core.flow.FARNEBACK, AV-Align's parameters) on the encoder-sized luma",
            "pairs": "image k: flow from the frame at the encoder's grid point k to the frame 1/(fps * step) s "
                     "later, step = round(pair_fps / fps)", "pair_fps": enc.flow_pair_fps,
            "rendering": "HSV wheel: hue = direction (degrees / 2), saturation 255, value = magnitude / scale, "
                         "scale = the clip's largest magnitude, at least min_scale px/frame",
            "min_scale": enc.flow_min_scale, "members": [flow_member(e) for e in enc.encoders]}


def build_card(enc: EncoderConfig, clip: ResolvedModel, vae: ResolvedModel, hashes: dict[str, dict[str, str]],
               mel: MelConfig, shard_cfg: ShardConfig, shards: int, counts: Counts, run_meta: dict,
               plan_meta: dict | None, random_reason: str, audio_only: bool = False,
               vision: dict[str, dict] | None = None) -> DatasetCard:
    vision = {} if audio_only else (vision or {})  # an audio-only set has no vision members
    random_weights = is_random(clip.path) or is_random(vae.path) or any(v.get("random_weights") for v in vision.values())
    reason = (random_reason or "weights were built by shards.random_models") if random_weights else ""
    ledger_run = {k: run_meta[k] for k in ("dataset", "code_version", "counts", "clap", "clap_skipped", "av_align",
                                           "av_align_version", "av_align_revisions") if k in run_meta}
    audio = _audio_fields(enc, vae, hashes["vae"], mel)
    visual = _clip_fields(enc, clip, hashes["clip"])
    if audio_only:
        audio["members"] = members(enc, audio_only=True)
        visual["clip_feature"] = "none: audio-only set (no video members)"
    return DatasetCard(code_version=code_version(), random_weights=random_weights, random_weights_reason=reason,
                       **visual, **audio, audio_only=audio_only,
                       thresholds=run_meta.get("filters", run_meta.get("thresholds")), ledger_run=ledger_run,
                       augmentation_plan=plan_meta, shard_size=shard_cfg.shard_size, shards=shards, **asdict(counts),
                       feature_resampler=RESAMPLER_NOTES[mel.resampler],
                       av_align_version=run_meta.get("av_align_version", (run_meta.get("av_align") or {}).get("version")),
                       vision_encoders=vision, with_flow=enc.with_flow and not audio_only,
                       flow={} if audio_only else flow_fields(enc))
