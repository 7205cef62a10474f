"""The engine-neutral stages of ``pipeline.encode``: signals (CPU), then features (models).

``SignalStage`` decodes a ledger clip (or renders an augmentation recipe) into CLIP frames at
``clip_fps`` (already resized and centre-cropped, so a few hundred KB travel between workers
instead of full-resolution video) and 16 kHz audio, and encodes ``audio.flac``.
``FeatureStage`` loads CLIP and the VAE once per worker and encodes ``clip.npy``, ``text.npy``,
``latent.npy`` (and ``mel.npy``), plus the sample's ``json``. Each sample gets forward passes of
its own (all its frames in one CLIP batch): float kernels change with the batch shape, and a
sample's bytes must not depend on which samples shared its batch, or a resumed run could not
reproduce a straight one. Rows leave with their shard members as bytes fields named like the
members; per-row problems become ``failed`` rows with a reason.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch

from core.config import DEFAULT_SIGNAL, DecodeLimits, SignalConfig
from core.decode import DecodedClip, DecodeError, DecodeRequest, decode
from core.device import wants_gpu
from core.jsonsafe import json_safe
from core.stage import FAILED, OK, Resources, Row, Stage, is_pending, mark_failed
from shards.config import (MEMBER_AUDIO, MEMBER_CLIP, MEMBER_JSON, MEMBER_LATENT, MEMBER_MEL, MEMBER_TEXT,
                           EncoderConfig, MelConfig)
from shards.shard_writer import npy_bytes

FRAMES = "clip_pixels"  # uint8 [T, S, S, 3], resized + cropped for CLIP
WAVE = "mel_wave"  # float32 [num_samples]: AudioLDM-prepared waveform for the mel
AUDIO_SAMPLES = "audio_samples"  # samples of real (unpadded) audio in the window
TRANSIENT = (FRAMES, WAVE, AUDIO_SAMPLES)  # SignalStage -> FeatureStage only, never in a shard
RECIPE_FIELDS = ("segments", "rate", "cut_s", "crossfade_s", "stretch_method", "target_s")  # plan rows'
SAMPLE_FIELDS = ("key", "kind", "caption", "label", "source", "split", "youtube_id", "video_path", "start_s",
                 "duration_s", "video_fps", "original_key")  # what sample_json describes
SCORE_COLUMNS = ("clap_score", "av_align", "audio_peaks", "video_peaks", "speech_score", "music_score",
                 "event_score", "av_align_2025", "av_align_2023", "video_peaks_2025", "video_peaks_2023")
KIND_CLIP = "clip"  # a ledger clip; plan rows carry their recipe kind (concat, stretch)


@dataclass(frozen=True)
class EncodeStageConfig:
    """Everything the encode stages need, picklable so every engine can ship it to workers."""

    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    mel: MelConfig = field(default_factory=MelConfig)
    signal: SignalConfig = DEFAULT_SIGNAL
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    clip_image_size: int = 224  # from the CLIP config; frames are cropped to it on CPU workers
    batch_size: int = 8
    # plays a plan row (an augmentation recipe) into a DecodedClip; the orchestrator passes
    # augment.render.render_row, so this library never imports another stage library
    render: Callable[..., DecodedClip] | None = None
    # an audio-only corpus (pipeline.clean --dataset audio): no picture is decoded, no clip.npy written
    audio_only: bool = False


def flac_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono 16-bit FLAC of float audio in [-1, 1] (clipped); libsndfile writes no timestamps."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _file_name(path: Any) -> str:
    """Only the file name goes into shards: absolute paths would make shards depend on the machine."""
    return os.path.basename(str(path or ""))


def sample_json(row: Row, clip_frames: int, audio_samples: int, sample_rate: int) -> bytes:
    """The ``json`` member: what the sample is, where it came from, its scores and recipe."""
    kind = row.get("kind") or KIND_CLIP
    meta: dict[str, Any] = {
        "key": row["key"], "kind": kind, "caption": row.get("caption") or "", "label": row.get("label") or "",
        "source": row.get("source") or "", "split": row.get("split") or "",
        "youtube_id": row.get("youtube_id") or "", "video": _file_name(row.get("video_path")),
        "start_s": row.get("start_s"), "duration_s": row.get("duration_s"), "video_fps": row.get("video_fps"),
        "clip_frames": clip_frames, "audio_seconds": audio_samples / sample_rate,
        "scores": {c: row.get(c) for c in SCORE_COLUMNS if c in row},
        "augmentation": None,
    }
    if row.get("original_key"):
        meta["original_key"] = row["original_key"]  # the ledger's key before it was made WebDataset-safe
    if kind != KIND_CLIP:
        meta["augmentation"] = {
            "kind": kind, "rate": row.get("rate"), "cut_s": row.get("cut_s"), "crossfade_s": row.get("crossfade_s"),
            "stretch_method": row.get("stretch_method"), "target_s": row.get("target_s"),
            "segments": [{**dict(s), "video_path": _file_name(dict(s).get("video_path"))}
                         for s in (row.get("segments") or [])],
        }
    return json.dumps(json_safe(meta), sort_keys=True, allow_nan=False).encode()


class SignalStage(Stage):
    """Decode (ledger rows) or render (plan rows) each sample into CLIP frames and 16 kHz audio."""

    name = "encode_signals"
    reads = ("key", "kind", "video_path", "start_s", "duration_s", "video_fps", "caption", "label", "split",
             "source", *RECIPE_FIELDS)
    writes = (*TRANSIENT, MEMBER_AUDIO, "video_fps")
    transient = TRANSIENT

    def __init__(self, config: EncodeStageConfig):
        self.config = config
        self.resources = Resources(cpus=1.0, gpus=0.0, batch_size=config.batch_size)

    def _signals(self, row: Row) -> DecodedClip:
        sig = self.config.signal
        if (row.get("kind") or KIND_CLIP) == KIND_CLIP:
            duration = row.get("duration_s")
            duration = float(duration) if duration is not None and not math.isnan(float(duration)) else sig.window_s
            if self.config.audio_only:
                req = DecodeRequest(start_s=float(row.get("start_s") or 0.0), duration_s=duration,
                                    audio_rates=(sig.feature_sr,), resampler=self.config.mel.resampler, need_video=False)
                return decode(row["video_path"], req, self.config.limits)
            # frames resized to CLIP's input as they are decoded: memory follows the output, not the source
            req = DecodeRequest(start_s=float(row.get("start_s") or 0.0), duration_s=duration,
                                audio_rates=(sig.feature_sr,), rgb_fps=sig.clip_fps, resampler=self.config.mel.resampler,
                                rgb_size=self.config.clip_image_size)
            return decode(row["video_path"], req, self.config.limits)
        if self.config.render is None:
            raise ValueError(f"plan row of kind {row.get('kind')!r} but no recipe renderer was configured")
        return self.config.render(row, audio_rates=(sig.feature_sr,), rgb_fps=sig.clip_fps, signal=sig,
                                  limits=self.config.limits, resampler=self.config.mel.resampler)

    def process_row(self, row: Row) -> Row:
        if not is_pending(row):
            return row
        from shards.encoders import resize_crop
        from shards.mel import prepare_waveform

        try:
            clip = self._signals(row)
        except DecodeError as e:
            return mark_failed(row, e.ledger_reason)
        except ValueError as e:  # augment.recipe.PlanError and render errors are ValueErrors
            return mark_failed(row, f"render_error: {' '.join(str(e).split())[:200]}")
        frames = clip.rgb if clip.rgb is not None else np.zeros((0, 1, 1, 3), np.uint8)
        audio = clip.audio.get(self.config.signal.feature_sr)
        if len(frames) == 0 and not self.config.audio_only:
            return mark_failed(row, "no_frames: no video frame on the CLIP frame grid")
        if audio is None or audio.size == 0:
            return mark_failed(row, "no_audio: no audio in the window")
        audio = audio[: self.config.mel.num_samples]
        if not self.config.audio_only:
            row[FRAMES] = resize_crop(frames, self.config.clip_image_size)  # no-op for decoded clips, sized already
        row[WAVE] = prepare_waveform(audio, self.config.mel)
        row[MEMBER_AUDIO] = flac_bytes(audio, self.config.signal.feature_sr)
        row[AUDIO_SAMPLES] = int(audio.size)
        if clip.video_fps and not row.get("video_fps"):
            row["video_fps"] = float(clip.video_fps)
        return row

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self.process_row(r) for r in rows]


class FeatureStage(Stage):
    """CLIP image tokens, CLIP text embedding and the VAE posterior of a batch of samples."""

    name = "encode_features"
    uses_model = True
    reads = (FRAMES, WAVE, AUDIO_SAMPLES, *SAMPLE_FIELDS, *SCORE_COLUMNS, *RECIPE_FIELDS)
    writes = (MEMBER_CLIP, MEMBER_TEXT, MEMBER_LATENT, MEMBER_MEL, MEMBER_JSON, MEMBER_AUDIO)

    def __init__(self, config: EncodeStageConfig):
        self.config = config
        enc = config.encoders
        self.resources = Resources(cpus=1.0, gpus=1.0 if wants_gpu(enc.device) else 0.0, batch_size=config.batch_size)
        self.image = self.text = self.vae = None
        self._text_cache: dict[str, np.ndarray] = {}

    def setup(self) -> None:
        from shards.encoders import AudioVAE, ClipImageEncoder, ClipTextEncoder, check_vae_fits_mel

        enc = self.config.encoders
        self.image = None if self.config.audio_only else ClipImageEncoder.load(
            enc.clip_model, enc.device, normalize=enc.clip_normalize, batch_frames=enc.clip_batch_frames)
        if self.image is not None and self.image.image_size != self.config.clip_image_size:
            raise ValueError(f"CLIP {enc.clip_model} takes {self.image.image_size}px frames, the signal stage "
                             f"crops to {self.config.clip_image_size}px")
        self.text = ClipTextEncoder.load(enc.clip_model, enc.device)
        self.vae = AudioVAE.load(enc.vae, enc.device, batch_size=1)  # per sample: see encode_posterior
        check_vae_fits_mel(self.vae, self.config.mel)

    def teardown(self) -> None:
        self.image = self.text = self.vae = None
        self._text_cache.clear()

    def _text(self, captions: list[str]) -> list[np.ndarray]:
        todo = sorted({c for c in captions if c not in self._text_cache})
        if todo:
            if len(self._text_cache) > 50_000:  # captions repeat (class labels); keep memory bounded
                self._text_cache.clear()
            for caption in todo:  # one at a time: an embedding must not depend on its batch
                self._text_cache[caption] = self.text.encode([caption])[0]
        return [self._text_cache[c] for c in captions]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        from shards.encoders import posterior_member
        from shards.mel import log_mel_torch

        todo = [r for r in rows if is_pending(r) and (r.get(FRAMES) is not None or
                                                      (self.config.audio_only and r.get(WAVE) is not None))]
        if not todo:
            return rows
        image_emb = [None] * len(todo) if self.image is None else self.image.encode_clips([r[FRAMES] for r in todo])
        text_emb = self._text([str(r.get("caption") or r.get("label") or "") for r in todo])
        mels = torch.cat([log_mel_torch(torch.from_numpy(r[WAVE][None]).to(self.vae.device), self.config.mel)
                          for r in todo])
        mean, std = self.vae.encode_posterior(mels)
        mels = mels.float().cpu().numpy()
        sr = self.config.signal.feature_sr
        for i, row in enumerate(todo):
            latent = posterior_member(mean[i].numpy(), std[i].numpy())
            clip16 = image_emb[i].astype(np.float16) if image_emb[i] is not None else None
            text16 = text_emb[i].astype(np.float16)
            if not all(np.isfinite(a).all() for a in (clip16, text16, latent) if a is not None):
                mark_failed(row, "encode_error: non-finite features (float16 overflow or a broken model)")
                continue
            if clip16 is not None:
                row[MEMBER_CLIP] = npy_bytes(clip16)
            row[MEMBER_TEXT] = npy_bytes(text16)
            row[MEMBER_LATENT] = npy_bytes(latent)
            if self.config.encoders.with_mel:
                row[MEMBER_MEL] = npy_bytes(mels[i].astype(np.float16))
            row[MEMBER_JSON] = sample_json(row, 0 if clip16 is None else clip16.shape[0],
                                           int(row.get(AUDIO_SAMPLES) or 0), sr)
            row["status"], row["reason"] = OK, ""
        for row in rows:
            if row.get("status") == FAILED:
                for m in (MEMBER_CLIP, MEMBER_TEXT, MEMBER_LATENT, MEMBER_MEL, MEMBER_AUDIO, MEMBER_JSON):
                    row.pop(m, None)
            row.pop(FRAMES, None)
            row.pop(WAVE, None)
            row.pop(AUDIO_SAMPLES, None)
        return rows


def build_encode_stages(config: EncodeStageConfig) -> list[Stage]:
    """The stage chain every runner drives, in order."""
    return [SignalStage(config), FeatureStage(config)]
