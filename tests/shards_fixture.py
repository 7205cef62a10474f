"""Tiny shards in the layout of docs/formats.md, written with ``webdataset.TarWriter``.

``OUT/shards/{split}-{index:06d}.tar`` + ``index.json`` + ``card.json``; one sample per key with
``clip.npy`` float16 [T, 768], ``text.npy`` float16 [768], ``latent.npy`` float16 [2, C, H, W]
(posterior mean and std), ``audio.flac`` (optional) and ``json``. Latents are small so tiny
UNets train in milliseconds; their content is a smooth pattern chosen by the sample's class (also
visible in its CLIP tokens), so a model can overfit them and the loss visibly falls.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds

CLIP_DIM = 768
TINY_LATENT = (8, 16, 8)  # C, H, W for the tiny UNet config
VAE_SCALING = 0.9227914214134216  # AudioLDM's VAE scaling factor (any value works for tests)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _flac(audio: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="FLAC")
    return buf.getvalue()


def make_sample(key: str, label: int, rng: np.random.Generator, latent_shape=TINY_LATENT,
                frames: int = 20, n_classes: int = 2, with_audio: bool = False, split: str = "train") -> dict:
    c, h, w = latent_shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    pattern = np.stack([np.sin(2 * np.pi * (label + 1) * (yy + k / c)) * np.cos(np.pi * xx) for k in range(c)])
    mean = pattern + 0.05 * rng.standard_normal(pattern.shape)
    std = np.full_like(mean, 0.02)
    clip = np.zeros((frames, CLIP_DIM))
    clip[:, label::n_classes] = 1.0
    clip += 0.05 * rng.standard_normal(clip.shape)
    text = np.zeros(CLIP_DIM)
    text[label::n_classes] = 1.0
    meta = {"key": key, "caption": f"the sound of class {label}", "label": f"class {label}",
            "source": "fixture", "split": split, "scores": {"clap": 0.5, "av_align": 0.4},
            "augmentation": None}
    sample = {"__key__": key,
              "clip.npy": _npy(clip.astype(np.float16)),
              "text.npy": _npy(text.astype(np.float16)),
              "latent.npy": _npy(np.stack([mean, std]).astype(np.float16)),
              "json": json.dumps(meta).encode()}
    if with_audio:
        t = np.arange(16000) / 16000
        sample["audio.flac"] = _flac((0.1 * np.sin(2 * np.pi * 220 * (label + 1) * t)).astype(np.float32), 16000)
    return sample


def write_shards(out: str | Path, counts: dict[str, list[int]], latent_shape=TINY_LATENT,
                 frames: tuple[int, ...] = (20, 18, 21), n_classes: int = 2, with_audio: bool = False,
                 seed: int = 0) -> Path:
    """Write shards with the given per-shard sample counts, e.g. ``{"train": [1, 2, 7], "test": [3]}``.

    Returns the ``OUT/shards`` folder (which holds ``index.json`` and ``card.json``).
    """
    folder = Path(out) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    n = 0
    for split, per_shard in counts.items():
        for index, count in enumerate(per_shard):
            name = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(folder / name)) as sink:
                for _ in range(count):
                    sink.write(make_sample(f"fixture-{split}-{n:05d}", n % n_classes, rng, latent_shape,
                                           frames[n % len(frames)], n_classes, with_audio, split))
                    n += 1
            data = (folder / name).read_bytes()
            entries.append({"name": name, "split": split, "count": count, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "index.json").write_text(json.dumps({"shards": entries}, indent=1))
    card = {"vae_scaling_factor": VAE_SCALING, "clip_model": "tiny-random-clip", "clip_fps": 2.0,
            "latent_shape": [2, *latent_shape], "sample_rate": 16000, "counts": {
                s: int(sum(c)) for s, c in counts.items()}}
    (folder / "card.json").write_text(json.dumps(card, indent=1))
    return folder
