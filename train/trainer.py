"""DDP training loop for the VTA-LDM denoiser (run with ``torchrun --nproc_per_node N -m train``).

Every rank runs exactly ``max_steps`` optimiser steps: the step count drives the loop and the
reader's streams are endless (resampled), so uneven shard counts can never leave a rank waiting
in a collective. All randomness (data order, latent sampling, noise, timesteps, condition
dropout) comes from per-rank generators whose states are checkpointed with the model, EMA,
optimiser, LR scheduler and each rank's data-stream position, so a resumed run reproduces the
losses of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from shards.reader import (ReaderConfig, TrainLoader, find_shards, shard_samples, decode_sample, split_shards,
                           validation_batches, stable_hash)
from train import checkpoint as ckpt
from train.config import ModelConfig, NoiseConfig, TrainConfig, load_unet_config, to_dict
from train.model import DiffusionLoss, VideoToAudioUNet

log = logging.getLogger("train")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> Dist:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU); a plain run is world size 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    chosen = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    dist.init_process_group(chosen, device_id=device if chosen == "nccl" else None)
    return Dist(rank, world, local, device, True)


def _gather(d: Dist, obj):
    if not d.initialised:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_sum(d: Dist, values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if d.initialised:
        dist.all_reduce(t)
    return t.tolist()


def rng_state(gen: torch.Generator) -> dict:
    np_state = np.random.get_state(legacy=False)
    return {"generator": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "numpy_pos": int(np_state["state"]["pos"])}


def set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state({"bit_generator": "MT19937", "state": {
        "key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
        "has_uint32": 0, "uinteger": 0})


def _seed_all(seed: int, rank: int, device: torch.device) -> torch.Generator:
    stream = stable_hash("train", seed, rank) % (2**63)
    random.seed(stream)
    np.random.seed(stream % (2**32))
    torch.manual_seed(stream)
    return torch.Generator(device=device).manual_seed(stream)


class DataInfo:
    """What the shards say about themselves: latent shape, VAE scaling, CLIP frame rate."""

    def __init__(self, source: str, vae_scaling_factor: float = 0.0):
        self.shards, self.card = find_shards(source)
        self.train = split_shards(self.shards, "train")
        self.test = split_shards(self.shards, "test")
        if not self.train:
            raise ValueError(f"{source}: no train shards (index lists {len(self.shards)} shard(s))")
        card = self.card or {}
        scale = vae_scaling_factor or card.get("vae_scaling_factor")
        if not scale:
            raise ValueError(f"{source}: no vae_scaling_factor in card.json; pass --vae-scaling-factor")
        self.scaling_factor = float(scale)
        shape = card.get("latent_shape")
        self.latent_shape = tuple(int(x) for x in shape) if shape else self._first_latent_shape()
        self.clip_fps = float(card.get("clip_fps", 2.0))

    def _first_latent_shape(self) -> tuple[int, ...]:
        for sample in shard_samples(self.train[0].url):
            return tuple(decode_sample(sample)["latent"].shape)
        raise ValueError(f"{self.train[0].url}: no samples")


def linear_warmup(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _check_shapes(model: VideoToAudioUNet, latent_shape: tuple[int, ...]) -> None:
    _, c, h, w = latent_shape
    if c != model.latent_channels:
        raise ValueError(f"latents have {c} channels, the UNet config expects {model.latent_channels}")
    factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
    if h % factor or w % factor:
        raise ValueError(f"latent size {h}x{w} is not divisible by the UNet's downsampling factor {factor}")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class MetricsLog:
    """metrics.jsonl (one JSON row per logging step), TensorBoard and the console; rank 0 only."""

    def __init__(self, run: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = run / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(run / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k.replace(".", "/"), v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(tcfg: TrainConfig, mcfg: ModelConfig, ncfg: NoiseConfig, vae_scaling_factor: float = 0.0) -> dict:
    """Train to ``tcfg.max_steps`` (resuming from ``tcfg.out`` if it has checkpoints); return the summary."""
    if not tcfg.shards or not tcfg.out:
        raise ValueError("--shards and --out are required")
    d = init_distributed(tcfg.backend)
    try:
        return _train(d, tcfg, mcfg, ncfg, vae_scaling_factor)
    finally:
        if d.initialised:
            dist.destroy_process_group()


def _train(d: Dist, tcfg: TrainConfig, mcfg: ModelConfig, ncfg: NoiseConfig, vae_scaling_factor: float) -> dict:
    run = Path(tcfg.out)
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(run)
    data = DataInfo(tcfg.shards, vae_scaling_factor)
    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and d.device.type == "cuda")

    gen = _seed_all(tcfg.seed, d.rank, d.device)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    unet_config = load_unet_config(mcfg.unet_config)
    model = VideoToAudioUNet(mcfg, unet_config).to(d.device)
    _check_shapes(model, data.latent_shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(tcfg.warmup_steps))
    ema = None
    if tcfg.ema_decay > 0 and d.is_main:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(model.parameters(), decay=tcfg.ema_decay, foreach=True)
    run_config = {"model": to_dict(mcfg), "unet": unet_config, "noise": to_dict(ncfg),
                  "data": {"latent_shape": list(data.latent_shape), "vae_scaling_factor": data.scaling_factor,
                           "clip_fps": data.clip_fps, "card": data.card},
                  "train": to_dict(tcfg), "world_size": d.world_size}

    step, data_state, resumed_from = 0, None, None
    latest = ckpt.latest_checkpoint(run)
    if latest is not None:
        state, rng = ckpt.load_training_state(latest, model, ema, optimizer, scheduler, d.device)
        step, resumed_from = int(state["step"]), int(state["step"])
        if state.get("world_size") == d.world_size:
            set_rng_state(gen, rng[d.rank])
            data_state = state["data"][d.rank]
        else:
            log.warning("checkpoint was written by %s ranks, this run has %d: data order and noise are "
                        "reseeded (training continues, but not bit-identically)", state.get("world_size"),
                        d.world_size)
            gen = _seed_all(tcfg.seed + step, d.rank, d.device)
        if d.is_main:
            log.info("resuming at step %d from %s", step, latest)
    elif d.is_main:
        log.info("starting a new run in %s", run)
    if d.is_main:
        (run / ckpt.RUN_CONFIG).write_text(json.dumps(run_config, indent=1, sort_keys=True))

    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) \
        if d.initialised else model
    loss_fn = DiffusionLoss(ncfg)
    rcfg = ReaderConfig(workers=tcfg.workers, mix_shards=tcfg.mix_shards, seed=tcfg.seed)
    loader = TrainLoader(data.train, tcfg.batch_size, d.rank, d.world_size, rcfg, need_text=mcfg.use_text,
                         latent_shape=data.latent_shape, state=data_state, pin_memory=d.device.type == "cuda")
    batches = iter(loader)
    val_cache: list[dict] | None = None
    metrics = MetricsLog(run, d.is_main, step)
    if d.is_main and not data.test and tcfg.val_every:
        log.warning("no test shards: validation loss is skipped")

    def autocast():
        return torch.autocast(d.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def validate() -> float:
        nonlocal val_cache
        if val_cache is None:
            val_cache = validation_batches(data.test, tcfg.batch_size, d.rank, tcfg.val_batches, tcfg.seed,
                                           mcfg.use_text, data.latent_shape, tcfg.mix_shards)
        vgen = torch.Generator(device=d.device).manual_seed(stable_hash("val", tcfg.seed, d.rank) % (2**63))
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad(), autocast():
            for batch in val_cache:
                terms = loss_fn(model, _to_device(batch, d.device), data.scaling_factor, vgen, 0.0)
                total += float(terms.per_sample.sum())
                count += terms.per_sample.numel()
        model.train()
        s, n = _all_reduce_sum(d, [total, count], d.device)
        return s / max(n, 1)

    def save(at: int) -> None:
        states = _gather(d, {"rng": rng_state(gen), "data": loader.state_dict()})
        if d.is_main:
            ckpt.save_checkpoint(run, at, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                                 trainer_state={"world_size": d.world_size, "data": [s["data"] for s in states]},
                                 rng_states=[s["rng"] for s in states], run_config=run_config, keep=tcfg.keep_ckpts)
            log.info("checkpoint at step %d", at)

    model.train()
    t_start = time.perf_counter()
    window = {"loss": torch.zeros((), dtype=torch.float64, device=d.device), "steps": 0, "wait": 0.0,
              "t0": time.perf_counter(), "dropped": 0.0, "seen": 0.0}
    total_wait, total_time = 0.0, 0.0
    if step == 0 and tcfg.val_every and data.test:  # the untrained model's loss, for reference
        row0 = {"step": 0, "val_loss": validate()}
        metrics.write(row0)
        if d.is_main:
            log.info("step=0 val_loss=%.4g", row0["val_loss"])
    bar = tqdm(total=tcfg.max_steps, initial=step, disable=not d.is_main, desc="train", dynamic_ncols=True)
    while step < tcfg.max_steps:
        grad_norm = torch.zeros((), device=d.device)
        for micro in range(tcfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - t0
            batch = _to_device(batch, d.device)
            sync = micro == tcfg.grad_accum - 1 or not d.initialised
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with autocast():
                    terms = loss_fn(ddp, batch, data.scaling_factor, gen, tcfg.cond_dropout)
                (terms.loss / tcfg.grad_accum).backward()
            window["loss"] += terms.loss.detach().double() / tcfg.grad_accum
            window["dropped"] += float(terms.drop.sum())
            window["seen"] += terms.drop.numel()
        if tcfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        step += 1
        window["steps"] += 1
        bar.update(1)

        row = None
        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            elapsed = time.perf_counter() - window["t0"]
            loss_sum, wait_sum, dropped, seen = _all_reduce_sum(
                d, [float(window["loss"]), window["wait"], window["dropped"], window["seen"]], d.device)
            samples = window["steps"] * tcfg.batch_size * tcfg.grad_accum * d.world_size
            total_wait += window["wait"]
            total_time += elapsed
            row = {"step": step, "loss": loss_sum / (window["steps"] * d.world_size), "lr": lr,
                   "grad_norm": float(grad_norm), "steps_per_s": window["steps"] / elapsed,
                   "samples_per_s": samples / elapsed, "data_wait_share": wait_sum / d.world_size / elapsed,
                   "cond_dropout_share": dropped / max(seen, 1),
                   "epoch": step * tcfg.batch_size * tcfg.grad_accum * d.world_size / max(1, _train_count(data))}
            window.update(loss=torch.zeros_like(window["loss"]), steps=0, wait=0.0, t0=time.perf_counter(),
                          dropped=0.0, seen=0.0)
        if tcfg.val_every and data.test and (step % tcfg.val_every == 0 or step == tcfg.max_steps):
            row = row or {"step": step}
            row["val_loss"] = validate()
            window["t0"] = time.perf_counter()
        if row is not None and d.is_main:
            metrics.write(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if step % tcfg.ckpt_every == 0 or step == tcfg.max_steps:
            save(step)
    bar.close()

    counts = _gather(d, {"steps": step - (resumed_from or 0), "batches": loader.batches,
                         "wait_s": total_wait, "time_s": total_time})
    summary = {"steps": step, "resumed_from": resumed_from, "world_size": d.world_size,
               "steps_per_rank": [c["steps"] for c in counts], "batches_per_rank": [c["batches"] for c in counts],
               "data_wait_share": sum(c["wait_s"] for c in counts) / max(sum(c["time_s"] for c in counts), 1e-9),
               "wall_s": time.perf_counter() - t_start}
    if d.is_main:
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %d steps (%s), summary in %s", step,
                 f"resumed at {resumed_from}" if resumed_from is not None else "fresh run", run / "summary.json")
    metrics.close()
    return summary


def _train_count(data: DataInfo) -> int:
    return sum(s.count or 0 for s in data.train)
