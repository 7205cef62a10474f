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
import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from core.keys import stable_hash
from shards.batch import decode_sample
from shards.reader import ReaderConfig, TrainLoader
from shards.sources import find_shards, parse_mixture, shard_samples, split_shards, weighted_shards
from train import checkpoint as ckpt
from train.config import ModelConfig, NoiseConfig, TrainConfig, load_unet_config, to_dict
from train.model import DiffusionLoss, VideoToAudioUNet
from train.optim import build_ema, build_optimizer, build_scheduler
from train.distributed import Dist, all_reduce_sum, broadcast_object, gather, init_distributed, to_device
from train.validation import Validator

log = logging.getLogger("train")


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


# what must agree between the shard sets of a mixture (the latents they hold must be the same kind)
_MIX_MUST_AGREE = ("latent_shape", "vae_scaling_factor", "vae_weights_sha256", "text_dim", "sample_rate")


class DataInfo:
    """What the shards say about themselves: latent shape, VAE scaling, CLIP frame rate.

    ``source`` is one shard set or a weighted mixture ``A:0.7,B:0.3``; a mixture's card is its first
    set's, and ``mixture`` lists every set with its weight and card (run_config.json keeps both)."""

    def __init__(self, source: str, vae_scaling_factor: float = 0.0):
        self.mixture = None
        sets = parse_mixture(source)
        if sets is None:
            self.shards, self.card = find_shards(source)
            self.train = split_shards(self.shards, "train")
        else:
            self._mix(sets)
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
        self.audio_only = bool(card.get("audio_only")) or any(m["audio_only"] for m in self.mixture or [])
        self.source = source

    def _mix(self, sets: list[tuple[str, float]]) -> None:
        found = [(src, weight, *find_shards(src)) for src, weight in sets]
        cards = [card or {} for *_, card in found]
        for key in _MIX_MUST_AGREE:
            values = {json.dumps(c.get(key), sort_keys=True) for c in cards}
            if len(values) > 1:
                raise ValueError(f"the mixed shard sets disagree on {key} ({', '.join(sorted(values))}): "
                                 f"they cannot be trained on together")
        self.shards = [s for *_, shards, _ in found for s in shards]
        self.card = cards[0]
        self.train = []
        for src, weight, shards, _ in found:
            train = split_shards(shards, "train")
            if not train:
                raise ValueError(f"{src}: no train shards to mix")
            self.train += weighted_shards(train, weight)
        total = sum(w for _, w in sets)
        self.mixture = [{"source": src, "weight": weight, "share": weight / total,
                         "train_samples": sum(s.count or 0 for s in split_shards(shards, "train")),
                         "audio_only": bool((card or {}).get("audio_only")), "card": card}
                        for src, weight, shards, card in found]

    def condition_config(self, mcfg: ModelConfig) -> ModelConfig:
        """``mcfg`` with the vision token width, token count and text width the card records for
        ``--vision-encoder`` (unchanged without a card); a condition the shards cannot serve is refused."""
        card = self.card
        if mcfg.use_video and self.audio_only:
            raise ValueError(f"{self.source}: audio-only shards (card.json audio_only) have no video features; "
                             f"train on them with --pretrain audio (text) or --condition text|none")
        if not card:
            return mcfg
        if not mcfg.use_video:  # text / none: no vision member is read, the card's encoders do not matter
            return dataclasses.replace(mcfg, clip_dim=int(card.get("clip_dim", mcfg.clip_dim)),
                                       text_dim=int(card.get("text_dim", mcfg.text_dim)))
        name = mcfg.vision_encoder
        # every set of a mixture must serve the condition, not only the first (whose card is self.card)
        for src, each in [(m["source"], m["card"] or {}) for m in self.mixture] if self.mixture else [(self.source, card)]:
            listed = each.get("vision_encoders") or {}
            if listed.get(name) is None and (name != "clip" or listed):
                raise ValueError(f"{src}: the shards hold no {name} vision tokens (card.json lists "
                                 f"{', '.join(listed) or 'only the clip.npy of older shards'}); encode with "
                                 f"pipeline.encode --vision-encoders {name}")
            if mcfg.use_flow and not each.get("with_flow"):
                raise ValueError(f"{src}: condition {mcfg.condition!r} needs flow-{name}.npy; "
                                 f"encode with pipeline.encode --with-flow")
        vision = (card.get("vision_encoders") or {}).get(name)
        dim = int(vision["dim"]) if vision else int(card.get("clip_dim", mcfg.clip_dim))
        tokens = int(vision.get("tokens", 0)) if vision else 0
        self.clip_fps = float(vision["fps"]) if vision else self.clip_fps
        return dataclasses.replace(mcfg, clip_dim=dim, text_dim=int(card.get("text_dim", mcfg.text_dim)),
                                   max_frames=max(mcfg.max_frames, tokens))

    def _first_latent_shape(self) -> tuple[int, ...]:
        for _, sample in shard_samples(self.train[0].url):
            return tuple(decode_sample(sample, need_video=False)["latent"].shape)
        raise ValueError(f"{self.train[0].url}: no samples")


