"""Atomic, exactly-resumable checkpoints and loading a run back for sampling.

Layout: ``RUN/checkpoints/step-00001000/`` holds ``model.safetensors``, ``ema.safetensors``,
``optimizer.pt``, ``rng.pt`` (every rank's RNG states), ``trainer_state.json`` (step, LR
scheduler, EMA counters, every rank's data-stream position) and ``run_config.json`` (everything
needed to rebuild the model for sampling). A checkpoint is written into a hidden temporary folder,
fsynced, then renamed: a ``step-*`` folder is always complete, whatever kills the run. Loading
uses safetensors and ``torch.load(weights_only=True)``, never unrestricted pickle. Resuming reads
every file of the newest checkpoint before applying any; a damaged one (a disk that lost the
last write, a copy cut short) is named in a warning and the previous intact checkpoint is used.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.atomic import fsync_dir
from train.config import ModelConfig, NoiseConfig, from_dict
from train.model import VideoToAudioUNet
from train.optim import adapt_optimizer_state

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
RUN_CONFIG = "run_config.json"


def checkpoints_dir(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoints_dir(run)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run: str | Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run folder."""
    p = Path(path)
    if (p / RUN_CONFIG).is_file() and (p / "model.safetensors").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p}: neither a checkpoint nor a run folder with checkpoints/step-*")
    return latest


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in named.items()}


def ema_state(model: torch.nn.Module, ema) -> dict[str, torch.Tensor]:
    """EMA shadow weights keyed by parameter name (loadable into the model)."""
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, ema.shadow_params))


