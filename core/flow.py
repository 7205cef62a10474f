"""Dense optical flow (Farneback) and its standard colour rendering, shared by scoring and encoding.

One flow computation for the project: AV-Align (``filters.av_align``) measures motion with it and
the encode stage (``shards.encode_stage``, ``--with-flow``) renders it into flow images that a
vision encoder embeds. The parameters are the published AV-Align ones, which are OpenCV's
tutorial values.

Rendering (``flow_image``) is the usual HSV colour wheel: hue = direction (OpenCV's hue scale,
angle in degrees / 2), full saturation, value = magnitude. The magnitude is divided by one scale
per clip (``flow_scale``: the clip's largest magnitude, at least ``min_scale`` px/frame), not per
frame as OpenCV's tutorial does, so that a still frame stays dark next to a moving one and the
encoder sees when motion happens; the floor keeps a still clip's sub-pixel noise dark too.
"""
from __future__ import annotations

import cv2
import numpy as np

# (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags), as AV-Align publishes them
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def farneback(prev: np.ndarray, nxt: np.ndarray, params: tuple = FARNEBACK) -> np.ndarray:
    """Flow [H, W, 2] (dx, dy in px) from one uint8 greyscale frame to the next."""
    return cv2.calcOpticalFlowFarneback(prev, nxt, None, *params)


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] -> uint8 luma [T, H, W] (OpenCV's BT.601 weights)."""
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]) if len(frames) \
        else np.zeros(frames.shape[:3], np.uint8)


def pair_flows(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Flow from ``first[i]`` to ``second[i]`` for uint8 RGB frame pairs: float32 [T, H, W, 2]."""
    if first.shape != second.shape:
        raise ValueError(f"flow pairs need frames of one shape, got {first.shape} and {second.shape}")
    a, b = to_gray(first), to_gray(second)
    return np.stack([farneback(a[i], b[i]) for i in range(len(a))]) if len(a) \
        else np.zeros((*first.shape[:3], 2), np.float32)


def flow_scale(flows: np.ndarray, min_scale: float = 1.0) -> float:
    """The clip's magnitude scale: its largest flow magnitude, never below ``min_scale`` px/frame."""
    if flows.size == 0:
        return float(min_scale)
    magnitude = np.sqrt(np.square(flows[..., 0], dtype=np.float64) + np.square(flows[..., 1], dtype=np.float64))
    return max(float(min_scale), float(magnitude.max()))


def flow_image(flow: np.ndarray, scale: float) -> np.ndarray:
    """One flow field [H, W, 2] -> uint8 RGB [H, W, 3]: hue = direction, value = magnitude / scale."""
    magnitude, angle = cv2.cartToPolar(flow[..., 0], flow[..., 1], angleInDegrees=True)
    hsv = np.empty((*flow.shape[:2], 3), np.uint8)
    hsv[..., 0] = np.round(angle / 2.0).astype(np.int32) % 180
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(np.round(magnitude * (255.0 / scale)), 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def flow_images(first: np.ndarray, second: np.ndarray, min_scale: float = 1.0) -> np.ndarray:
    """Rendered flow of each frame pair, one scale for the clip: uint8 RGB [T, H, W, 3]."""
    flows = pair_flows(first, second)
    scale = flow_scale(flows, min_scale)
    if len(flows) == 0:
        return np.zeros((*first.shape[:3], 3), np.uint8)
    return np.stack([flow_image(f, scale) for f in flows])


def flow_step(encoder_fps: float, pair_fps: float) -> int:
    """Dense-grid frames per feature frame: the flow pairs are 1/(encoder_fps * step) s apart."""
    return max(1, int(round(pair_fps / encoder_fps)))


def flow_frames(dense: np.ndarray, step: int, min_scale: float) -> np.ndarray:
    """Flow images at the feature rate from frames on a grid ``step`` times denser: image k is the
    flow from dense frame k*step to the next one (the last frame pairs with the one before it)."""
    if len(dense) < 2:
        return np.zeros((len(dense), *dense.shape[1:]), np.uint8)
    idx = np.arange(0, len(dense), step)
    nxt = np.minimum(idx + 1, len(dense) - 1)
    first = np.where(nxt > idx, idx, idx - 1)
    return flow_images(dense[first], dense[np.maximum(nxt, first + 1)], min_scale)