def _check_shapes(model: VideoToAudioUNet, latent_shape: tuple[int, ...]) -> None:
    _, c, h, w = latent_shape
    if c != model.latent_channels:
        raise ValueError(f"latents have {c} channels, the UNet config expects {model.latent_channels}")
    factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
    if h % factor or w % factor:
        raise ValueError(f"latent size {h}x{w} is not divisible by the UNet's downsampling factor {factor}")


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
    mcfg = pretrain_model_config(tcfg, mcfg)
    d = init_distributed(tcfg.backend)
    try:
        return Trainer(d, tcfg, mcfg, ncfg, vae_scaling_factor).run()
    finally:
        if d.initialised:
            dist.destroy_process_group()


def pretrain_model_config(tcfg: TrainConfig, mcfg: ModelConfig) -> ModelConfig:
    """``--pretrain audio`` learns from the audio alone: the condition is the caption's text token
    (``--condition none``: unconditional). The default condition (video) becomes text; any other
    video condition is refused, since no video is read."""
    if tcfg.pretrain != "audio":
        return mcfg
    if mcfg.condition in ("text", "none"):
        return mcfg
    if mcfg.condition != "video":
        raise ValueError(f"--pretrain audio reads no video: use --condition text (the default) or none, "
                         f"not {mcfg.condition}")
    log.info("--pretrain audio: condition text (the caption's CLIP text token)")
    return dataclasses.replace(mcfg, condition="text")


