"""``python -m train.sample --ckpt RUN --video IN.mp4 --out OUT.wav [--mux OUT.mp4]``: one soundtrack.

Without ``--video``, ``--caption "..."`` makes text-to-audio with the same model (the paper's TTA
demo): the condition is the caption's CLIP text token alone, so the model must have been trained
with text (``--condition text``, ``video+text``...); one trained without text is refused.

The video goes through the encode stage's own code (``core.decode`` at the run's vision-encoder
frame rate and input size, ``shards.vision`` with the card's pixel normalisation, ``core.flow`` for
``+flow`` runs; ``train.sample_vision``), so the model sees features made exactly as in training.
Denoising uses a diffusers DDIM or DPM-Solver++ scheduler
over the training betas, with classifier-free guidance against the learned null condition the
model was trained with (condition dropout); then AudioLDM's VAE decodes the latent to a log-mel
and its HiFi-GAN vocoder makes 16 kHz audio, 10.24 s long. ``--mux`` writes the video with the new
sound: the video stream is copied bit for bit when the clip is the window, and the AAC audio's
encoder delay is recorded in the mp4 (edit list), so picture and sound stay in sync.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from core.cli_config import add_config_args, from_args
from core.device import torch_device
from core.models import ModelUnavailable, resolve_pretrained
from shards.config import DEFAULT_CLIP_MODEL, DEFAULT_VAE
from shards.encoders import ClipTextEncoder, AudioVAE
from shards.random_models import build_random_clip, build_random_vae, is_random
from train.checkpoint import load_for_inference, noise_config_of
from train.config import SamplerConfig
from train.model import VideoToAudioUNet, sampling_scheduler
from train.sample_vision import VisionInputError, condition_tokens, load_encoder, vision_info
from train.soundtrack import mux, write_record, write_wav
from train.vocoder import build_random_vocoder, load_vocoder, vocode

log = logging.getLogger("train.sample")



class SamplerError(RuntimeError):
    """The sampler cannot run as asked (bad input video, missing caption, unusable weights)."""


def _card_model(card: dict, key: str, default: str, flag: str) -> str:
    if card.get("random_weights"):
        raise SamplerError(f"the run's shards were encoded with random weights; pass {flag} explicitly")
    return card.get(key) or default


def _vision_spec(cfg: SamplerConfig, card: dict, spec: str) -> str:
    """The vision model of a non-CLIP run: --vision-model, else the one its card names."""
    if cfg.vision_model:
        return cfg.vision_model
    if card.get("random_weights"):
        raise SamplerError("the run's shards were encoded with random weights; pass --vision-model explicitly")
    if not spec:
        raise SamplerError("the run's card names no vision model; pass --vision-model")
    return spec


def _check_same_weights(card: dict, key: str, resolved, what: str) -> None:
    """Warn when the sampler's encoder is not the one that made the training features."""
    expected = card.get(key)
    if expected and expected != resolved.weight_hashes():
        log.warning("%s weights differ from those that encoded the training shards (%s): the model will see "
                    "features it was not trained on", what, key)


