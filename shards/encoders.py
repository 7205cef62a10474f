"""The feature encoders of the shards: CLIP image, CLIP text and AudioLDM's VAE.

Each loads from a Hugging Face id (local cache, or the hub when allowed) or a ``save_pretrained``
folder through the project's one resolver (``core.models.resolve_pretrained``), once per worker,
runs on the GPU when there is one (all frames of a clip in one batch), and refuses checkpoints
that would leave any weight randomly initialised (a feature from an uninitialised layer is a
feature nobody computed). The resolved folder lets the dataset card record the sha256 of the
exact weight files that made the features.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.device import torch_device
from core.frames import resize_crop
from core.models import ModelUnavailable, resolve_pretrained
from shards.config import MelConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@contextmanager
def quiet_transformers():
    """transformers prints a load report listing the unused tower of a full CLIP checkpoint."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def require_complete(name: str, info: dict) -> None:
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ModelUnavailable(name, f"checkpoint lacks {len(missing)} weights and mismatches {len(mismatched)} "
                             f"(e.g. {(missing + mismatched)[:3]}); refusing to encode with random layers")


class ClipImageEncoder:
    """``CLIPVisionModelWithProjection.image_embeds`` of video frames (one token per frame)."""

    def __init__(self, model, image_size: int, mean: Sequence[float], std: Sequence[float], normalize: bool,
                 device: torch.device, dtype: torch.dtype, batch_frames: int = 64):
        self.model = model
        self.image_size = int(image_size)
        self.normalize = bool(normalize)
        self.device = device
        self.dtype = dtype
        self.batch_frames = max(1, int(batch_frames))
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, id_or_path: str, device: str | torch.device | None = "auto", normalize: bool = True,
             dtype: torch.dtype | None = None, batch_frames: int = 64) -> "ClipImageEncoder":
        from transformers import CLIPVisionModelWithProjection

        resolved = resolve_pretrained(id_or_path)
        dev = torch_device(device)
        dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        with quiet_transformers():
            model, info = CLIPVisionModelWithProjection.from_pretrained(resolved.path, output_loading_info=True)
        require_complete(f"CLIP vision tower of {id_or_path}", info)
        model = model.to(dev, dtype).eval()
        mean, std = _image_stats(resolved.path)
        return cls(model, model.config.image_size, mean, std, normalize, dev, dtype, batch_frames)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames -> the model's input [T, 3, S, S]: resize + crop, [0, 1], optionally CLIP-normalised."""
        if frames.shape[1:3] != (self.image_size, self.image_size):
            frames = resize_crop(frames, self.image_size)
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if self.normalize:
            x = (x - self._mean) / self._std
        return x

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] -> float32 [T, dim]."""
        return self.encode_clips([frames])[0]

    @torch.inference_mode()
    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One float32 [T_i, dim] array per clip.

        Each clip gets its own forward passes (``batch_frames`` frames at a time): float kernels
        depend on the batch shape, so a clip's features must not depend on which clips shared its
        batch, or a resumed run (other batches) would not reproduce the bytes of a straight run.
        """
        out = []
        for frames in clips:
            if len(frames) == 0:
                out.append(np.zeros((0, self.dim), np.float32))
                continue
            pixels = self.pixel_values(frames).to(self.dtype)
            emb = [self.model(pixel_values=pixels[i:i + self.batch_frames]).image_embeds.float().cpu()
                   for i in range(0, pixels.shape[0], self.batch_frames)]
            out.append(torch.cat(emb).numpy())
        return out


def _image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pixel mean/std from the folder's preprocessor_config.json, else OpenAI CLIP's."""
    cfg_path = folder / "preprocessor_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class ClipTextEncoder:
    """``CLIPTextModelWithProjection.text_embeds`` of captions."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                              int(model.config.max_position_embeddings))

    @classmethod
    def load(cls, id_or_path: str, device: str | torch.device | None = "auto",
             dtype: torch.dtype | None = None) -> "ClipTextEncoder":
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        resolved = resolve_pretrained(id_or_path)
        dev = torch_device(device)
        dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        with quiet_transformers():
            model, info = CLIPTextModelWithProjection.from_pretrained(resolved.path, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        require_complete(f"CLIP text tower of {id_or_path}", info)
        return cls(model.to(dev, dtype).eval(), tokenizer, dev, dtype)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> float32 [B, dim] (truncated to CLIP's 77 tokens)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                       .text_embeds.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)


class AudioVAE:
    """AudioLDM's ``AutoencoderKL`` on log-mels: [B, n_mels, frames] <-> [B, C, frames/4, n_mels/4]."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype = torch.float32, batch_size: int = 1):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def load(cls, id_or_path: str, device: str | torch.device | None = "auto",
             dtype: torch.dtype = torch.float32, batch_size: int = 1) -> "AudioVAE":
        from diffusers import AutoencoderKL

        resolved = resolve_pretrained(id_or_path, pipeline_subfolder="vae")
        dev = torch_device(device)
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        model, info = AutoencoderKL.from_pretrained(resolved.path, output_loading_info=True)
        require_complete(f"VAE {id_or_path}", info)
        if model.config.in_channels != 1:
            raise ModelUnavailable(id_or_path, f"the VAE takes {model.config.in_channels} input channels; "
                                 f"AudioLDM's takes a 1-channel mel")
        return cls(model.to(dev, dtype).eval(), dev, dtype, batch_size)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def _as_tensor(self, x) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        return t.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_posterior(self, mels) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mels [B, n_mels, frames] -> posterior (mean, std), each float32 [B, C, frames/4, n_mels/4] on CPU.

        ``batch_size`` mels per forward pass; the default 1 makes every result independent of its
        neighbours (float kernels vary with the batch shape), which reproducible shards need.
        """
        x = self._as_tensor(mels)
        if x.ndim != 3:
            raise ValueError(f"expected mels [B, n_mels, frames], got {tuple(x.shape)}")
        means, stds = [], []
        for i in range(0, x.shape[0], self.batch_size):
            # AudioLDM feeds the mel as a 1-channel image of [time, mel bands]
            dist = self.model.encode(x[i:i + self.batch_size].transpose(1, 2).unsqueeze(1)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    @torch.inference_mode()
    def decode(self, latents) -> torch.Tensor:
        """Unscaled latents [B, C, frames/4, n_mels/4] -> log-mels [B, n_mels, frames] (float32, model device).

        Divide diffusion-space latents by ``scaling_factor`` before calling this.
        """
        z = self._as_tensor(latents)
        out = [self.model.decode(z[i:i + self.batch_size]).sample.squeeze(1).transpose(1, 2).float()
               for i in range(0, z.shape[0], self.batch_size)]
        return torch.cat(out)


def posterior_member(mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> np.ndarray:
    """One sample's ``latent.npy``: float16 [2, C, H, W] = stack(mean, std)."""
    return np.stack([np.asarray(mean, np.float32), np.asarray(std, np.float32)]).astype(np.float16)


def check_vae_fits_mel(vae: AudioVAE, mel: MelConfig) -> None:
    """The VAE must divide the mel evenly (1024 x 64 by 4)."""
    d = vae.downsample
    if mel.frames % d or mel.n_mels % d:
        raise ModelUnavailable("vae", f"VAE downsamples by {d}, which does not divide the mel {mel.n_mels}x{mel.frames}")
