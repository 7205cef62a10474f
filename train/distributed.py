"""The process group a training run lives in, and the few collectives the trainer needs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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


def gather(d: Dist, obj):
    if not d.initialised:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(d: Dist, values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if d.initialised:
        dist.all_reduce(t)
    return t.tolist()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def broadcast_object(d: Dist, obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank."""
    if not d.initialised:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
