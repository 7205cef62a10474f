"""Raw tar members -> checked arrays -> a padded training batch."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from shards.npy import SampleError, all_finite, load_npy

log = logging.getLogger(__name__)


def decode_sample(sample: dict, need_text: bool = False, latent_shape: tuple[int, ...] | None = None,
                  need_video: bool = True) -> dict:
    """Raw tar members -> arrays for training. Raises ``SampleError`` for an unusable sample.

    ``need_video=False`` (audio pre-training, text-only conditions) ignores ``clip.npy``, so
    audio-only shards, which have none, and video shards read alike."""
    key = sample.get("__key__", "?")
    for member in ("latent.npy",) + (("clip.npy",) if need_video else ()) + (("text.npy",) if need_text else ()):
        if member not in sample:
            raise SampleError(f"{key}: missing {member}")
    clip = load_npy(sample["clip.npy"], f"{key}.clip.npy") if need_video else None
    latent = load_npy(sample["latent.npy"], f"{key}.latent.npy")
    if clip is not None and (clip.ndim != 2 or clip.shape[0] == 0):
        raise SampleError(f"{key}: clip.npy has shape {clip.shape}, expected [T, D] with T > 0")
    if latent.ndim != 4 or latent.shape[0] != 2:
        raise SampleError(f"{key}: latent.npy has shape {latent.shape}, expected [2, C, H, W] (mean, std)")
    if latent_shape is not None and tuple(latent.shape) != tuple(latent_shape):
        raise SampleError(f"{key}: latent.npy has shape {latent.shape}, this run trains on {tuple(latent_shape)}")
    if not ((clip is None or all_finite(clip)) and all_finite(latent)):
        raise SampleError(f"{key}: non-finite values in clip.npy or latent.npy")
    out = {"key": key, "clip": clip, "latent": latent, "text": None}
    if "text.npy" in sample:
        text = load_npy(sample["text.npy"], f"{key}.text.npy")
        width = clip.shape[1] if clip is not None else text.shape[-1]
        if text.ndim != 1 or text.shape[0] != width or not all_finite(text):
            raise SampleError(f"{key}: text.npy has shape {text.shape}, expected [{width}] finite values")
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


def collate(samples: list[dict]) -> dict:
    """Stack a batch; CLIP tokens are padded to the longest and ``clip_mask`` marks real frames.
    Samples decoded without video give a batch without ``clip``/``clip_mask``."""
    if any(s["clip"] is None for s in samples):
        return _collate_common(samples, {"keys": [s["key"] for s in samples]})
    if len({s["clip"].shape[1] for s in samples}) != 1:
        raise SampleError("CLIP embedding widths differ inside one batch")
    lengths = [s["clip"].shape[0] for s in samples]
    t_max, dim = max(lengths), samples[0]["clip"].shape[1]
    clip = np.zeros((len(samples), t_max, dim), np.float16)
    mask = np.zeros((len(samples), t_max), bool)
    for i, s in enumerate(samples):
        clip[i, : lengths[i]] = s["clip"]
        mask[i, : lengths[i]] = True
    return _collate_common(samples, {"keys": [s["key"] for s in samples], "clip": torch.from_numpy(clip),
                                     "clip_mask": torch.from_numpy(mask)})


def _collate_common(samples: list[dict], batch: dict[str, Any]) -> dict:
    """Latents, text and the stream state: the members every batch has."""
    batch["latent"] = torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float16, copy=False))
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
