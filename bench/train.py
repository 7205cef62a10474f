"""Benchmark: training throughput, and how much of a step the data loader stalls.

Same process, same model, same loss code, two ways to feed it:

1. baseline, compute only: one batch already on the device, ``--steps`` optimiser steps
   (forward, backward, clipping, AdamW, EMA), as ``train.trainer`` does them;
2. the trainer itself (``train.trainer.train``, world size 1): batches streamed from shards
   through ``shards.reader.TrainLoader`` with 0 and with ``--workers`` loader processes; its own
   measurements (steps/s, samples/s, data-wait share of step time) after a warm-up interval.

It prints steps/s, samples/s, the stall share, and each streamed run's throughput relative to
the compute-only baseline. ``--config tiny`` (default on CPU) is the test UNet on 8x16x8 latents;
``--config full`` (default on a GPU) is VTA-LDM's UNet on AudioLDM's 8x256x16 latents in bf16.

    .venv/bin/python bench/train.py [--config tiny|full] [--steps 30] [--batch-size 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from shards_fixture import write_shards  # noqa: E402
from train.config import FULL_UNET_CONFIG, TINY_UNET_CONFIG, ModelConfig, NoiseConfig, TrainConfig  # noqa: E402
from train.model import DiffusionLoss, VideoToAudioUNet  # noqa: E402
from train.trainer import train  # noqa: E402

LATENTS = {"tiny": (8, 16, 8), "full": (8, 256, 16)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def compute_only(mcfg: ModelConfig, batch_size: int, latent: tuple[int, int, int], steps: int,
                 device: torch.device, bf16: bool) -> float:
    """Steps/s with no data loading at all (the ceiling the loader can reach)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = VideoToAudioUNet(mcfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    ema = EMAModel(model.parameters(), decay=0.9999, foreach=True)
    loss_fn = DiffusionLoss(NoiseConfig())
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"latent": torch.randn(batch_size, 2, *latent, device=device).abs() * 0.1,
             "clip": torch.randn(batch_size, 20, 768, device=device),
             "clip_mask": torch.ones(batch_size, 20, dtype=torch.bool, device=device)}
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with amp:
            terms = loss_fn(model, batch, 0.92, gen, 0.1)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    warm = max(2, steps // 5)
    for _ in range(warm):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def streamed(shards: Path, out: Path, mcfg: ModelConfig, batch_size: int, steps: int, workers: int) -> dict:
    """The trainer's own figures for ``steps`` steps after a warm-up interval of ``steps // 4``."""
    warm = max(2, steps // 4)
    tcfg = TrainConfig(shards=str(shards), out=str(out), batch_size=batch_size, max_steps=warm + steps,
                       ckpt_every=10**9, val_every=0, log_every=warm, workers=workers, seed=0)
    train(tcfg, mcfg, NoiseConfig())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warm]
    seconds = sum((r["step"] - p["step"]) / r["steps_per_s"] for p, r in zip([rows[0]] + timed, timed))
    wait = sum(r["data_wait_share"] * (r["step"] - p["step"]) / r["steps_per_s"]
               for p, r in zip([rows[0]] + timed, timed))
    n = timed[-1]["step"] - warm
    return {"steps_per_s": n / seconds, "samples_per_s": n * batch_size / seconds, "data_wait_share": wait / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "full"], default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = args.config or ("full" if device.type == "cuda" else "tiny")
    bf16 = device.type == "cuda"
    mcfg = ModelConfig(unet_config=FULL_UNET_CONFIG if config == "full" else TINY_UNET_CONFIG)
    latent = LATENTS[config]
    print(f"device: {device_name(device)}; config: {config} UNet, latents {latent}, batch {args.batch_size}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}")
    if device.type == "cpu" and config == "full":
        print("note: the full config on CPU is slow; the GPU figures are the ones that matter")
    if device.type == "cpu":
        print("no GPU here: full VTA-LDM config in bf16 not measured (run this script on a GPU machine)")

    results = {"device": device_name(device), "config": config, "batch_size": args.batch_size}
    base_before = compute_only(mcfg, args.batch_size, latent, args.steps, device, bf16)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "data", {"train": [64] * 8}, latent_shape=latent)
        runs = {}
        for workers in sorted({0, args.workers}):
            runs[workers] = streamed(shards, Path(tmp) / f"run-w{workers}", mcfg, args.batch_size, args.steps,
                                     workers)
        # the baseline is measured before and after the streamed runs: a shared machine drifts
        base = (compute_only(mcfg, args.batch_size, latent, args.steps, device, bf16) + base_before) / 2
        results["compute_only_steps_per_s"] = base
        print(f"baseline, compute only:        {base:8.2f} steps/s  {base * args.batch_size:9.1f} samples/s"
              f"  (mean of {base_before:.2f} before and {2 * base - base_before:.2f} after)")
        for workers, r in runs.items():
            results[f"streamed_workers{workers}"] = r
            print(f"trainer, {workers} loader worker(s):  {r['steps_per_s']:8.2f} steps/s  "
                  f"{r['samples_per_s']:9.1f} samples/s  data stall {100 * r['data_wait_share']:5.1f}% of step time  "
                  f"({r['steps_per_s'] / base:.2f}x the compute-only rate)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
