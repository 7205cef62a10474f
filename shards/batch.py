"""Raw tar members -> checked arrays -> a padded training batch."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from shards.config import MEMBER_CLIP, flow_member, vision_member
from shards.npy import SampleError, all_finite, load_npy

log = logging.getLogger(__name__)


def _tokens(sample: dict, key: str, member: str, what: str) -> np.ndarray:
    tokens = load_npy(sample[member], f"{key}.{member}")
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise SampleError(f"{key}: {member} has shape {tokens.shape}, expected [T, D] with T > 0")
    if not all_finite(tokens):
        raise SampleError(f"{key}: non-finite values in {member}")
    return tokens


def vision_source(sample: dict, vision: str) -> str:
    """The member holding ``vision``'s tokens; shards from before the vision encoders hold CLIP's as clip.npy."""
    member = vision_member(vision)
    if member not in sample and vision == "clip" and MEMBER_CLIP in sample:
        return MEMBER_CLIP
    return member


def decode_sample(sample: dict, need_text: bool = False, latent_shape: tuple[int, ...] | None = None,
                  vision: str = "clip", need_flow: bool = False, need_video: bool = True) -> dict:
    """Raw tar members -> arrays for training. Raises ``SampleError`` for an unusable sample.

    ``vision`` picks the vision encoder whose tokens become ``clip`` (``vision-<name>.npy``;
    old shards' ``clip.npy`` is vision-clip); ``need_flow`` also reads ``flow-<name>.npy``.
    ``need_video=False`` (audio pre-training, text-only conditions) reads no vision or flow member,
    so audio-only shards, which have none, and video shards read alike (``clip`` is None).
    """
    key = sample.get("__key__", "?")
    need_flow = need_flow and need_video
    member = vision_source(sample, vision) if need_video else None
    wanted = ("latent.npy",) + ((member,) if need_video else ()) + (("text.npy",) if need_text else ()) + \
        ((flow_member(vision),) if need_flow else ())
    for m in wanted:
        if m not in sample:
            raise SampleError(f"{key}: missing {m}")
    clip = _tokens(sample, key, member, vision) if need_video else None
    latent = load_npy(sample["latent.npy"], f"{key}.latent.npy")
    if latent.ndim != 4 or latent.shape[0] != 2:
        raise SampleError(f"{key}: latent.npy has shape {latent.shape}, expected [2, C, H, W] (mean, std)")
    if latent_shape is not None and tuple(latent.shape) != tuple(latent_shape):
        raise SampleError(f"{key}: latent.npy has shape {latent.shape}, this run trains on {tuple(latent_shape)}")
    if not all_finite(latent):
        raise SampleError(f"{key}: non-finite values in latent.npy")
    out = {"key": key, "clip": clip, "latent": latent, "text": None}
    if need_flow:
        flow = _tokens(sample, key, flow_member(vision), vision)
        if flow.shape[1] != clip.shape[1]:
            raise SampleError(f"{key}: {flow_member(vision)} is {flow.shape[1]}-d, {member} {clip.shape[1]}-d")
        out["flow"] = flow
    if "text.npy" in sample:
        text = load_npy(sample["text.npy"], f"{key}.text.npy")
        # CLIP's text and image embeddings share one space (and width); other encoders' need not
        if text.ndim != 1 or (clip is not None and vision == "clip" and text.shape[0] != clip.shape[1]):
            width = clip.shape[1] if clip is not None and vision == "clip" else "D"
            raise SampleError(f"{key}: text.npy has shape {text.shape}, expected [{width}]")
        if not all_finite(text):
            raise SampleError(f"{key}: non-finite values in text.npy")
        out["text"] = text
    if "json" in sample:
        try:
            out["meta"] = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError(f"{key}: bad json member: {e}") from e
    for k in ("__state__", "__worker__"):
        if k in sample:
            out[k] = sample[k]
    return out


def _pad(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, D] arrays -> float16 [B, T_max, D] zero-padded and the bool mask of real tokens."""
    lengths = [a.shape[0] for a in arrays]
    out = np.zeros((len(arrays), max(lengths), arrays[0].shape[1]), np.float16)
    mask = np.zeros((len(arrays), max(lengths)), bool)
    for i, a in enumerate(arrays):
        out[i, : lengths[i]] = a
        mask[i, : lengths[i]] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def collate(samples: list[dict]) -> dict:
    """Stack a batch; vision tokens (and flow tokens) are padded to the longest and ``clip_mask``
    (``flow_mask``) marks real ones. Samples decoded without video give a batch without
    ``clip``/``clip_mask`` (nor flow)."""
    batch: dict[str, Any] = {"keys": [s["key"] for s in samples]}
    if all(s["clip"] is not None for s in samples):
        if len({s["clip"].shape[1] for s in samples}) != 1:
            raise SampleError("CLIP embedding widths differ inside one batch")
        batch["clip"], batch["clip_mask"] = _pad([s["clip"] for s in samples])
    batch["latent"] = torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float16, copy=False))
    if all("flow" in s for s in samples):
        batch["flow"], batch["flow_mask"] = _pad([s["flow"] for s in samples])
    if all(s["text"] is not None for s in samples):
        batch["text"] = torch.from_numpy(np.stack([s["text"] for s in samples]).astype(np.float16, copy=False))
    if "__state__" in samples[-1]:
        batch["__state__"] = samples[-1]["__state__"]
        batch["__worker__"] = samples[-1]["__worker__"]
    return batch


def skip_bad_sample(exn: Exception) -> bool:
    """webdataset handler: unusable samples are logged and skipped; anything else is raised."""
    if isinstance(exn, SampleError):
        log.warning("skipping sample: %s", exn)
        return True
    raise exn
