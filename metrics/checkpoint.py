"""Reading released ``.pth`` checkpoints without running pickled code.

``torch.load(weights_only=True)`` only; training scripts such as PANNs' also saved their data
sampler's state (numpy arrays and a numpy random state), so numpy's array reconstruction and
dtypes (data, not code) are allowed on a second attempt when the first refuses them.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def _numpy_globals() -> list:
    from numpy._core.multiarray import _reconstruct

    dtypes = {type(np.dtype(t)) for t in (np.int64, np.int32, np.uint32, np.float32, np.float64, np.bool_)}
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def load_state(path: str | Path, key: str | None = "model") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``ckpt[key]`` when the file wraps them (``{"model": ...}``), else the file."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if key and isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return ckpt


def load_strict(path: str | Path, what: str, build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor],
                convert: Callable[[dict], dict] = dict) -> torch.nn.Module:
    """``build()`` with ``convert(state)`` loaded strictly: a checkpoint of another architecture or size is
    one ValueError naming the file and what it should have been, not a page of missing keys."""
    try:
        model = build()
        model.load_state_dict(convert(state), strict=True)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not {what} ({' '.join(str(e).split())[:300]})") from e
    return model
