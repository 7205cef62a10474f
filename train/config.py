"""One frozen dataclass per training concern; ``python -m train`` builds its flags from these.

``ModelConfig`` says what network is built, ``NoiseConfig`` the diffusion process it learns, and
``TrainConfig`` how the optimisation runs. The sampler reads the first two back from a run's
``model_config.json`` so that training and sampling can never disagree about them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.registry import default_spec
from shards.config import VISION_ENCODERS, ReaderConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FULL_UNET_CONFIG = str(CONFIG_DIR / "vta_ldm_unet.json")
TINY_UNET_CONFIG = str(CONFIG_DIR / "tiny_unet.json")

_READER = {f.name: f for f in dataclasses.fields(ReaderConfig)}  # the reader's defaults and help, not copies

# "text": the CLIP text token(s) only (audio pre-training, text-to-audio); "none": unconditional
Condition = Literal["video", "video+text", "video+pe", "video+text+pe",
                    "video+flow", "video+flow+text", "video+flow+pe", "video+flow+text+pe", "text", "none"]
Pretrain = Literal["none", "audio"]


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser and its conditioning (docs/training.md)."""

    unet_config: str = field(default=FULL_UNET_CONFIG, metadata={
        "help": "diffusers UNet2DConditionModel config JSON (VTA-LDM's full config by default)"})
    condition: Condition = field(default="video", metadata={
        "help": "conditioning variant: CLIP frame tokens, plus the CLIP text token and/or a "
                "sinusoidal positional embedding of the frame index; text: the text token only; "
                "none: unconditional (audio self-supervised pre-training)"})
    text_repeat: int = field(default=1, metadata={
        "help": "copies of the text token in the context: 1 gives text about 1/(T+1) of the attention; "
                "0 = one copy per real CLIP frame, VTA-LDM's recipe (about half the attention)"})
    clip_dim: int = field(default=768, metadata={
        "help": "width of the vision tokens (the trainer takes it from card.json when the card lists the encoder)"})
    max_frames: int = field(default=64, metadata={
        "help": "longest vision token sequence (positional-embedding table size; raised to the card's token "
                "count); longer ones are an error"})
    vision_encoder: str = field(default="clip", metadata={
        "help": "vision tokens to condition on: the shards' vision-<name>.npy member (clip, siglip2, vivit, vjepa2; "
                "old shards' clip.npy is clip); with +flow also flow-<name>.npy"})
    text_dim: int = field(default=768, metadata={
        "help": "width of the CLIP text embedding (from card.json); it gets its own projection unless the vision "
                "encoder is CLIP, whose image and text embeddings share one space"})

    def __post_init__(self):
        if self.text_repeat < 0:
            raise ValueError(f"text_repeat must be >= 0 (0: one copy per frame), got {self.text_repeat}")
        if self.vision_encoder not in VISION_ENCODERS:
            raise ValueError(f"vision_encoder must be one of {', '.join(VISION_ENCODERS)}, not {self.vision_encoder!r}")

    @property
    def use_text(self) -> bool:
        return "text" in self.condition

    @property
    def use_pe(self) -> bool:
        return "pe" in self.condition

    @property
    def use_video(self) -> bool:
        return self.condition.startswith("video")

    @property
    def use_flow(self) -> bool:
        return "flow" in self.condition

    @property
    def shared_text_projection(self) -> bool:
        """VTA-LDM's design: CLIP text and image embeddings through one projection (one embedding space)."""
        return self.vision_encoder == "clip" and self.text_dim == self.clip_dim


@dataclass(frozen=True)
class NoiseConfig:
    """The diffusion process: 1000-step scaled-linear betas, v-prediction, min-SNR weighting."""

    num_train_timesteps: int = field(default=1000, metadata={"help": "diffusion steps"})
    beta_start: float = field(default=0.00085, metadata={"help": "first beta"})
    beta_end: float = field(default=0.012, metadata={"help": "last beta"})
    beta_schedule: Literal["scaled_linear", "linear"] = field(default="scaled_linear", metadata={
        "help": "beta schedule"})
    prediction_type: Literal["v_prediction", "epsilon"] = field(default="v_prediction", metadata={
        "help": "what the network predicts"})
    snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR weighting gamma (0 disables)"})