class Window:
    """Sums over one logging interval, reduced across ranks when a row is written."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps, self.wait, self.dropped, self.seen = 0, 0.0, 0.0, 0.0
        self.t0 = time.perf_counter()


class Trainer:
    """One rank's run: built in ``__init__``, resumed from the newest intact checkpoint, then stepped."""

    def __init__(self, d: Dist, tcfg: TrainConfig, mcfg: ModelConfig, ncfg: NoiseConfig, vae_scaling_factor: float):
        self.d, self.tcfg, self.mcfg = d, tcfg, mcfg
        self.run_dir = Path(tcfg.out)
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.run_dir)
        self.data = DataInfo(tcfg.shards, vae_scaling_factor)
        self.mcfg = mcfg = self.data.condition_config(mcfg)
        self.use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and d.device.type == "cuda")
        self.gen = _seed_all(tcfg.seed, d.rank, d.device)
        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
        unet_config = load_unet_config(mcfg.unet_config)
        self.model = VideoToAudioUNet(mcfg, unet_config).to(d.device)
        _check_shapes(self.model, self.data.latent_shape)
        self.init_source = self._init_weights()
        self.optimizer = build_optimizer(self.model, tcfg)
        self.scheduler = build_scheduler(self.optimizer, tcfg)
        self.ema = build_ema(self.model, tcfg) if d.is_main else None  # validation broadcasts it
        self.loss_fn = DiffusionLoss(ncfg)
        self.run_config = {"model": to_dict(mcfg), "unet": unet_config, "noise": to_dict(ncfg),
                           "data": {"latent_shape": list(self.data.latent_shape),
                                    "vae_scaling_factor": self.data.scaling_factor,
                                    "clip_fps": self.data.clip_fps, "card": self.data.card,
                                    "mixture": self.data.mixture, "audio_only": self.data.audio_only},
                           "init_from": self.init_source,
                           "train": to_dict(tcfg), "world_size": d.world_size}
        self.step, self.resumed_from = 0, None

    def _init_weights(self) -> dict | None:
        """``--init-from``: every rank loads the source's weights before step 0. A run that already has
        checkpoints resumes from its own instead, and keeps the record of the source it started from."""
        if not self.tcfg.init_from:
            return None
        if ckpt.list_checkpoints(self.run_dir):
            previous = self.run_dir / ckpt.RUN_CONFIG
            return json.loads(previous.read_text()).get("init_from") if previous.is_file() else None
        return ckpt.init_from(self.model, self.tcfg.init_from)

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def resume(self) -> dict | None:
        """Restore the newest intact checkpoint (rank 0 chooses, so every rank loads the same one);
        return this rank's data-stream state, or None when the streams start afresh."""
        d = self.d
        chosen = None
        if d.is_main:
            found = ckpt.load_latest_intact(self.run_dir, with_ema=self.ema is not None)
            chosen, loaded = (found[0].name, found[1]) if found else (None, None)
        chosen = broadcast_object(d, chosen)
        if chosen is None:
            if d.is_main:
                log.info("starting a new run in %s", self.run_dir)
            return None
        path = ckpt.checkpoints_dir(self.run_dir) / chosen
        if not d.is_main:
            loaded = ckpt.read_checkpoint(path, with_ema=False)
        state, rng = ckpt.apply_training_state(path, loaded, self.model, self.ema, self.optimizer,
                                               self.scheduler, d.device)
        self.step = self.resumed_from = int(state["step"])
        if d.is_main:
            log.info("resuming at step %d from %s", self.step, path)
        if state.get("world_size") == d.world_size:
            set_rng_state(self.gen, rng[d.rank])
            return state["data"][d.rank]
        if d.is_main:
            log.warning("checkpoint was written by %s ranks, this run has %d: model, optimiser, EMA, LR schedule "
                        "and step continue exactly; data streams and noise start afresh (new streams, none of "
                        "the data already read is replayed)", state.get("world_size"), d.world_size)
        self.gen = _seed_all(stable_hash("resume", self.tcfg.seed, self.step), d.rank, d.device)
        return None

    def save(self, loader: TrainLoader) -> None:
        states = gather(self.d, {"rng": rng_state(self.gen), "data": loader.state_dict()})
        if self.d.is_main:
            ckpt.save_checkpoint(self.run_dir, self.step, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                 scheduler=self.scheduler,
                                 trainer_state={"world_size": self.d.world_size, "data": [s["data"] for s in states]},
                                 rng_states=[s["rng"] for s in states], run_config=self.run_config,
                                 keep=self.tcfg.keep_ckpts)
            log.info("checkpoint at step %d", self.step)

    def train_step(self, ddp, batches: Iterator[dict], window: Window) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns the gradient norm."""
        tcfg = self.tcfg
        for micro in range(tcfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - t0
            batch = to_device(batch, self.d.device)
            sync = micro == tcfg.grad_accum - 1 or not self.d.initialised
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with self.autocast():
                    terms = self.loss_fn(ddp, batch, self.data.scaling_factor, self.gen, tcfg.cond_dropout)
                (terms.loss / tcfg.grad_accum).backward()
            window.loss += terms.loss.detach().double() / tcfg.grad_accum
            window.dropped += float(terms.drop.sum())
            window.seen += terms.drop.numel()
        grad_norm = 0.0
        if tcfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        self.step += 1
        window.steps += 1
        return grad_norm

    def log_row(self, window: Window, lr: float, grad_norm: float) -> dict:
        """The logging interval's row (all ranks take part in the reduction)."""
        tcfg, d = self.tcfg, self.d
        elapsed = time.perf_counter() - window.t0
        loss_sum, wait_sum, dropped, seen = all_reduce_sum(
            d, [float(window.loss), window.wait, window.dropped, window.seen], d.device)
        samples = window.steps * tcfg.batch_size * tcfg.grad_accum * d.world_size
        self.total_wait += window.wait
        self.total_time += elapsed
        train_count = sum(s.count or 0 for s in self.data.train)
        row = {"step": self.step, "loss": loss_sum / (window.steps * d.world_size), "lr": lr,
               "grad_norm": grad_norm, "steps_per_s": window.steps / elapsed,
               "samples_per_s": samples / elapsed, "data_wait_share": wait_sum / d.world_size / elapsed,
               "cond_dropout_share": dropped / max(seen, 1),
               "epoch": self.step * tcfg.batch_size * tcfg.grad_accum * d.world_size / max(1, train_count)}
        window.reset()
        return row

    def _unused_projection(self) -> bool:
        """DDP must be told when a projection gets no gradient: ``none`` uses none, and a text-only run
        with its own text projection leaves the video projection idle."""
        m = self.mcfg
        return m.condition == "none" or (not m.use_video and not m.shared_text_projection)

    def run(self) -> dict:
        tcfg, d = self.tcfg, self.d
        t_start = time.perf_counter()
        data_state = self.resume()
        if d.is_main:
            (self.run_dir / ckpt.RUN_CONFIG).write_text(json.dumps(self.run_config, indent=1, sort_keys=True))
        ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            find_unused_parameters=self._unused_projection()) if d.initialised else self.model
        rcfg = ReaderConfig(workers=tcfg.workers, mix_shards=tcfg.mix_shards, shuffle_buffer=tcfg.shuffle_buffer,
                            seed=tcfg.seed)
        loader = TrainLoader(self.data.train, tcfg.batch_size, d.rank, d.world_size, rcfg,
                             need_text=self.mcfg.use_text, latent_shape=self.data.latent_shape, state=data_state,
                             pin_memory=d.device.type == "cuda", generation=self.step,
                             vision=self.mcfg.vision_encoder, need_flow=self.mcfg.use_flow,
                             need_video=self.mcfg.use_video)
        validator = self._validator()
        metrics = MetricsLog(self.run_dir, d.is_main, self.step)
        self.total_wait = self.total_time = 0.0
        if self.step == 0 and validator is not None:  # the untrained model's loss, for reference
            self._write(metrics, {"step": 0, **validator.run(self.model, self.ema, tcfg.ema_decay > 0)})
        self._loop(ddp, iter(loader), loader, validator, metrics)
        summary = self._summary(loader, t_start)
        metrics.close()
        return summary

    def _validator(self) -> Validator | None:
        tcfg = self.tcfg
        if not tcfg.val_every:
            return None
        if not self.data.test:
            if self.d.is_main:
                log.warning("no test shards: validation loss is skipped")
            return None
        return Validator(self.d, self.data.test, tcfg.val_samples, tcfg.batch_size, tcfg.seed, self.loss_fn,
                         self.data.scaling_factor, self.mcfg.use_text, self.data.latent_shape, self.autocast,
                         self.mcfg.vision_encoder, self.mcfg.use_flow, need_video=self.mcfg.use_video)

    def _loop(self, ddp, batches, loader: TrainLoader, validator: Validator | None, metrics: MetricsLog) -> None:
        tcfg = self.tcfg
        self.model.train()
        window = Window(self.d.device)
        bar = tqdm(total=tcfg.max_steps, initial=self.step, disable=not self.d.is_main, desc="train",
                   dynamic_ncols=True)
        while self.step < tcfg.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm = self.train_step(ddp, batches, window)
            bar.update(1)
            last = self.step == tcfg.max_steps
            row = self.log_row(window, lr, grad_norm) if self.step % tcfg.log_every == 0 or last else None
            if validator is not None and (self.step % tcfg.val_every == 0 or last):
                row = {**(row or {"step": self.step}), **validator.run(self.model, self.ema, tcfg.ema_decay > 0)}
                window.t0 = time.perf_counter()
            if row is not None:
                self._write(metrics, row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
            if self.step % tcfg.ckpt_every == 0 or last:
                self.save(loader)
        bar.close()

    def _write(self, metrics: MetricsLog, row: dict) -> None:
        if self.d.is_main:
            metrics.write(row)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def _summary(self, loader: TrainLoader, t_start: float) -> dict:
        counts = gather(self.d, {"steps": self.step - (self.resumed_from or 0), "batches": loader.batches,
                                 "wait_s": self.total_wait, "time_s": self.total_time})
        summary = {"steps": self.step, "resumed_from": self.resumed_from, "world_size": self.d.world_size,
                   "steps_per_rank": [c["steps"] for c in counts], "batches_per_rank": [c["batches"] for c in counts],
                   "data_wait_share": sum(c["wait_s"] for c in counts) / max(sum(c["time_s"] for c in counts), 1e-9),
                   "wall_s": time.perf_counter() - t_start}
        if self.d.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            log.info("done: %d steps (%s), summary in %s", self.step,
                     f"resumed at {self.resumed_from}" if self.resumed_from is not None else "fresh run",
                     self.run_dir / "summary.json")
        return summary
