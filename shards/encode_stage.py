"""The engine-neutral stages of ``pipeline.encode``: signals (CPU), then features (models).

``SignalStage`` decodes a ledger clip (or renders an augmentation recipe) into each vision
encoder's frames at its own rate and size (already resized and centre-cropped, so a few hundred
KB travel between workers instead of full-resolution video), with ``--with-flow`` the rendered
optical-flow images at the same rate, and 16 kHz audio, and encodes ``audio.flac``.
``FeatureStage`` loads the vision encoders, CLIP's text tower and the VAE once per worker and
encodes ``vision-<encoder>.npy`` (and ``flow-<encoder>.npy``), ``text.npy``, ``latent.npy`` (and
``mel.npy``), plus the sample's ``json``. An audio-only corpus (``audio_only``) decodes no picture
and writes no vision or flow member. Each sample gets forward passes of
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

from core.config import DEFAULT_SIGNAL, DecodeLimits, SignalConfig
from core.decode import DecodedClip, DecodeError, DecodeRequest, decode
from core.device import wants_gpu
from core.jsonsafe import json_safe
from core.stage import FAILED, OK, Resources, Row, Stage, is_pending, mark_failed
from core.flow import flow_frames, flow_step
from shards.config import (MEMBER_AUDIO, MEMBER_JSON, MEMBER_LATENT, MEMBER_MEL, MEMBER_TEXT, EncoderConfig,
                           MelConfig, flow_member, vision_member)
from shards.shard_writer import npy_bytes

FRAMES = "clip_pixels"  # uint8 [T, S, S, 3], resized + cropped for CLIP
WAVE = "mel_wave"  # float32 [num_samples]: AudioLDM-prepared waveform for the mel
AUDIO_SAMPLES = "audio_samples"  # samples of real (unpadded) audio in the window
TRANSIENT = (FRAMES, WAVE, AUDIO_SAMPLES)  # SignalStage -> FeatureStage only, never in a shard
RECIPE_FIELDS = ("segments", "rate", "cut_s", "crossfade_s", "stretch_method", "target_s", "real_cuts_s")  # plan rows'
SAMPLE_FIELDS = ("key", "kind", "caption", "label", "source", "split", "youtube_id", "video_path", "start_s",
                 "duration_s", "video_fps", "original_key", "scene_cuts")  # what sample_json describes
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
    # input side of every other vision encoder (from its config), e.g. {"siglip2": 512}
    image_sizes: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    # plays a plan row (an augmentation recipe) into a DecodedClip; the orchestrator passes
    # augment.render.render_row, so this library never imports another stage library
    render: Callable[..., DecodedClip] | None = None
    # an audio-only corpus (pipeline.clean --dataset audio): no picture is decoded, no vision/flow member written
    audio_only: bool = False


def flac_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono 16-bit FLAC of float audio in [-1, 1] (clipped); libsndfile writes no timestamps."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _file_name(path: Any) -> str:
    """Only the file name goes into shards: absolute paths would make shards depend on the machine."""
    return os.path.basename(str(path or ""))


def frames_field(encoder: str) -> str:
    """The transient field carrying one vision encoder's frames (CLIP's keeps its old name)."""
    return FRAMES if encoder == "clip" else f"vision_pixels_{encoder}"


def flow_field(encoder: str) -> str:
    return f"flow_pixels_{encoder}"


def signal_fields(enc: EncoderConfig) -> tuple[str, ...]:
    """The transient frame fields a chain with these encoders hands from signals to features."""
    fields_ = [frames_field(e) for e in enc.encoders]
    return (*fields_, *(flow_field(e) for e in enc.encoders if enc.with_flow), WAVE, AUDIO_SAMPLES)


def feature_members(enc: EncoderConfig) -> tuple[str, ...]:
    """The npy members FeatureStage writes for these encoders."""
    return (*(vision_member(e) for e in enc.encoders), *(flow_member(e) for e in enc.encoders if enc.with_flow))


def _real_cuts(value: Any) -> list[float] | None:
    return None if value is None or isinstance(value, float) else [float(c) for c in value]


def sample_json(row: Row, clip_frames: int, audio_samples: int, sample_rate: int,
                tokens: dict[str, int] | None = None) -> bytes:
    """The ``json`` member: what the sample is, where it came from, its scores and recipe."""
    kind = row.get("kind") or KIND_CLIP
    meta: dict[str, Any] = {
        "key": row["key"], "kind": kind, "caption": row.get("caption") or "", "label": row.get("label") or "",
        "source": row.get("source") or "", "split": row.get("split") or "",
        "youtube_id": row.get("youtube_id") or "", "video": _file_name(row.get("video_path")),
        "start_s": row.get("start_s"), "duration_s": row.get("duration_s"), "video_fps": row.get("video_fps"),
        "clip_frames": clip_frames, "audio_seconds": audio_samples / sample_rate,
        **({"tokens": dict(tokens)} if tokens else {}),
        "scores": {c: row.get(c) for c in SCORE_COLUMNS if c in row},
        "augmentation": None,
        # real scene cuts in sample seconds (a clip's ledger scene_cuts; the cuts of its sources a
        # recipe plays); a concat's synthetic cut is augmentation.cut_s. None: not known
        "real_cuts_s": _real_cuts(row.get("scene_cuts") if kind == KIND_CLIP else row.get("real_cuts_s")),
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
    """Decode (ledger rows) or render (plan rows) each sample into encoder frames and 16 kHz audio."""

    name = "encode_signals"
    reads = ("key", "kind", "video_path", "start_s", "duration_s", "video_fps", "caption", "label", "split",
             "source", *RECIPE_FIELDS)

    def __init__(self, config: EncodeStageConfig):
        self.config = config
        self.resources = Resources(cpus=1.0, gpus=0.0, batch_size=config.batch_size)
        self.transient = (WAVE, AUDIO_SAMPLES) if config.audio_only else signal_fields(config.encoders)
        self.writes = (*self.transient, MEMBER_AUDIO, "video_fps")

    def size_of(self, encoder: str) -> int:
        return self.config.clip_image_size if encoder == "clip" else int(self.config.image_sizes[encoder])

    def _signals(self, row: Row, fps: float | None = None, size: int | None = None,
                 audio: bool = True) -> DecodedClip:
        """The sample's signals: frames at ``fps``/``size`` (default: the first vision encoder's), audio."""
        sig = self.config.signal
        head = self.config.encoders.encoders[0]
        fps = self.config.encoders.fps_of(head) if fps is None else fps
        size = self.size_of(head) if size is None else size
        rates = (sig.feature_sr,) if audio else ()
        if (row.get("kind") or KIND_CLIP) == KIND_CLIP:
            duration = row.get("duration_s")
            duration = float(duration) if duration is not None and not math.isnan(float(duration)) else sig.window_s
            if self.config.audio_only:
                req = DecodeRequest(start_s=float(row.get("start_s") or 0.0), duration_s=duration,
                                    audio_rates=(sig.feature_sr,), resampler=self.config.mel.resampler, need_video=False)
                return decode(row["video_path"], req, self.config.limits)
            # frames resized to the encoder's input as they are decoded: memory follows the output, not the source
            req = DecodeRequest(start_s=float(row.get("start_s") or 0.0), duration_s=duration,
                                audio_rates=rates, rgb_fps=fps, resampler=self.config.mel.resampler,
                                rgb_size=size, need_audio=audio)
            return decode(row["video_path"], req, self.config.limits)
        if self.config.render is None:
            raise ValueError(f"plan row of kind {row.get('kind')!r} but no recipe renderer was configured")
        return self.config.render(row, audio_rates=(sig.feature_sr,), rgb_fps=fps, signal=sig,
                                  limits=self.config.limits, resampler=self.config.mel.resampler)

    def _frames(self, row: Row, first: DecodedClip) -> dict[str, np.ndarray]:
        """Every encoder's frames (and flow images): one decode per distinct (rate, size)."""
        from shards.encoders import resize_crop

        enc = self.config.encoders
        grids: dict[tuple[float, int], np.ndarray] = {}
        out: dict[str, np.ndarray] = {}

        def grid(fps: float, size: int) -> np.ndarray:
            if (fps, size) not in grids:
                clip = self._signals(row, fps, size, audio=False)
                grids[(fps, size)] = clip.rgb if clip.rgb is not None else np.zeros((0, size, size, 3), np.uint8)
            return resize_crop(grids[(fps, size)], size)  # no-op for decoded clips, sized already

        head = enc.encoders[0]
        grids[(enc.fps_of(head), self.size_of(head))] = first.rgb if first.rgb is not None else \
            np.zeros((0, 1, 1, 3), np.uint8)
        for e in enc.encoders:
            fps, size = enc.fps_of(e), self.size_of(e)
            out[frames_field(e)] = grid(fps, size)
            if enc.with_flow:
                step = flow_step(fps, enc.flow_pair_fps)
                out[flow_field(e)] = flow_frames(grid(fps * step, size), step, enc.flow_min_scale)
        return out

    def process_row(self, row: Row) -> Row:
        if not is_pending(row):
            return row
        from shards.mel import prepare_waveform

        enc = self.config.encoders
        head = enc.encoders[0]
        try:
            clip = self._signals(row, enc.fps_of(head), self.size_of(head))
            # an audio-only corpus branches before any frame is wanted: no vision encoder sees it
            frames = {} if self.config.audio_only else self._frames(row, clip)
        except DecodeError as e:
            return mark_failed(row, e.ledger_reason)
        except ValueError as e:  # augment.recipe.PlanError and render errors are ValueErrors
            return mark_failed(row, f"render_error: {' '.join(str(e).split())[:200]}")
        audio = clip.audio.get(self.config.signal.feature_sr)
        empty = [] if self.config.audio_only else [e for e in enc.encoders if len(frames[frames_field(e)]) == 0]
        if empty:
            return mark_failed(row, f"no_frames: no video frame on the {'/'.join(empty)} frame grid")
        if audio is None or audio.size == 0:
            return mark_failed(row, "no_audio: no audio in the window")
        audio = audio[: self.config.mel.num_samples]
        row.update(frames)
        row[WAVE] = prepare_waveform(audio, self.config.mel)
        row[MEMBER_AUDIO] = flac_bytes(audio, self.config.signal.feature_sr)
        row[AUDIO_SAMPLES] = int(audio.size)
        if clip.video_fps and not row.get("video_fps"):
            row["video_fps"] = float(clip.video_fps)
        return row

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self.process_row(r) for r in rows]


