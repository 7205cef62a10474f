"""AudioLDM's HiFi-GAN vocoder (transformers ``SpeechT5HifiGan``): log-mel [B, frames, 64] -> 16 kHz audio.

Loads from a Hugging Face id (an AudioLDM pipeline repo uses its ``vocoder/`` subfolder) or a
``save_pretrained`` folder, and refuses a checkpoint that would leave weights random. A random
vocoder can be built from AudioLDM's config for tests, benchmarks and the offline demo; it is
marked like ``shards.random_models``' folders so that outputs made with it say so.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from core.device import torch_device
from core.models import ModelUnavailable, resolve_pretrained
from shards.encoders import quiet_transformers, require_complete
from shards.random_models import RANDOM_MARKER

log = logging.getLogger(__name__)

# cvssp/audioldm-s-full-v2's vocoder/config.json
_FULL = dict(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
             upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
             resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], normalize_before=False)
_TINY = dict(_FULL, upsample_initial_channel=32, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])


def load_vocoder(id_or_path: str, device: str | torch.device | None = "auto"):
    from transformers import SpeechT5HifiGan

    resolved = resolve_pretrained(id_or_path, pipeline_subfolder="vocoder")
    with quiet_transformers():
        model, info = SpeechT5HifiGan.from_pretrained(resolved.path, output_loading_info=True)
    require_complete(f"vocoder {id_or_path}", info)
    return model.to(torch_device(device)).eval(), resolved.path


def build_random_vocoder(folder: str | Path, size: Literal["tiny", "full"] = "tiny", seed: int = 0) -> Path:
    """A SpeechT5HifiGan with AudioLDM's interface (64 mels in, x160 upsampling, 16 kHz) and random weights."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    folder = Path(folder)
    torch.manual_seed(seed)
    SpeechT5HifiGan(SpeechT5HifiGanConfig(**(_FULL if size == "full" else _TINY))).eval().save_pretrained(folder)
    (folder / RANDOM_MARKER).write_text(f"HiFi-GAN vocoder ({size}): random weights built from a config, "
                                        "not a trained model.\n")
    return folder


@torch.inference_mode()
def vocode(vocoder, log_mel: torch.Tensor) -> torch.Tensor:
    """Log-mels [B, n_mels, frames] (``AudioVAE.decode`` layout) -> waveforms [B, samples] float32 on CPU."""
    n_mels = int(vocoder.config.model_in_dim)
    if log_mel.shape[1] != n_mels:
        raise ModelUnavailable("vocoder", f"it takes {n_mels} mel bands, the VAE produced {log_mel.shape[1]}")
    param = next(vocoder.parameters())
    wave = vocoder(log_mel.transpose(1, 2).to(param.device, param.dtype))
    return wave.reshape(log_mel.shape[0], -1).float().cpu()
