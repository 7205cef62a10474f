"""Frame geometry shared by the decoder and the image encoders: CLIP's resize and centre crop.

The decoder applies it to each RGB frame as it is decoded (``DecodeRequest.rgb_size``), so a
clip's frames cost memory in proportion to the encoder's input, not to the source resolution;
the encoders apply it to frames that arrive at any size. One implementation, so both give the
same pixels.
"""
from __future__ import annotations

import numpy as np


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side at ``size``, as CLIP's image processor computes it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]: short side to ``size`` (bicubic, antialiased
    like PIL), then the centre crop; the same geometry as CLIP's image processor."""
    import torch
    import torch.nn.functional as F

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    new_h, new_w = short_side_size(h, w, size)
    # uint8 channels-last input takes torch's fast integer path (PIL's algorithm, 20x the float path)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(new_h, new_w), mode="bicubic",
                          align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, :, top:top + size, left:left + size].permute(0, 2, 3, 1).contiguous().numpy()
