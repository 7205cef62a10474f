"""Shard benchmarks, each against a baseline measured in the same run.

1. Reader: samples/s and MB/s of the training reader (``shards.reader.TrainLoader``, the members
   training needs, decoded and batched; its default settings and the pre-shuffle-buffer ones) and
   of stock ``webdataset.WebDataset(urls).decode()``, against a plain ``tarfile`` scan that reads
   every member's bytes of the same shards. Goal: the training reader within 1.5x of the raw scan.
   The output states the setup, including whether the page cache really held the shards: when it
   does not, the scan is I/O-bound and the reader, which skips the audio (~60% of the bytes),
   looks faster than it is; when it does, the ratio is the reader's CPU cost.
2. Encode: seconds per sample of each part of ``pipeline.encode``'s work with the full-size CLIP
   ViT-L/14 and AudioLDM VAE architectures (random weights from their configs: the same compute
   as the real checkpoints), against decoding the same clips (the floor). CPU here; on a GPU
   machine pass ``--device cuda``.

    python bench/shards.py [--reader-samples 2000] [--cold] [--encode-samples N] [--device auto] [--skip-encode]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import DEFAULT_SIGNAL  # noqa: E402
from shards.encode_stage import flac_bytes  # noqa: E402
from shards.shard_writer import ShardInfo, npy_bytes, write_index, write_tar  # noqa: E402

CLIPS = sorted((ROOT / "tests" / "data" / "vggsound" / "video").glob("*.mp4"))


# ------------------------------------------------------------------------------------------------
# reader

def _synthetic_sample(i: int, rng: np.random.Generator) -> dict[str, bytes]:
    """Members with the real sizes: 20x768 CLIP tokens, 768 text, 2x8x256x16 latent, 10 s FLAC."""
    t = np.arange(160000) / 16000
    audio = 0.3 * np.sin(2 * np.pi * (200 + i % 50 * 10) * t) + 0.05 * rng.standard_normal(t.size)
    meta = {"key": f"bench-{i:06d}", "caption": "the sound of a benchmark", "label": "benchmark",
            "split": "train", "scores": {"clap_score": 0.5, "av_align": 0.3}, "augmentation": None}
    return {"json": json.dumps(meta).encode(),
            "clip.npy": npy_bytes(rng.standard_normal((20, 768)).astype(np.float16)),
            "text.npy": npy_bytes(rng.standard_normal(768).astype(np.float16)),
            "latent.npy": npy_bytes(rng.standard_normal((2, 8, 256, 16)).astype(np.float16)),
            "audio.flac": flac_bytes(audio.astype(np.float32), 16000)}


def write_bench_shards(folder: Path, n: int, per_shard: int) -> list[ShardInfo]:
    rng = np.random.default_rng(0)
    base = [_synthetic_sample(i, rng) for i in range(min(n, 64))]  # FLAC encoding dominates: reuse bytes
    infos = []
    for index, start in enumerate(range(0, n, per_shard)):
        name = f"train-{index:06d}.tar"
        samples = ((f"bench-{i:06d}", base[i % len(base)]) for i in range(start, min(n, start + per_shard)))
        count, size, sha = write_tar(folder / name, samples)
        infos.append(ShardInfo(name, "train", count, size, sha))
    write_index(folder, infos)
    return infos


def raw_scan(urls: list[str]) -> int:
    """Baseline: every member's bytes through tarfile, nothing decoded."""
    n = 0
    for url in urls:
        with tarfile.open(url, mode="r|") as tar:
            for info in tar:
                if info.isfile():
                    tar.extractfile(info).read()
                    n += 1
    return n


def stock_webdataset(urls: list[str]) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())


READER_SETTINGS = {"defaults": {}, "old defaults (mix 4, no buffer)": {"mix_shards": 4, "shuffle_buffer": 1}}


