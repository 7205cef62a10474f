"""The optimisation recipe: AdamW parameter groups, the learning-rate schedule and the EMA.

Weight decay pulls weights towards zero, which is a prior for matrices but not for the
parameters that set scales and offsets or stand for a token: 1-D tensors (norm scales, biases),
embedding tables, the timestep embedding and the learned null condition are not decayed.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from train.config import TrainConfig

log = logging.getLogger("train")

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


def adapt_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A checkpoint's optimiser state for this optimiser's groups.

    Checkpoints from before the no-decay groups hold one group over ``model.parameters()`` in
    order; their per-parameter moments are mapped onto the two groups (the hyperparameters come
    from the saved group, the weight decay from the new group). Anything else is returned as is.
    """
    current = optimizer.state_dict()
    if len(saved.get("param_groups", [])) == len(current["param_groups"]) or len(saved["param_groups"]) != 1:
        return saved
    old_group = saved["param_groups"][0]
    params = list(model.parameters())
    if len(old_group["params"]) != len(params):
        return saved
    position = {id(p): i for i, p in enumerate(params)}
    new_ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    state = {j: saved["state"][old_group["params"][position[pid]]] for j, pid in enumerate(new_ids)
             if old_group["params"][position[pid]] in saved["state"]}
    groups = [{**{k: v for k, v in old_group.items() if k not in ("params", "weight_decay", "name")},
               "params": g["params"], "weight_decay": g["weight_decay"], "name": g.get("name")}
              for g in current["param_groups"]]
    log.warning("optimiser state from before the no-decay parameter groups: mapped onto the two groups")
    return {"state": state, "param_groups": groups}
