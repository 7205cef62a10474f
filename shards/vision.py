"""The vision encoders of the study: one interface, four members, one shard member each.

Every encoder loads from a Hugging Face id or a ``save_pretrained`` folder through the project's
one resolver (``core.models.resolve_pretrained``), refuses checkpoints that would leave weights
random, and turns a clip's uint8 frames (sampled at its own ``fps``, resized and centre-cropped to
its ``image_size``) into float32 tokens ``[N, dim]``:

- ``per-frame`` encoders give one token per frame (N = T): CLIP ViT-L/14 (``image_embeds``,
  CLIP4Clip's frame features, VTA-LDM's default; ``shards.encoders.ClipImageEncoder``) and SigLIP 2
  (the attention-pooling head's ``pooler_output``, which is what ``get_image_features`` returns and
  what HunyuanVideo-Foley feeds its model, from google/siglip2-base-patch16-512 at 8 fps).
- ``spatio-temporal`` encoders see ``window`` frames at once and make tubelet tokens (``tubelet``
  frames x patch x patch); the tokens of one tubelet time step are averaged over space, so token
  ``i`` is the output at frames ``[i * tubelet, (i + 1) * tubelet)``, i.e. it starts at
  ``i * tubelet / fps`` s (both encoders attend over the whole window, so a token also carries
  context from the window's other frames; windows are independent): ViViT
  (google/vivit-b-16x2-kinetics400: 32-frame windows, tubelets of 2) and V-JEPA 2
  (facebook/vjepa2-vitl-fpc64-256: 64-frame windows, tubelets of 2). A clip longer than a window
  is encoded window by window (the last padded by repeating its last frame) and its tokens are
  concatenated; N = ceil(T / tubelet), the padding's tokens dropped.

Each clip gets forward passes of its own, so a sample's features never depend on its batch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from core.device import torch_device
from core.frames import resize_crop
from core.models import ModelUnavailable, ResolvedModel, resolve_pretrained
from shards.encoders import ClipImageEncoder, quiet_transformers, require_complete

PER_FRAME = "per-frame"
SPATIO_TEMPORAL = "spatio-temporal"
HALF = (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class VisionEncoder(Protocol):
    """What the encode stage and the sampler use of a vision encoder."""

    name: str
    fps: float
    image_size: int
    layout: str
    dim: int
    feature: str  # what a token is, for the dataset card

    def token_count(self, frames: int) -> int: ...

    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Pixels:
    """How uint8 pixels become the model's input: x / 255 * scale (- 1 with offset), then (x - mean) / std."""

    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF
    rescale: float = 1 / 255
    offset: bool = False
    normalize: bool = True

    @classmethod
    def from_folder(cls, folder: Path, mean=HALF, std=HALF) -> "Pixels":
        """The folder's (video_)preprocessor_config.json, else the given defaults."""
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            path = folder / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                return cls(tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std)),
                           float(cfg.get("rescale_factor", 1 / 255)), bool(cfg.get("offset", False)),
                           bool(cfg.get("do_normalize", True)))
        return cls(tuple(mean), tuple(std))

    def tensor(self, frames: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 3, size, size] on ``device``."""
        if frames.shape[1:3] != (size, size):
            frames = resize_crop(frames, size)
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() * self.rescale
        if self.offset:
            x = x - 1.0
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


def _dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or (torch.float16 if device.type == "cuda" else torch.float32)


def _load(cls, resolved: ResolvedModel, what: str, **kwargs):
    with quiet_transformers():
        model, info = cls.from_pretrained(resolved.path, output_loading_info=True, **kwargs)
    require_complete(what, info)
    return model


class ClipVision:
    """CLIP ViT-L/14 ``image_embeds`` per frame: ``ClipImageEncoder`` behind the common interface."""

    name = "clip"
    layout = PER_FRAME
    feature = "CLIPVisionModelWithProjection.image_embeds, one token per frame"

    def __init__(self, image: ClipImageEncoder, fps: float):
        self.image, self.fps = image, float(fps)
        self.image_size, self.dim = image.image_size, image.dim

    @classmethod
    def load(cls, spec: str, device="auto", fps: float = 2.0, normalize: bool = True,
             batch_frames: int = 64) -> "ClipVision":
        return cls(ClipImageEncoder.load(spec, device, normalize=normalize, batch_frames=batch_frames), fps)

    def token_count(self, frames: int) -> int:
        return frames

    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.image.encode_clips(clips)


class Siglip2Vision:
    """SigLIP 2 per frame: the vision tower's attention-pooled ``pooler_output``.

    The fixed-resolution releases (google/siglip2-*-patch16-512, HunyuanVideo-Foley's) are
    ``SiglipModel`` checkpoints; the NaFlex ones are ``Siglip2Model``: their frames go in as a
    square patch grid of ``sqrt(num_patches)`` patches a side.
    """

    name = "siglip2"
    layout = PER_FRAME
    feature = "SigLIP 2 vision tower pooler_output (MAP head; get_image_features), one token per frame"

    def __init__(self, model, naflex: bool, image_size: int, patch: int, pixels: Pixels, device, dtype,
                 fps: float, batch_frames: int = 64):
        self.model, self.naflex, self.image_size, self.patch = model, naflex, int(image_size), int(patch)
        self.pixels, self.device, self.dtype, self.fps = pixels, device, dtype, float(fps)
        self.batch_frames = max(1, int(batch_frames))
        self.dim = int(model.config.hidden_size)

    @classmethod
    def load(cls, spec: str, device="auto", fps: float = 8.0, dtype=None, batch_frames: int = 64) -> "Siglip2Vision":
        from transformers import Siglip2VisionModel, SiglipVisionModel

        resolved = resolve_pretrained(spec)
        cfg = resolved.config()
        kind = cfg.get("model_type", "")
        vision = cfg.get("vision_config", cfg)
        dev = torch_device(device)
        if kind in ("siglip2", "siglip2_vision_model"):
            model = _load(Siglip2VisionModel, resolved, f"SigLIP 2 vision tower of {spec}")
            side = math.isqrt(int(model.config.num_patches))
            size, naflex = side * int(model.config.patch_size), True
        elif kind in ("siglip", "siglip_vision_model"):
            model = _load(SiglipVisionModel, resolved, f"SigLIP 2 vision tower of {spec}")
            size, naflex = int(model.config.image_size), False
        else:
            raise ModelUnavailable(spec, f"model_type {kind!r} is not a SigLIP (2) checkpoint")
        if not getattr(model.config, "vision_use_head", True):
            raise ModelUnavailable(spec, "the vision tower has no pooling head (vision_use_head false)")
        dtype = _dtype(dev, dtype)
        return cls(model.to(dev, dtype).eval(), naflex, size, vision.get("patch_size", model.config.patch_size),
                   Pixels.from_folder(resolved.path), dev, dtype, fps, batch_frames)

    def token_count(self, frames: int) -> int:
        return frames

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.naflex:
            return self.model(pixel_values=x).pooler_output
        b, c, s, _ = x.shape
        n, p = s // self.patch, self.patch
        # the Siglip2 image processor's patch layout: row-major patches, each (p, p, channels) flattened
        patches = x.reshape(b, c, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, p * p * c)
        mask = torch.ones(b, n * n, dtype=torch.long, device=x.device)
        shapes = torch.tensor([[n, n]] * b, dtype=torch.long, device=x.device)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output

    @torch.inference_mode()
    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for frames in clips:
            if len(frames) == 0:
                out.append(np.zeros((0, self.dim), np.float32))
                continue
            x = self.pixels.tensor(frames, self.image_size, self.device).to(self.dtype)
            out.append(torch.cat([self._forward(x[i:i + self.batch_frames]).float().cpu()
                                  for i in range(0, x.shape[0], self.batch_frames)]).numpy())
        return out


class _TubeletVision:
    """Shared by ViViT and V-JEPA 2: windows of frames -> tubelet tokens -> one token per tubelet step."""

    layout = SPATIO_TEMPORAL
    name = title = ""
    default_fps = 1.0
    load_kwargs: dict = {}
    pixel_defaults = (HALF, HALF)

    @classmethod
    def load(cls, spec: str, device="auto", fps: float | None = None, dtype=None):
        """The encoder of a checkpoint (its model class, window and tubelet geometry from its config)."""
        resolved = resolve_pretrained(spec)
        dev = torch_device(device)
        model = _load(cls.model_class(), resolved, f"{cls.title} encoder of {spec}", **cls.load_kwargs)
        dtype = _dtype(dev, dtype)
        return cls(model.to(dev, dtype).eval(), *cls.geometry(model.config),
                   Pixels.from_folder(resolved.path, *cls.pixel_defaults), dev, dtype, fps or cls.default_fps)

    def __init__(self, model, window: int, tubelet: int, image_size: int, patch: int, pixels: Pixels,
                 device, dtype, fps: float):
        self.model, self.window, self.tubelet = model, int(window), int(tubelet)
        self.image_size, self.patch, self.pixels = int(image_size), int(patch), pixels
        self.device, self.dtype, self.fps = device, dtype, float(fps)
        self.dim = int(model.config.hidden_size)
        if self.window % self.tubelet:
            raise ModelUnavailable(self.name, f"window {self.window} is not a multiple of the tubelet {self.tubelet}")

    def token_count(self, frames: int) -> int:
        return -(-frames // self.tubelet)

    def _patch_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """[1, window, 3, S, S] -> patch tokens [1, window / tubelet * (S / patch)^2, dim]."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        steps, grid = self.window // self.tubelet, (self.image_size // self.patch) ** 2
        for frames in clips:
            t = len(frames)
            if t == 0:
                out.append(np.zeros((0, self.dim), np.float32))
                continue
            x = self.pixels.tensor(frames, self.image_size, self.device).to(self.dtype)
            pad = -t % self.window
            if pad:
                x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            tokens = []
            for w in range(0, x.shape[0], self.window):
                patches = self._patch_tokens(x[None, w:w + self.window])
                tokens.append(patches.reshape(steps, grid, self.dim).float().mean(dim=1).cpu())
            out.append(torch.cat(tokens)[: self.token_count(t)].numpy())
        return out


class VivitVision(_TubeletVision):
    """ViViT's encoder tokens (``last_hidden_state`` without the CLS token), pooled per tubelet step."""

    name, title, default_fps = "vivit", "ViViT", 12.5
    feature = "VivitModel.last_hidden_state patch tokens (CLS dropped), mean over space per tubelet step"
    load_kwargs = {"add_pooling_layer": False}

    @staticmethod
    def model_class():
        from transformers import VivitModel

        return VivitModel

    @staticmethod
    def geometry(cfg) -> tuple[int, int, int, int]:
        tubelet = list(cfg.tubelet_size)
        return cfg.num_frames, tubelet[0], cfg.image_size, tubelet[1]

    def _patch_tokens(self, video: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=video).last_hidden_state[:, 1:]


class Vjepa2Vision(_TubeletVision):
    """V-JEPA 2's encoder tokens (the predictor is not run), pooled per tubelet step."""

    name, title, default_fps = "vjepa2", "V-JEPA 2", 6.4
    feature = "VJEPA2Model encoder last_hidden_state (skip_predictor), mean over space per tubelet step"
    pixel_defaults = IMAGENET

    @staticmethod
    def model_class():
        from transformers import VJEPA2Model

        return VJEPA2Model

    @staticmethod
    def geometry(cfg) -> tuple[int, int, int, int]:
        return cfg.frames_per_clip, cfg.tubelet_size, cfg.crop_size, cfg.patch_size

    def _patch_tokens(self, video: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values_videos=video, skip_predictor=True).last_hidden_state


@dataclass(frozen=True)
class VisionKind:
    """One member of the study: its registry entry, its loader and its random stand-in."""

    name: str
    registry: str
    load: Callable[..., VisionEncoder]
    build_random: Callable[[Path], Path]


def _random_clip(folder: Path) -> Path:
    from shards.random_models import build_random_clip

    return build_random_clip(folder, size="tiny", projection_dim=768)


def _random(builder: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from shards import random_models

        return getattr(random_models, builder)(folder)
    return build


VISION_KINDS: dict[str, VisionKind] = {  # one per name in shards.config.VISION_ENCODERS (a test checks)
    "clip": VisionKind("clip", "clip", ClipVision.load, _random_clip),
    "siglip2": VisionKind("siglip2", "siglip2", Siglip2Vision.load, _random("build_random_siglip2")),
    "vivit": VisionKind("vivit", "vivit", VivitVision.load, _random("build_random_vivit")),
    "vjepa2": VisionKind("vjepa2", "vjepa2", Vjepa2Vision.load, _random("build_random_vjepa2")),
}


def describe(name: str, cfg: dict, fps: float, window_s: float) -> dict:
    """What the dataset card says of one encoder, read from its config.json: input side, token
    layout, width, frames and tokens of a full window (``frames`` grid points of ``fps``)."""
    vision = cfg.get("vision_config", cfg)
    frames = int(round(window_s * fps))
    tubelet, window = 1, 1
    if name == "clip":
        size, dim = int(vision.get("image_size", 224)), int(vision.get("projection_dim", cfg.get("projection_dim", 0)))
    elif name == "siglip2":
        patch = int(vision.get("patch_size", 16))
        size = int(vision["image_size"]) if "image_size" in vision else math.isqrt(int(vision["num_patches"])) * patch
        dim = int(vision["hidden_size"])
    elif name == "vivit":
        size, dim = int(cfg["image_size"]), int(cfg["hidden_size"])
        tubelet, window = int(list(cfg["tubelet_size"])[0]), int(cfg["num_frames"])
    elif name == "vjepa2":
        size, dim = int(cfg["crop_size"]), int(cfg["hidden_size"])
        tubelet, window = int(cfg["tubelet_size"]), int(cfg["frames_per_clip"])
    else:
        raise ValueError(f"unknown vision encoder {name!r}")
    layout = PER_FRAME if tubelet == 1 else SPATIO_TEMPORAL
    info = {"fps": float(fps), "image_size": size, "dim": dim, "token_layout": layout, "frames": frames,
            "tokens": -(-frames // tubelet), "feature": _FEATURES[name]}
    if layout == SPATIO_TEMPORAL:
        info.update(window_frames=window, tubelet_frames=tubelet, token_seconds=tubelet / float(fps),
                    token_time="token i is the encoder output at frames [i, i + 1) * tubelet_frames (from "
                               "i * tubelet_frames / fps s), averaged over space; attention spans its window of "
                               "window_frames frames (the last window padded with its last frame)")
    return info


_FEATURES = {"clip": ClipVision.feature, "siglip2": Siglip2Vision.feature, "vivit": VivitVision.feature,
             "vjepa2": Vjepa2Vision.feature}