class FeatureStage(Stage):
    """Vision tokens (and flow tokens), CLIP text embedding and the VAE posterior of a batch of samples."""

    name = "encode_features"
    uses_model = True

    def __init__(self, config: EncodeStageConfig):
        self.config = config
        enc = config.encoders
        self.resources = Resources(cpus=1.0, gpus=1.0 if wants_gpu(enc.device) else 0.0, batch_size=config.batch_size)
        signals = (WAVE, AUDIO_SAMPLES) if config.audio_only else signal_fields(enc)
        self.reads = (*signals, *SAMPLE_FIELDS, *SCORE_COLUMNS, *RECIPE_FIELDS)
        self.members = () if config.audio_only else feature_members(enc)
        self.writes = (*self.members, MEMBER_TEXT, MEMBER_LATENT, MEMBER_MEL, MEMBER_JSON, MEMBER_AUDIO)
        self.vision: dict = {}
        self.text = self.vae = None
        self._text_cache: dict[str, np.ndarray] = {}

    def setup(self) -> None:
        from shards.encoders import AudioVAE, ClipTextEncoder, check_vae_fits_mel
        from shards.vision import VISION_KINDS, ClipVision

        enc = self.config.encoders
        for e in () if self.config.audio_only else enc.encoders:
            if e == "clip":
                vision = ClipVision.load(enc.clip_model, enc.device, enc.fps_of(e), normalize=enc.clip_normalize,
                                         batch_frames=enc.clip_batch_frames)
                want = self.config.clip_image_size
            else:
                vision = VISION_KINDS[e].load(enc.model_of(e), enc.device, fps=enc.fps_of(e))
                want = int(self.config.image_sizes[e])
            if vision.image_size != want:
                raise ValueError(f"{e} {enc.model_of(e)} takes {vision.image_size}px frames, the signal stage "
                                 f"crops to {want}px")
            self.vision[e] = vision
        self.text = ClipTextEncoder.load(enc.clip_model, enc.device)
        self.vae = AudioVAE.load(enc.vae, enc.device, batch_size=1)  # per sample: see encode_posterior
        check_vae_fits_mel(self.vae, self.config.mel)

    def teardown(self) -> None:
        self.vision = {}
        self.text = self.vae = None
        self._text_cache.clear()

    def _text(self, captions: list[str]) -> list[np.ndarray]:
        todo = sorted({c for c in captions if c not in self._text_cache})
        if todo:
            if len(self._text_cache) > 50_000:  # captions repeat (class labels); keep memory bounded
                self._text_cache.clear()
            for caption in todo:  # one at a time: an embedding must not depend on its batch
                self._text_cache[caption] = self.text.encode([caption])[0]
        return [self._text_cache[c] for c in captions]

    def _tokens(self, todo: list[Row]) -> dict[str, list[np.ndarray]]:
        """Per member: the float16 tokens of every sample, from its frames or flow images."""
        enc = self.config.encoders
        out = {}
        for e, vision in self.vision.items():
            out[vision_member(e)] = vision.encode_clips([r[frames_field(e)] for r in todo])
            if enc.with_flow:
                out[flow_member(e)] = vision.encode_clips([r[flow_field(e)] for r in todo])
        return {m: [a.astype(np.float16) for a in arrays] for m, arrays in out.items()}

    def process_batch(self, rows: list[Row]) -> list[Row]:
        import torch

        from shards.encoders import posterior_member
        from shards.mel import log_mel_torch

        first = WAVE if self.config.audio_only else frames_field(self.config.encoders.encoders[0])
        todo = [r for r in rows if is_pending(r) and r.get(first) is not None]
        if not todo:
            return rows
        tokens = self._tokens(todo)
        text_emb = self._text([str(r.get("caption") or r.get("label") or "") for r in todo])
        mels = torch.cat([log_mel_torch(torch.from_numpy(r[WAVE][None]).to(self.vae.device), self.config.mel)
                          for r in todo])
        mean, std = self.vae.encode_posterior(mels)
        mels = mels.float().cpu().numpy()
        sr = self.config.signal.feature_sr
        head = vision_member(self.config.encoders.encoders[0])
        for i, row in enumerate(todo):
            latent = posterior_member(mean[i].numpy(), std[i].numpy())
            text16 = text_emb[i].astype(np.float16)
            arrays = {m: tokens[m][i] for m in self.members}
            if not all(np.isfinite(a).all() for a in (text16, latent, *arrays.values())):
                mark_failed(row, "encode_error: non-finite features (float16 overflow or a broken model)")
                continue
            for m, a in arrays.items():
                row[m] = npy_bytes(a)
            row[MEMBER_TEXT] = npy_bytes(text16)
            row[MEMBER_LATENT] = npy_bytes(latent)
            if self.config.encoders.with_mel:
                row[MEMBER_MEL] = npy_bytes(mels[i].astype(np.float16))
            counts = {m: int(a.shape[0]) for m, a in arrays.items()}
            row[MEMBER_JSON] = sample_json(row, counts.get(head, 0), int(row.get(AUDIO_SAMPLES) or 0), sr,
                                           counts if len(counts) > 1 else None)
            row["status"], row["reason"] = OK, ""
        for row in rows:
            if row.get("status") == FAILED:
                for m in (*self.members, MEMBER_TEXT, MEMBER_LATENT, MEMBER_MEL, MEMBER_AUDIO, MEMBER_JSON):
                    row.pop(m, None)
            for f in signal_fields(self.config.encoders):
                row.pop(f, None)
        return rows


def build_encode_stages(config: EncodeStageConfig) -> list[Stage]:
    """The stage chain every runner drives, in order."""
    return [SignalStage(config), FeatureStage(config)]
