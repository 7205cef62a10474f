"""The VTA-LDM denoiser: a diffusers UNet2DConditionModel cross-attending to projected CLIP tokens.

VTA-LDM's condition path is kept (per-frame CLIP ``image_embeds`` through a linear layer, optional
CLIP text token and sinusoidal positional embedding) with its known flaws fixed: the projection is
part of this module, so the optimiser trains it; and the null condition used for classifier-free
guidance is a learned token that training shows the model (``drop``), not a zero context it never
saw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from torch import nn

from train.config import ModelConfig, NoiseConfig, load_unet_config


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Transformer sin/cos position table ``[length, dim]`` (even columns sin, odd columns cos)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


class ConditionEncoder(nn.Module):
    """Vision tokens (+ flow tokens, + text token, + positions) -> cross-attention context and its padding mask.

    Flow tokens (the same encoder's tokens of the flow images) are concatenated after the video
    tokens along the sequence axis and go through the same projection; with ``pe`` each gets the
    position of its frame, so a frame's video and flow tokens share a time position.
    """

    def __init__(self, cfg: ModelConfig, cross_attention_dim: int):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.clip_dim, cross_attention_dim)
        if cfg.use_text and not cfg.shared_text_projection:
            self.text_proj = nn.Linear(cfg.text_dim, cross_attention_dim)
        self.null = nn.Parameter(torch.randn(1, cross_attention_dim) * 0.02)
        if cfg.use_pe:
            self.register_buffer("pe", sinusoidal_table(cfg.max_frames, cfg.clip_dim), persistent=False)

    def text_copies(self, frames: int) -> int:
        if not self.cfg.use_text:
            return 0
        return self.cfg.text_repeat or frames

    def context_length(self, frames: int, flow_frames: int = 0) -> int:
        return frames + flow_frames + self.text_copies(frames)

    def _positioned(self, tokens: torch.Tensor, what: str) -> torch.Tensor:
        if tokens.shape[-1] != self.cfg.clip_dim:
            raise ValueError(f"{what} tokens are {tokens.shape[-1]}-d, the model expects {self.cfg.clip_dim}")
        x = tokens.to(self.proj.weight.dtype)
        if self.cfg.use_pe:
            if tokens.shape[1] > self.cfg.max_frames:
                raise ValueError(f"{tokens.shape[1]} {what} tokens exceed max_frames={self.cfg.max_frames}")
            x = x + self.pe[:tokens.shape[1]].to(x.dtype)
        return x

    def forward(self, clip: torch.Tensor | None, clip_mask: torch.Tensor | None, text: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, flow: torch.Tensor | None = None,
                flow_mask: torch.Tensor | None = None, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``clip`` [B,T,D] vision tokens, ``clip_mask`` [B,T] (True = real frame), ``text`` [B,D_text],
        ``drop`` [B] bool, ``flow`` [B,F,D] and ``flow_mask`` [B,F] for the +flow conditions.

        Without video (``clip`` None: a text-only condition, or text-to-audio with a video+text
        model) the context is the text token(s) alone; condition "none" is always the null context.
        """
        if self.cfg.condition == "none":
            return self.null_context(batch or _batch_of(clip, text, drop), 1)
        if clip is None or not self.cfg.use_video:
            return self._text_only(text, drop)
        frames = clip.shape[1]
        x = self._positioned(clip, f"{self.cfg.vision_encoder} vision")
        mask = clip_mask.bool()
        frame_mask = mask
        if self.cfg.use_flow:
            if flow is None or flow_mask is None:
                raise ValueError(f"condition {self.cfg.condition!r} needs the flow tokens "
                                 f"(flow-{self.cfg.vision_encoder}.npy: encode with --with-flow)")
            x = torch.cat([x, self._positioned(flow, "flow")], dim=1)
            mask = torch.cat([mask, flow_mask.bool()], dim=1)
        tokens = self.proj(x)
        if self.cfg.use_text:
            if text is None:
                raise ValueError(f"condition {self.cfg.condition!r} needs the CLIP text embedding (text.npy)")
            copies = self.text_copies(frames)
            text_tokens = self._text_projection()(text.to(x.dtype))[:, None].expand(-1, copies, -1)
            # VTA-LDM's repeat (text_repeat 0): one copy per real frame, padded frames' copies masked
            text_mask = frame_mask if self.cfg.text_repeat == 0 else torch.ones_like(mask[:, :1]).expand(-1, copies)
            tokens = torch.cat([text_tokens, tokens], dim=1)
            mask = torch.cat([text_mask, mask], dim=1)
        return self._dropped(tokens, mask, drop)

    def _text_projection(self) -> nn.Linear:
        return self.proj if self.cfg.shared_text_projection else self.text_proj

    def _text_only(self, text: torch.Tensor | None, drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The text token, ``text_repeat`` copies (one when 0: there are no frames to match)."""
        if not self.cfg.use_text or text is None:
            raise ValueError(f"condition {self.cfg.condition!r} without video tokens needs the CLIP text "
                             f"embedding (a model trained with text, and text.npy or --caption)")
        proj = self._text_projection()
        tokens = proj(text.to(proj.weight.dtype))[:, None].expand(-1, self.cfg.text_repeat or 1, -1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self._dropped(tokens, mask, drop)

    def _dropped(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None):
        """Replace the dropped samples' context by the null condition (classifier-free guidance)."""
        if drop is not None:
            null_tokens, null_mask = self.null_context(tokens.shape[0], tokens.shape[1])
            tokens = torch.where(drop[:, None, None], null_tokens.to(tokens.dtype), tokens)
            mask = torch.where(drop[:, None], null_mask, mask)
        return tokens, mask

    def null_context(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The null condition: the learned null token, first position valid, the rest masked."""
        tokens = self.null[None].expand(batch, length, -1)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=self.null.device)
        mask[:, 0] = True
        return tokens, mask


def _batch_of(*tensors: torch.Tensor | None) -> int:
    return next(t.shape[0] for t in tensors if t is not None)


class VideoToAudioUNet(nn.Module):
    """UNet on AudioLDM VAE latents, cross-attending to the encoded video condition."""

    def __init__(self, cfg: ModelConfig, unet_config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet_config = dict(unet_config if unet_config is not None else load_unet_config(cfg.unet_config))
        self.unet = UNet2DConditionModel.from_config(self.unet_config)
        self.cond = ConditionEncoder(cfg, self.unet.config.cross_attention_dim)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, clip: torch.Tensor | None,
                clip_mask: torch.Tensor | None, text: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, flow: torch.Tensor | None = None,
                flow_mask: torch.Tensor | None = None) -> torch.Tensor:
        context, mask = self.cond(clip, clip_mask, text, drop, flow, flow_mask, batch=noisy.shape[0])
        return self.unet(noisy, timesteps, encoder_hidden_states=context,
                         encoder_attention_mask=mask).sample


def noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training forward process (also the source of the sampler's schedulers)."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def sampling_scheduler(cfg: NoiseConfig, kind: str):
    """DDIM or DPM-Solver++ over the same betas and parameterisation the model was trained with."""
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                  beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, timestep_spacing="trailing")
    if kind == "ddim":  # the last step goes to alpha = 1: the result is the predicted clean latent
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    if kind == "dpm":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                           **common)
    raise ValueError(f"unknown scheduler {kind!r} (ddim or dpm)")


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar, min-SNR weighted mean
    per_sample: torch.Tensor  # [B] weighted per-sample losses
    drop: torch.Tensor  # [B] which samples used the null condition


class DiffusionLoss:
    """v-prediction (or epsilon) MSE with min-SNR-gamma weighting (Hang et al. 2023)."""

    def __init__(self, cfg: NoiseConfig):
        self.cfg = cfg
        self.scheduler = noise_scheduler(cfg)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float32)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return a / (1.0 - a)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        snr = self.snr(timesteps)
        if self.cfg.snr_gamma <= 0:
            return torch.ones_like(snr)
        clipped = torch.clamp(snr, max=self.cfg.snr_gamma)
        # v-prediction's loss is (snr + 1) times the x0 loss, epsilon's is snr times
        return clipped / (snr + 1.0) if self.cfg.prediction_type == "v_prediction" else clipped / snr

    def __call__(self, model: nn.Module, batch: dict, scaling_factor: float, generator: torch.Generator,
                 cond_dropout: float = 0.0, timesteps: torch.Tensor | None = None) -> LossTerms:
        latent = batch["latent"]  # [B, 2, C, H, W]: posterior mean, std
        device = latent.device
        b = latent.shape[0]
        eps_z = torch.randn(latent[:, 0].shape, generator=generator, device=device)
        noise = torch.randn(latent[:, 0].shape, generator=generator, device=device)
        if timesteps is None:
            timesteps = torch.randint(0, self.cfg.num_train_timesteps, (b,), generator=generator, device=device)
        drop = condition_dropout(b, cond_dropout, generator, device)
        return self.with_draws(model, batch, scaling_factor, eps_z, noise, timesteps, drop)

    def with_draws(self, model: nn.Module, batch: dict, scaling_factor: float, eps_z: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, drop: torch.Tensor) -> LossTerms:
        """The loss for given random draws (the validation fixes them per sample)."""
        latent = batch["latent"]
        mean, std = latent[:, 0].float(), latent[:, 1].float()
        x0 = (mean + std * eps_z) * scaling_factor
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        target = self.scheduler.get_velocity(x0, noise, timesteps) if self.cfg.prediction_type == "v_prediction" else noise
        pred = model(noisy, timesteps, batch.get("clip"), batch.get("clip_mask"), batch.get("text"), drop,
                     batch.get("flow"), batch.get("flow_mask"))
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        per_sample = per_sample * self.weights(timesteps)
        return LossTerms(loss=per_sample.mean(), per_sample=per_sample.detach(), drop=drop)


def condition_dropout(batch: int, rate: float, generator: torch.Generator, device) -> torch.Tensor:
    """Which samples of a batch train on the null condition (Bernoulli(rate) each)."""
    u = torch.rand(batch, generator=generator, device=device)
    return u < rate
