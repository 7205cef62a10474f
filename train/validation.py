"""Validation loss on a fixed set of test samples, for the raw and the EMA weights.

The set is the first ``val_samples`` test samples in index order, read once and never resampled;
sample i is validated on rank ``i % world_size``. Each sample's latent draw, noise and timestep
come from a generator seeded by (run seed, sample key), the timesteps stratified over the set
(sample i of N in the i-th of N equal bands, so even a small set covers the whole schedule), so
the number depends only on the weights, never on the number of ranks, the batch size or when
validation runs.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from core.keys import stable_hash
from shards.batch import collate
from shards.reader import validation_samples
from train.distributed import Dist, all_reduce_sum, to_device
from train.model import DiffusionLoss

log = logging.getLogger("train")


class Validator:
    def __init__(self, d: Dist, shards, limit: int, batch_size: int, seed: int, loss_fn: DiffusionLoss,
                 scaling_factor: float, need_text: bool, latent_shape, autocast, vision: str = "clip",
                 need_flow: bool = False, need_video: bool = True):
        samples = validation_samples(shards, limit, need_text, latent_shape, vision, need_flow, need_video=need_video)
        self.d, self.loss_fn, self.scaling, self.autocast = d, loss_fn, scaling_factor, autocast
        self.count = len(samples)
        for i, sample in enumerate(samples):
            sample["band"] = i
        mine = samples[d.rank::d.world_size]
        self.batches = [self._with_draws(mine[i:i + batch_size], seed) for i in range(0, len(mine), batch_size)]
        if d.is_main:
            log.info("validation set: %d test sample(s)%s", self.count,
                     f" (the first {limit})" if limit and self.count == limit else " (all of them)")

    def _with_draws(self, samples: list[dict], seed: int) -> dict:
        batch = collate(samples)
        eps, noise, steps = [], [], []
        shape = batch["latent"].shape[2:]
        n_steps = self.loss_fn.cfg.num_train_timesteps
        for sample in samples:
            g = torch.Generator().manual_seed(stable_hash("val", seed, sample["key"]) % (2**63))
            eps.append(torch.randn(shape, generator=g))
            noise.append(torch.randn(shape, generator=g))
            u = float(torch.rand((), generator=g))
            steps.append(min(n_steps - 1, int((sample["band"] + u) * n_steps / self.count)))
        batch["draws"] = (torch.stack(eps), torch.stack(noise), torch.tensor(steps))
        return batch

    def loss(self, model: torch.nn.Module) -> float:
        """Mean min-SNR-weighted loss over the whole set (all ranks), the condition never dropped."""
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.autocast():
            for batch in self.batches:
                eps, noise, steps = (t.to(self.d.device) for t in batch["draws"])
                on_device = to_device({k: v for k, v in batch.items() if k != "draws"}, self.d.device)
                drop = torch.zeros(len(steps), dtype=torch.bool, device=self.d.device)
                terms = self.loss_fn.with_draws(model, on_device, self.scaling, eps, noise, steps, drop)
                total += float(terms.per_sample.sum())
                count += terms.per_sample.numel()
        model.train(was_training)
        s, n = all_reduce_sum(self.d, [total, count], self.d.device)
        return s / max(n, 1)

    def run(self, model: torch.nn.Module, ema, use_ema: bool) -> dict:
        """``val_loss`` (raw weights) and, when the run keeps an EMA, ``val_loss_ema``."""
        row = {"val_loss": self.loss(model)}
        if use_ema:
            with ema_weights(self.d, model, ema):
                row["val_loss_ema"] = self.loss(model)
        return row


@contextlib.contextmanager
def ema_weights(d: Dist, model: torch.nn.Module, ema):
    """Swap the EMA weights (kept on rank 0 only) into ``model`` on every rank, then restore."""
    params = list(model.parameters())
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
        if ema is not None:
            ema.copy_to(params)
        if d.initialised:
            for p in params:
                dist.broadcast(p.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
