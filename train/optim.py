"""The optimisation recipe: AdamW parameter groups, the learning-rate schedule and the EMA.

Weight decay pulls weights towards zero, which is a prior for matrices but not for the
parameters that set scales and offsets or stand for a token: 1-D tensors (norm scales, biases),
embedding tables, the timestep embedding and the learned null condition are not decayed.
"""
from __future__ import annotations

import torch
from torch import nn

from train.config import TrainConfig

# parameter-name prefixes that are embeddings, not projections: never decayed
NO_DECAY_PREFIXES = ("unet.time_embedding.", "unet.class_embedding.", "unet.add_embedding.", "cond.null")


def no_decay(name: str, param: torch.Tensor, embedding_names: set[str]) -> bool:
    return param.ndim < 2 or name in embedding_names or name.startswith(NO_DECAY_PREFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything :func:`no_decay` exempts."""
    embedding_names = {f"{m_name}.{p_name}" if m_name else p_name
                       for m_name, module in model.named_modules() if isinstance(module, nn.Embedding)
                       for p_name, _ in module.named_parameters(recurse=False)}
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if no_decay(name, param, embedding_names) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant, or a linear/cosine decay to 0 at ``max_steps``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max(cfg.max_steps, cfg.warmup_steps + 1))


def build_ema(model: nn.Module, cfg: TrainConfig):
    """diffusers' EMAModel; ``ema_warmup off`` pins the decay (``min_decay = decay``)."""
    if cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    flat = cfg.ema_decay if cfg.ema_warmup == "off" else 0.0
    return EMAModel(model.parameters(), decay=cfg.ema_decay, min_decay=flat, foreach=True)
