"""The sampler's condition tokens: the run's vision encoder (and flow) on the input video, as encode makes them.

A run records which vision encoder it trained on (``ModelConfig.vision_encoder``) and the card of
its shards says at what frame rate, with which weights and, for ``+flow`` conditions, how the
flow images were made; the video goes through the same code the encode stage runs
(``core.decode`` at the encoder's rate and input size, ``shards.vision``, ``core.flow``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from core.decode import DecodeError, DecodeRequest, decode
from core.flow import flow_frames, flow_step
from core.models import ResolvedModel
from shards.vision import VISION_KINDS, ClipVision, VisionEncoder
from train.config import ModelConfig


class VisionInputError(RuntimeError):
    """The video cannot give the condition tokens (no frames in the window, undecodable)."""


def vision_info(card: dict, name: str) -> dict:
    """The card's record of the run's encoder; cards from before the vision encoders describe CLIP only."""
    info = (card.get("vision_encoders") or {}).get(name)
    if info:
        return info
    return {"fps": float(card.get("clip_fps", 2.0)), "model": card.get("clip_model", "")}


def load_encoder(mcfg: ModelConfig, card: dict, clip: ResolvedModel, resolve: Callable[[str, Callable], ResolvedModel],
                 device) -> tuple[VisionEncoder, ResolvedModel]:
    """The run's vision encoder; ``resolve(spec, build_random)`` finds a non-CLIP model (the sampler's rules)."""
    name = mcfg.vision_encoder
    fps = float(vision_info(card, name)["fps"])
    if name == "clip":
        return ClipVision.load(str(clip.path), device, fps, normalize=bool(card.get("clip_normalize", True))), clip
    resolved = resolve(vision_info(card, name).get("model", ""), VISION_KINDS[name].build_random)
    return VISION_KINDS[name].load(str(resolved.path), device, fps=fps, dtype=torch.float32), resolved


def _frames(video: str, start_s: float, seconds: float, fps: float, size: int) -> np.ndarray:
    try:
        clip = decode(video, DecodeRequest(start_s=start_s, duration_s=seconds, rgb_fps=fps, rgb_size=size,
                                           need_audio=False))
    except DecodeError as e:
        raise VisionInputError(f"{video}: {e.ledger_reason}") from e
    if clip.rgb is None or len(clip.rgb) == 0:
        raise VisionInputError(f"{video}: no frames in [{start_s}, {start_s + seconds}) s")
    return clip.rgb


def condition_tokens(encoder: VisionEncoder, video: str, start_s: float, card: dict,
                     with_flow: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vision tokens [T, D] of the window and, when the run uses flow, its flow tokens [F, D]."""
    window = float(card.get("window_s", 10.0))
    frames = _frames(video, start_s, window, encoder.fps, encoder.image_size)
    tokens = torch.from_numpy(encoder.encode_clips([frames])[0])
    if not with_flow:
        return tokens, None
    flow_cfg = card.get("flow") or {}
    step = flow_step(encoder.fps, float(flow_cfg.get("pair_fps", 25.0)))
    dense = _frames(video, start_s, window, encoder.fps * step, encoder.image_size)
    images = flow_frames(dense, step, float(flow_cfg.get("min_scale", 1.0)))
    return tokens, torch.from_numpy(encoder.encode_clips([images])[0])