def save_checkpoint(run: str | Path, step: int, *, model: torch.nn.Module, ema, optimizer, scheduler,
                    trainer_state: dict, rng_states: list[dict], run_config: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (call on rank 0 only) and prune old ones."""
    folder = checkpoints_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_tensors(model.state_dict()), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_tensors(ema_state(model, ema)), str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    state = dict(trainer_state)
    state["step"] = step
    state["lr_scheduler"] = scheduler.state_dict()
    if ema is not None:
        meta = ema.state_dict()
        meta.pop("shadow_params")
        state["ema"] = meta
    _write_json(tmp / "trainer_state.json", state)
    _write_json(tmp / RUN_CONFIG, run_config)
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. a rerun after a crash at this step)
        old = folder / f".old-step-{step:08d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(folder)
    for _, path in list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def clean_partial(run: str | Path) -> None:
    """Remove temporary folders a killed run left behind (never a complete checkpoint)."""
    folder = checkpoints_dir(run)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing, truncated or corrupt file); names the file."""


def _read(path: Path, what: str, reader):
    try:
        return reader(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing ({what})") from e
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: unreadable {what}: {type(e).__name__}: {e}") from e


def read_checkpoint(path: Path, with_ema: bool) -> dict:
    """Every file of a checkpoint, read and checked before anything is applied to the model."""
    state = _read(path / "trainer_state.json", "trainer state", lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or "step" not in state or "lr_scheduler" not in state:
        raise CheckpointError(f"{path / 'trainer_state.json'}: not a trainer state (no step or lr_scheduler)")
    out = {"state": state,
           "model": _read(path / "model.safetensors", "model weights", lambda p: load_file(str(p))),
           "optimizer": _read(path / "optimizer.pt", "optimizer state",
                              lambda p: torch.load(p, map_location="cpu", weights_only=True)),
           "rng": _read(path / "rng.pt", "RNG states", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
           "ema": None}
    if with_ema and (path / "ema.safetensors").is_file():
        out["ema"] = _read(path / "ema.safetensors", "EMA weights", lambda p: load_file(str(p)))
    return out


def load_latest_intact(run: str | Path, with_ema: bool) -> tuple[Path, dict] | None:
    """The newest checkpoint whose files all read back; a damaged newer one is named and skipped."""
    found = list_checkpoints(run)
    errors = []
    for _, path in reversed(found):
        try:
            loaded = read_checkpoint(path, with_ema)
        except CheckpointError as e:
            log.warning("checkpoint %s is damaged and skipped: %s", path, e)
            errors.append(str(e))
            continue
        if errors:
            log.warning("resuming from the previous intact checkpoint %s", path)
        return path, loaded
    if errors:
        raise CheckpointError(f"no intact checkpoint in {checkpoints_dir(run)}: " + "; ".join(errors))
    return None


def apply_training_state(path: Path, loaded: dict, model: torch.nn.Module, ema, optimizer, scheduler,
                         device: torch.device) -> tuple[dict, list[dict]]:
    """Restore model, EMA, optimiser and LR scheduler in place; return trainer state and RNG states."""
    state = loaded["state"]
    model.load_state_dict({k: v.to(device) for k, v in loaded["model"].items()})
    if ema is not None:
        if loaded["ema"] is not None:
            meta = dict(state.get("ema", {}))
            meta["shadow_params"] = [loaded["ema"][n].to(device) for n, _ in model.named_parameters()]
            ema.load_state_dict(meta)
        else:
            log.warning("%s has no EMA weights: EMA restarts from the current weights", path)
            ema.shadow_params = [p.detach().clone() for p in model.parameters()]
    try:
        optimizer.load_state_dict(adapt_optimizer_state(loaded["optimizer"], optimizer, model))
    except ValueError as e:  # groups that do not match this model's parameters
        raise CheckpointError(f"{path / 'optimizer.pt'}: does not fit this optimiser ({e}); "
                              f"train into a new --out") from e
    scheduler.load_state_dict(state["lr_scheduler"])
    return state, loaded["rng"]


def load_for_inference(path: str | Path, use_ema: bool = True,
                       device: str | torch.device = "cpu") -> tuple[VideoToAudioUNet, dict, Path]:
    """The trained denoiser (EMA weights by default) and its run configuration."""
    ckpt = resolve_checkpoint(path)
    run_config = json.loads((ckpt / RUN_CONFIG).read_text())
    model = VideoToAudioUNet(from_dict(ModelConfig, run_config["model"]), run_config["unet"])
    state = load_file(str(ckpt / "model.safetensors"))
    if use_ema:
        if (ckpt / "ema.safetensors").is_file():
            state.update(load_file(str(ckpt / "ema.safetensors")))
        else:
            log.warning("%s has no EMA weights; using the raw weights", ckpt)
    model.load_state_dict(state)
    return model.to(device).eval(), run_config, ckpt


def noise_config_of(run_config: dict) -> NoiseConfig:
    return from_dict(NoiseConfig, run_config["noise"])


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _init_state(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The weights an ``--init-from`` source holds, the sha256 of each file read, and which weights."""
    if source.is_file():
        if source.suffix == ".safetensors":
            return _read(source, "weights", lambda p: load_file(str(p))), {source.name: _sha256(source)}, "file"
        state = _read(source, "state dict", lambda p: torch.load(p, map_location="cpu", weights_only=True))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{source}: not a state dict of tensors")
        return state, {source.name: _sha256(source)}, "file"
    ckpt = resolve_checkpoint(source)
    files = [ckpt / "model.safetensors"] + ([ckpt / "ema.safetensors"] if (ckpt / "ema.safetensors").is_file() else [])
    state: dict[str, torch.Tensor] = {}
    for f in files:  # the EMA weights (what the source run samples with) replace the raw ones
        state.update(_read(f, "weights", lambda p: load_file(str(p))))
    return state, {str(f.relative_to(ckpt.parent.parent)): _sha256(f) for f in files}, \
        "ema" if len(files) > 1 else "raw"


def init_from(model: torch.nn.Module, source: str | Path) -> dict:
    """Load every parameter of another run into ``model`` (fine-tuning); return what was loaded.

    All of the model's state must be there with the same shapes: a mismatch is an error that names
    the keys, never a partial load. The optimiser, EMA, LR schedule and step are not taken."""
    path = Path(source).resolve()
    state, hashes, which = _init_state(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for what, keys in (("missing in the source", missing), ("not in this model", unexpected),
                                   ("shape differs (source vs this model)", shapes)) if keys]
    if problems:
        raise CheckpointError(f"--init-from {path}: its weights do not fit this model: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in state.items()})
    primary = next(reversed(hashes))  # the EMA file when there is one
    return {"path": str(path), "sha256": hashes[primary], "file": primary, "files": hashes, "weights": which,
            "tensors": len(state)}