@torch.inference_mode()
def denoise(model: VideoToAudioUNet, clip: torch.Tensor | None, text: torch.Tensor | None, run_config: dict,
            steps: int, guidance: float, scheduler_kind: str, seed: int,
            flow: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [1, C, H, W] (diffusion scale) for one condition, guided against the null condition.
    ``clip`` None: no video (text-to-audio, or an unconditional model)."""
    device = next(model.parameters()).device
    scheduler = sampling_scheduler(noise_config_of(run_config), scheduler_kind)
    scheduler.set_timesteps(steps, device=device)
    shape = (1, *run_config["data"]["latent_shape"][1:])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latents = (torch.randn(shape, generator=gen) * scheduler.init_noise_sigma).to(device)
    clip = clip[None].to(device) if clip is not None else None
    mask = torch.ones(clip.shape[:2], dtype=torch.bool, device=device) if clip is not None else None
    text = text[None].to(device) if text is not None else None
    flow = flow[None].to(device) if flow is not None else None
    flow_mask = torch.ones(flow.shape[:2], dtype=torch.bool, device=device) if flow is not None else None
    guided = guidance != 1.0 and model.cfg.condition != "none"
    if guided:  # one batch: row 0 the null condition, row 1 the video
        clip, mask = (clip.repeat(2, 1, 1), mask.repeat(2, 1)) if clip is not None else (None, None)
        text = text.repeat(2, 1) if text is not None else None
        if flow is not None:
            flow, flow_mask = flow.repeat(2, 1, 1), flow_mask.repeat(2, 1)
        drop = torch.tensor([True, False], device=device)
    else:
        drop = None
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        pred = model(x, t.expand(x.shape[0]).to(device), clip, mask, text, drop, flow, flow_mask)
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents


def fit_length(wave: np.ndarray, n: int) -> np.ndarray:
    """Cut to ``n`` samples (HiFi-GAN's transposed convolutions add a few, as AudioLDM also cuts)."""
    if len(wave) < n or len(wave) > n * 1.01:
        log.warning("vocoder gave %d samples, expected %d: %s", len(wave), n,
                    "zero-padded" if len(wave) < n else "cut")
    return np.pad(wave, (0, max(0, n - len(wave))))[:n]


def _resolve(cfg: SamplerConfig, spec, subfolder: str | None, random_folder: Path, build):
    """The model folder for a spec; with ``--allow-random-weights`` a tiny random one when it cannot load."""
    try:
        return resolve_pretrained(spec(), pipeline_subfolder=subfolder)
    except (ModelUnavailable, SamplerError) as e:
        if not cfg.allow_random_weights:
            raise
        log.warning("%s; --allow-random-weights: using tiny RANDOM weights instead", e)
        if not is_random(random_folder):
            build(random_folder)
        return resolve_pretrained(str(random_folder))


def check_inputs(cfg: SamplerConfig, condition: str) -> None:
    """Video-to-audio needs a video model; text-to-audio (no ``--video``) a model trained with text."""
    if condition == "none":  # unconditional (audio pre-training): nothing to condition on
        if not (cfg.ckpt and cfg.out) or cfg.video or cfg.caption or cfg.mux:
            raise SamplerError("an unconditional model (--condition none) takes --ckpt and --out only: "
                               "no --video, --caption or --mux")
        return
    if not (cfg.ckpt and cfg.out) or not (cfg.video or cfg.caption):
        raise SamplerError("--ckpt and --out are required, and --video (video-to-audio) or --caption (text-to-audio)")
    if not cfg.video:
        if "text" not in condition:
            raise SamplerError(f"text-to-audio needs a model trained with the text condition; this one was trained "
                               f"with --condition {condition} (train with --condition text or video+text)")
        if cfg.mux:
            raise SamplerError("--mux needs --video")
    elif not condition.startswith("video"):
        raise SamplerError(f"this model was trained without video (--condition {condition}): drop --video")


def _waveform(latents: torch.Tensor, run_config: dict, card: dict, vae_res, vocoder_res,
              device: torch.device) -> tuple[np.ndarray, int, Path]:
    """Latents to the clip's samples: VAE decode with the training scale, vocoder, cut or pad to length."""
    scale = float(run_config["data"]["vae_scaling_factor"])
    vae = AudioVAE.load(str(vae_res.path), device)
    if abs(vae.scaling_factor - scale) > 1e-6:
        log.warning("VAE config scaling_factor %.6g differs from the one the latents were trained with (%.6g); "
                    "using the training value", vae.scaling_factor, scale)
    log_mel = vae.decode(latents.float() / scale)
    vocoder, vocoder_dir = load_vocoder(str(vocoder_res.path), device)
    sr = int(card.get("sample_rate", 16000))
    if int(vocoder.config.sampling_rate) != sr:
        raise SamplerError(f"vocoder makes {vocoder.config.sampling_rate} Hz audio, the run was trained on {sr} Hz")
    n = int(round(sr * float(card.get("audio_seconds", 10.24))))
    wave = fit_length(vocode(vocoder, log_mel)[0].numpy(), n)
    return wave, sr, vocoder_dir


def generate(cfg: SamplerConfig) -> dict:
    """Write the wav (and the mp4 with ``cfg.mux``) and its JSON sidecar; return the sidecar."""
    if not cfg.ckpt:
        raise SamplerError("--ckpt is required")
    device = torch_device(cfg.device)
    model, run_config, ckpt_dir = load_for_inference(cfg.ckpt, use_ema=cfg.ema, device=device)
    check_inputs(cfg, model.cfg.condition)
    card = run_config["data"].get("card") or {}
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    random_dir = Path(cfg.out).parent / ".random-models"
    clip_res = _resolve(cfg, lambda: cfg.clip_model or _card_model(card, "clip_model", DEFAULT_CLIP_MODEL,
                                                                    "--clip-model"),
                        None, random_dir / "clip", lambda f: build_random_clip(f, "tiny", model.cfg.text_dim if
                                                                     model.cfg.vision_encoder != "clip" else
                                                                     model.cfg.clip_dim))
    vae_res = _resolve(cfg, lambda: cfg.vae or _card_model(card, "vae_model", DEFAULT_VAE, "--vae"), "vae",
                       random_dir / "vae", lambda f: build_random_vae(
                           f, "tiny", model.latent_channels, scaling_factor=run_config["data"]["vae_scaling_factor"]))
    vocoder_res = _resolve(cfg, lambda: cfg.vocoder, "vocoder", random_dir / "vocoder",
                           lambda f: build_random_vocoder(f, "tiny"))
    _check_same_weights(card, "clip_weights_sha256", clip_res, "CLIP")
    _check_same_weights(card, "vae_weights_sha256", vae_res, "VAE")

    tokens = flow = vision_res = None  # text-to-audio (no --video): no vision encoder is loaded
    if cfg.video:
        encoder, vision_res = load_encoder(model.cfg, card, clip_res, lambda spec, build: _resolve(
            cfg, lambda: _vision_spec(cfg, card, spec), None, random_dir / model.cfg.vision_encoder, build), device)
        _check_same_weights(vision_info(card, model.cfg.vision_encoder), "weights_sha256", vision_res,
                            f"vision encoder {model.cfg.vision_encoder}")
        try:
            tokens, flow = condition_tokens(encoder, cfg.video, cfg.start_s, card, model.cfg.use_flow)
        except VisionInputError as e:
            raise SamplerError(str(e)) from e
    text = None
    if model.cfg.use_text:
        if not cfg.caption:
            raise SamplerError(f"this model was trained with the CLIP text token ({model.cfg.condition}): pass --caption")
        text = torch.from_numpy(ClipTextEncoder.load(str(clip_res.path), device, torch.float32).encode([cfg.caption])[0])
    latents = denoise(model, tokens, text, run_config, cfg.steps, cfg.guidance, cfg.scheduler, cfg.seed, flow)

    wave, sr, vocoder_dir = _waveform(latents, run_config, card, vae_res, vocoder_res, device)

    out = Path(cfg.out)
    write_wav(out, wave, sr)
    if cfg.mux:  # the mp4 carries exactly the wav's (16-bit) samples
        mux(cfg.video, sf.read(str(out), dtype="float32")[0], sr, cfg.mux, cfg.start_s)
    random_sources = [name for name, path in (("CLIP", clip_res.path), ("VAE", vae_res.path),
                                              ("vocoder", vocoder_dir)) if is_random(path)]
    if vision_res is not None and model.cfg.vision_encoder != "clip" and is_random(vision_res.path):
        random_sources.append(model.cfg.vision_encoder)
    if card.get("random_weights"):
        random_sources.append("the training shards' encoders")
    sidecar = {"wav": str(out), "mux": cfg.mux or None, "video": str(cfg.video) if cfg.video else None,
               "mode": "video-to-audio" if cfg.video else "text-to-audio" if model.cfg.use_text else "unconditional", "start_s": cfg.start_s,
               "caption": cfg.caption or None, "sample_rate": sr, "samples": int(len(wave)),
               "clip_frames": int(tokens.shape[0]) if tokens is not None else 0, "checkpoint": str(ckpt_dir),
               "trained_steps": int(state["step"]), "condition": model.cfg.condition, "random_weights": random_sources,
               "models": {"clip": str(clip_res.spec), "vae": str(vae_res.spec), "vocoder": str(vocoder_res.spec),
                          "vision": str(vision_res.spec) if vision_res is not None else None},
               "vision_encoder": model.cfg.vision_encoder, "flow_tokens": int(flow.shape[0]) if flow is not None else 0,
               "settings": {k: v for k, v in asdict(cfg).items() if k in ("steps", "guidance", "scheduler", "seed",
                                                                          "ema")}}
    return write_record(out.with_suffix(".json"), sidecar)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, SamplerConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    cfg = from_args(SamplerConfig, parser.parse_args(argv))
    try:
        sidecar = generate(cfg)
    except (SamplerError, ModelUnavailable, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: sidecar[k] for k in ("wav", "mux", "samples", "sample_rate", "trained_steps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