@dataclass(frozen=True)
class TrainConfig:
    """How one run optimises: data, steps, optimiser, checkpoints, logging."""

    shards: str = field(default="", metadata={
        "help": "shard folder (with index.json), URL of one, or brace/'::' list of shard URLs; several "
                "folders mixed with weights: A:0.7,B:0.3 (docs/study.md)"})
    pretrain: Pretrain = field(default="none", metadata={
        "help": "audio: pre-train on the audio (latent + caption) of any shards, audio-only sets included; "
                "the condition becomes text (or stays none with --condition none)"})
    init_from: str = field(default="", metadata={
        "help": "fine-tune: start from another run's weights (run folder, checkpoint folder, .safetensors "
                "or a .pt state dict); fresh optimiser, step 0"})
    out: str = field(default="", metadata={"help": "run folder: checkpoints, logs, TensorBoard"})
    batch_size: int = field(default=8, metadata={"help": "samples per rank per micro-step"})
    max_steps: int = field(default=10000, metadata={"help": "optimiser steps to train to"})
    ckpt_every: int = field(default=1000, metadata={"help": "write a checkpoint every K steps"})
    keep_ckpts: int = field(default=3, metadata={"help": "checkpoints kept (older ones deleted)"})
    lr: float = field(default=6e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    warmup_steps: int = field(default=300, metadata={"help": "linear learning-rate warm-up steps"})
    lr_schedule: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={
        "help": "after warm-up: constant (a run can be extended by raising --max-steps), or a linear "
                "(VTA-LDM's) or cosine decay to 0 at --max-steps"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    cond_dropout: float = field(default=0.1, metadata={
        "help": "share of samples trained with the null condition (classifier-free guidance)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (0 disables EMA)"})
    ema_warmup: Literal["on", "off"] = field(default="on", metadata={
        "help": "on: diffusers' warm-up, decay min(ema_decay, (1+n)/(10+n)) at step n (0.9991 at 10k steps, "
                "ema_decay from ~90k); off: ema_decay from the first step"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "auto: bf16 autocast on GPU, fp32 on CPU"})
    val_every: int = field(default=500, metadata={"help": "validation loss every N steps (0: never)"})
    val_samples: int = field(default=256, metadata={
        "help": "validation set: the first N test samples (0: all), fixed for the whole run and split "
                "across ranks; each sample's noise and timestep come from its key"})
    log_every: int = field(default=10, metadata={"help": "console/TensorBoard logging interval"})
    seed: int = field(default=0, metadata={"help": "run seed (data order, noise, dropout, init)"})
    workers: int = field(default=ReaderConfig.workers, metadata=_READER["workers"].metadata)
    mix_shards: int = field(default=ReaderConfig.mix_shards, metadata=_READER["mix_shards"].metadata)
    shuffle_buffer: int = field(default=ReaderConfig.shuffle_buffer, metadata=_READER["shuffle_buffer"].metadata)
    backend: Literal["auto", "nccl", "gloo"] = field(default="auto", metadata={
        "help": "torch.distributed backend: auto is NCCL on GPU, gloo on CPU"})


    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "log_every", "ckpt_every", "mix_shards", "shuffle_buffer")
        bad = [f"--{n.replace('_', '-')} must be >= 1" for n in positive if getattr(self, n) < 1]
        bad += [f"--{n.replace('_', '-')} must be >= 0" for n in ("max_steps", "warmup_steps", "val_every",
                                                                   "val_samples", "workers", "keep_ckpts")
                if getattr(self, n) < 0]
        if not 0.0 <= self.ema_decay < 1.0:
            bad.append("--ema-decay must be in [0, 1)")
        if not 0.0 <= self.cond_dropout <= 1.0:
            bad.append("--cond-dropout must be in [0, 1]")
        if bad:
            raise ValueError("; ".join(bad))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config, ignoring keys a newer or older version wrote."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def load_unet_config(path: str | Path) -> dict:
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "block_out_channels" not in cfg:
        raise ValueError(f"{path}: not a UNet2DConditionModel config (no block_out_channels)")
    return cfg


@dataclass(frozen=True)
class SamplerConfig:
    """One soundtrack from one video (``python -m train.sample``)."""

    ckpt: str = field(default="", metadata={"help": "run folder (its latest checkpoint) or a checkpoint folder"})
    video: str = field(default="", metadata={
        "help": "input video (omit it and pass --caption for text-to-audio with a model trained with text)"})
    out: str = field(default="", metadata={"help": "output wav (16 kHz, 10.24 s); a .json sidecar is written beside it"})
    mux: str = field(default="", metadata={"help": "also write this mp4: the video with the generated sound"})
    clip_model: str = field(default="", metadata={
        "help": "CLIP id or folder (default: the one named in the run's dataset card)"})
    vae: str = field(default="", metadata={"help": "AudioLDM VAE id or folder (default: the dataset card's)"})
    vision_model: str = field(default="", metadata={
        "help": "the run's vision encoder (when not CLIP): id or folder (default: the one in the dataset card)"})
    vocoder: str = field(default=default_spec("audioldm_vocoder"), metadata={
        "help": "AudioLDM HiFi-GAN (SpeechT5HifiGan) id or folder; a pipeline uses its vocoder/ subfolder"})
    steps: int = field(default=50, metadata={"help": "denoising steps"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale (1: no guidance)"})
    scheduler: Literal["ddim", "dpm"] = field(default="ddim", metadata={"help": "DDIM or DPM-Solver++"})
    seed: int = field(default=0, metadata={"help": "initial-noise seed"})
    start_s: float = field(default=0.0, metadata={"help": "where in the video the 10 s window starts"})
    caption: str = field(default="", metadata={
        "help": "caption, for models trained with the text token (alone: text-to-audio)"})
    ema: bool = field(default=True, metadata={"help": "use the EMA weights"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda:N"})
    allow_random_weights: bool = field(default=False, metadata={
        "help": "DEMO ONLY: when CLIP, VAE or vocoder weights cannot be loaded, build tiny random-weight models "
                "(said loudly and recorded in the sidecar)"})


@dataclass(frozen=True)
class EvalConfig:
    """Scores of generated soundtracks (``python -m train.evaluate``)."""

    generated: str = field(default="", metadata={
        "help": "folder of sampler outputs (NAME.wav + NAME.json, NAME.mp4 when muxed)"})
    reference: str = field(default="", metadata={
        "help": "folder of reference clips (audio or video files), paired with generated ones by file name; "
                "needed for FD and KL"})
    out: str = field(default="", metadata={"help": "report folder (default: GENERATED/eval)"})
    av_align: bool = field(default=True, metadata={"help": "AV-Align, reference and fast modes"})
    panns: bool = field(default=True, metadata={"help": "FD, KL (softmax, sigmoid) and IS with PANNs CNN14 16 kHz"})
    panns_weights: str = field(default="", metadata={
        "help": "Cnn14_16k_mAP=0.438.pth (default: MODELS_DIR/panns_cnn14_16k/)"})
    vggish: bool = field(default=True, metadata={"help": "FAD with VGGish (frechet_audio_distance convention)"})
    vggish_weights: str = field(default="", metadata={
        "help": "torchvggish vggish-10086976.pth (default: MODELS_DIR/vggish/)"})
    passt: bool = field(default=True, metadata={"help": "FD, KL (softmax, sigmoid) and IS with PaSST-S 32 kHz"})
    passt_weights: str = field(default="", metadata={
        "help": "passt-s-f128-p16-s10-ap.476-swa.pt (default: MODELS_DIR/passt/)"})
    desync: bool = field(default=True, metadata={
        "help": "DeSync: Synchformer's predicted offset (mean |s|) of each clip's first and last 4.8 s"})
    desync_weights: str = field(default="", metadata={
        "help": "synchformer_state_dict.pth (default: MODELS_DIR/synchformer/)"})
    cavp: bool = field(default=False, metadata={
        "help": "CAVP score: cosine of Diff-Foley's CAVP video and audio embeddings per 0.25 s (opt-in)"})
    cavp_weights: str = field(default="", metadata={
        "help": "Diff-Foley cavp_epoch66.ckpt (default: MODELS_DIR/cavp/)"})
    pam: bool = field(default=True, metadata={
        "help": "PAM: MS-CLAP 2023's audio embedding against the paper's clean / noisy prompt pair (per clip, mean)"})
    msclap_weights: str = field(default="", metadata={
        "help": "CLAP_weights_2023.pth (default: MODELS_DIR/msclap/)"})
    msclap_text: str = field(default="", metadata={
        "help": "GPT-2 tokenizer folder (vocab.json, merges.txt) or hub id (default: the registry's msclap_text)"})
    audio_length_s: float = field(default=10.0, metadata={
        "help": "seconds of each clip the PANNs/VGGish/PaSST metrics hear (av-benchmark's --audio_length; "
                "0: the whole file)"})
    models_dir: str = field(default="", metadata={
        "help": "folder of release checkpoints (default: $V2A_MODELS or ~/.cache/v2a/models)"})
    is_splits: int = field(default=10, metadata={"help": "Inception Score splits (AudioLDM's evaluation: 10)"})
    device: str = field(default="cpu", metadata={"help": "device of the metric models (cpu, cuda, cuda:N)"})
    allow_random_weights: bool = field(default=False, metadata={
        "help": "demo only: a missing PANNs, VGGish, PaSST, Synchformer or MS-CLAP checkpoint is replaced by RANDOM "
                "weights (flagged; Synchformer and MS-CLAP by small random instances); PAM is skipped, with the "
                "reason, when the GPT-2 tokenizer is missing too"})

    def __post_init__(self) -> None:
        if self.is_splits < 1:
            raise ValueError(f"--is-splits must be >= 1, got {self.is_splits}")
        if self.audio_length_s < 0:
            raise ValueError(f"--audio-length-s must be >= 0, got {self.audio_length_s}")