def training_reader(folder: Path, samples: int, batch_size: int = 16, **cfg) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the next ``samples`` samples, samples) with workers=0:
    the reader's own cost in this process, no worker processes or IPC."""
    from shards.reader import ReaderConfig, TrainLoader
    from shards.sources import _local_index, find_shards

    _local_index.cache_clear()  # every setting pays for building its shard indexes
    shards, _ = find_shards(str(folder))
    loader = TrainLoader(shards, batch_size, rank=0, world_size=1, cfg=ReaderConfig(workers=0, **cfg),
                         need_text=True, latent_shape=(2, 8, 256, 16))
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    seen = 0
    for batch in it:
        seen += len(batch["keys"])
        if seen >= samples:
            break
    return t1 - t0, time.perf_counter() - t1, seen


def _timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def drop_page_cache(urls: list[str]) -> None:
    """Evict the shards from the page cache (they were fsynced when written), so the next pass reads the disk."""
    for url in urls:
        fd = os.open(url, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _setup_line(n: int, infos, total: int, cold: bool) -> str:
    import platform

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    cache = ("COLD: dropped (posix_fadvise DONTNEED) before every pass" if cold
             else "warm: shards just written and scanned once before timing")
    return (f"\n== reader: {n} samples in {len(infos)} shards, {total / 1e6:.1f} MB ({total / n / 1e3:.0f} KB/sample; "
            f"{mem:.0f} GB RAM); page cache {cache}\n"
            f"   machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; Python "
            f"{platform.python_version()}, NumPy {np.__version__}; training reader with workers=0, batch 16, "
            f"members clip.npy/text.npy/latent.npy/json (audio.flac skipped), decoded and collated")


def bench_reader(n: int, per_shard: int, cold: bool = False) -> None:
    from shards.reader import ReaderConfig

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        folder = Path(tmp)
        infos = write_bench_shards(folder, n, per_shard)
        urls = [str(folder / s.name) for s in infos]
        total = sum(s.bytes for s in infos)
        settle = (lambda: drop_page_cache(urls)) if cold else (lambda: None)
        raw_scan(urls)  # warm-up: page cache, imports, allocator
        settle()
        t_raw, m = _timed(raw_scan, urls)
        assert m == n * 5, (m, n)
        results = [("raw tarfile scan (baseline)", t_raw, n, "")]
        settle()
        t, k = _timed(stock_webdataset, urls)
        results.append(("stock WebDataset(urls).decode()", t, k, ""))
        default = ReaderConfig()
        for label, cfg in READER_SETTINGS.items():
            cfg_line = {**{"mix_shards": default.mix_shards, "shuffle_buffer": default.shuffle_buffer}, **cfg}
            settle()
            first, t, k = training_reader(folder, n, **cfg)
            results.append((f"TrainLoader, {label}", t, k,
                            f"mix {cfg_line['mix_shards']}, buffer {cfg_line['shuffle_buffer']}; first batch {first:.2f} s"))
        print(_setup_line(n, infos, total, cold))
        mb_per_sample = total / n / 1e6
        print(f"   {'reader':40s} {'samples/s':>10s} {'MB/s':>8s} {'time vs raw':>12s}")
        for name, t, k, note in results:
            rate = k / t
            print(f"   {name:40s} {rate:10.0f} {rate * mb_per_sample:8.0f} {t / t_raw * n / k:11.2f}x  {note}")
        name, t, k, _ = results[2]
        ratio = t / t_raw * n / k
        print(f"   training reader (defaults, after its first batch) / raw scan = {ratio:.2f}x (goal: within 1.5x) -> "
              f"{'MET' if ratio <= 1.5 else 'NOT MET'}")


# ------------------------------------------------------------------------------------------------
# encode

def _full_encoders(device):
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from shards.encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AudioVAE, ClipImageEncoder, ClipTextEncoder
    from shards.random_models import clip_config, clip_tokenizer, vae_config

    torch.manual_seed(0)
    cfg = clip_config("full", 768)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vision = CLIPVisionModelWithProjection(cfg.vision_config).eval().to(device, dtype)
    text = CLIPTextModelWithProjection(cfg.text_config).eval().to(device, dtype)
    vae = AutoencoderKL(**vae_config("full")).eval().to(device)
    return (ClipImageEncoder(vision, cfg.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True, device,
                             dtype),
            ClipTextEncoder(text, clip_tokenizer(), device, dtype),
            AudioVAE(vae, device))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_encode(n: int, device_name: str) -> None:
    import torch

    from core.decode import DecodeRequest, decode
    from core.device import torch_device
    from shards.encoders import posterior_member, resize_crop
    from shards.mel import log_mel_torch, prepare_waveform

    device = torch_device(device_name)
    sig = DEFAULT_SIGNAL
    req = DecodeRequest(start_s=0.0, duration_s=sig.window_s, audio_rates=(sig.feature_sr,), rgb_fps=sig.clip_fps)
    clips = [CLIPS[i % len(CLIPS)] for i in range(n)]
    t0 = time.perf_counter()
    image, text, vae = _full_encoders(device)
    t_build = time.perf_counter() - t0
    # warm-up (allocator, kernels) on one sample, not timed
    warm = decode(clips[0], req)
    image.encode_frames(resize_crop(warm.rgb[:2], image.image_size))
    text.encode(["warm-up"])
    vae.encode_posterior(log_mel_torch(torch.from_numpy(prepare_waveform(warm.audio[sig.feature_sr]))[None]
                                       .to(device)))
    times = {k: 0.0 for k in ("decode", "resize+flac", "clip image", "clip text", "mel", "vae")}

    def tick(name, t):
        _sync(device)
        now = time.perf_counter()
        times[name] += now - t
        return now

    for path in clips:
        t = time.perf_counter()
        clip = decode(path, req)
        t = tick("decode", t)
        frames = resize_crop(clip.rgb, image.image_size)
        flac_bytes(clip.audio[sig.feature_sr], sig.feature_sr)
        t = tick("resize+flac", t)
        emb = image.encode_frames(frames)
        t = tick("clip image", t)
        txt = text.encode(["the sound of " + path.stem])
        t = tick("clip text", t)
        mel = log_mel_torch(torch.from_numpy(prepare_waveform(clip.audio[sig.feature_sr]))[None].to(device))
        t = tick("mel", t)
        mean, std = vae.encode_posterior(mel)
        posterior_member(mean[0], std[0])
        npy_bytes(emb.astype(np.float16)), npy_bytes(txt[0].astype(np.float16))
        tick("vae", t)
    total = sum(times.values())
    decode_s = times["decode"]
    print(f"\n== encode: {n} real clips, full-size CLIP ViT-L/14 + AudioLDM VAE (random weights), device {device}"
          f" ({torch.get_num_threads()} CPU threads); models built in {t_build:.1f}s")
    print(f"   {'part':14s} {'s/sample':>9s} {'share':>7s}")
    for name, t in times.items():
        print(f"   {name:14s} {t / n:9.3f} {t / total:7.1%}")
    print(f"   total {total / n:.3f} s/sample = {n / total:.3f} samples/s; decode alone (the floor) "
          f"{n / decode_s:.3f} samples/s; encode/decode time = {total / decode_s:.1f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reader-samples", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--encode-samples", type=int, default=0,
                   help="clips to encode (default: 1 on CPU, where one takes minutes; 64 on a GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-reader", action="store_true")
    p.add_argument("--skip-encode", action="store_true")
    p.add_argument("--cold", action="store_true", help="evict the shards from the page cache before every reader pass")
    args = p.parse_args(argv)
    if not args.skip_reader:
        bench_reader(args.reader_samples, args.per_shard, args.cold)
    if not args.skip_encode:
        from core.device import torch_device

        n = args.encode_samples or (64 if torch_device(args.device).type == "cuda" else 1)
        bench_encode(n, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
