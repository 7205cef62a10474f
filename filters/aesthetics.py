"""Audio quality: the audiobox-aesthetics axes (Meta, 2025) from a local checkpoint.

Four scores per window on the release's 1-10 scale: PQ (production quality), PC (production
complexity), CE (content enjoyment), CU (content usefulness). The model is the release's: a
WavLM-base encoder (transformers' ``WavLMModel``, the maintained implementation of the same
network), a softmax-weighted sum of its 13 layer outputs per axis, the mean over the valid frames,
L2-normalised, one linear head per axis, and the checkpoint's target de-normalisation. Inference
follows the package's ``AesPredictor``: 16 kHz mono, 10 s windows (hop 10 s) zero-padded and
masked, a clip's score the length-weighted mean of its windows' scores.

The ``audiobox-aesthetics`` package is not a dependency (it hard-requires torchaudio): the release's
state dict is loaded here, its key names mapped onto transformers' (``release_key``), strictly,
so a checkpoint missing a weight is refused. Differences from the package, all deliberate: float32
always (the checkpoint's ``precision`` is not applied); for a window shorter than 10 s the encoder's
attention mask comes from transformers' frame count, which can be one frame shorter than WavLM's
own (the pooling uses WavLM's rule); audio is resampled by the caller (``core.resample``'s
torchaudio kernel in the clean stage). docs/curation.md has the measured agreement.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

AXES = ("CE", "CU", "PC", "PQ")
AES_COLUMNS = tuple(f"aes_{a.lower()}" for a in AXES)  # ledger columns aes_ce, aes_cu, aes_pc, aes_pq
AES_SAMPLE_RATE = 16000
AES_WINDOW_S = 10
AES_NONE = "none"
REGISTRY_NAME = "audiobox_aesthetics"  # core/registry.json
# the release's encoder (audiobox_aesthetics.model.aes.DEFAULT_AUDIO_CFG: WavLM base, no bias in the convs)
RELEASE_WAVLM = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                     conv_bias=False, feat_extract_norm="group", num_conv_pos_embeddings=128,
                     num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800,
                     do_stable_layer_norm=False)
RELEASE_HEAD = dict(proj_num_layer=1, proj_ln=False, nth_layer=13, use_weighted_layer_sum=True,
                    normalize_embed=True, output_dim=1)
# release key (after the checkpoint's "model." prefix) -> transformers WavLMModel key, in order
_KEY_MAP = (
    (r"^mask_emb$", "masked_spec_embed"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.weight$", r"feature_extractor.conv_layers.\1.conv.weight"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^layer_norm\.(weight|bias)$", r"feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"feature_projection.projection.\1"),
    (r"^encoder\.pos_conv\.0\.bias$", "encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.pos_conv\.0\.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([kqv]_proj|out_proj)\.(weight|bias)$", r"encoder.layers.\1.attention.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)$",
     r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.grep_a$", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$",
     r"encoder.layers.\1.attention.rel_attn_embed.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.layers.\1.final_layer_norm.\2"),
)


class AestheticsUnavailable(ValueError):
    """A checkpoint that is not an audiobox-aesthetics release (missing, unreadable, wrong keys)."""


@dataclass(frozen=True)
class AestheticsConfig:
    """Which audiobox-aesthetics checkpoint scores the windows (CLI prefix ``aes_``)."""

    model: str = field(default=AES_NONE, metadata={
        "help": "audiobox-aesthetics checkpoint: the release's checkpoint.pt, a folder with its "
                "model.safetensors and config.json (Hugging Face facebook/audiobox-aesthetics), default "
                "(MODELS_DIR/audiobox_aesthetics/checkpoint.pt), or none: not scored (aes_* stay missing)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})

    @property
    def enabled(self) -> bool:
        return self.model.strip().lower() != AES_NONE


def release_key(key: str) -> str | None:
    """The transformers WavLM key of a release encoder key (``wavlm_model.`` stripped), or None."""
    for pattern, target in _KEY_MAP:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    return None


def read_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """``(state_dict, model_cfg, target_transform)`` of the release: ``checkpoint.pt`` (read with
    ``weights_only=True``) or the Hugging Face folder (``model.safetensors`` + ``config.json``)."""
    import json

    import torch

    p = Path(path).expanduser()
    try:
        if p.is_dir():
            from safetensors.torch import load_file

            cfg = json.loads((p / "config.json").read_text())
            return load_file(str(p / "model.safetensors")), cfg, cfg.get("target_transform") or {}
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise AestheticsUnavailable(f"{p}: not a readable audiobox-aesthetics checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise AestheticsUnavailable(f"{p}: no state_dict in the checkpoint (the release's checkpoint.pt has one)")
    sd = {re.sub(r"^model\.", "", k): v for k, v in ckpt["state_dict"].items()}
    return sd, dict(ckpt.get("model_cfg") or {}), dict(ckpt.get("target_transform") or {})


def _head(dim: int, cfg: dict):
    """One axis's projection, laid out as the release's (Linear, [LayerNorm], GELU) blocks."""
    from torch import nn

    layers: list = []
    for _ in range(int(cfg["proj_num_layer"]) - 1):
        layers += [nn.Linear(dim, dim)] + ([nn.LayerNorm(dim)] if cfg["proj_ln"] else []) + [nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(dim, int(cfg["output_dim"])))


def build_model(model_cfg: dict):
    """The network with the release's layout; ``model_cfg["wavlm_config"]`` (tests' tiny models only)
    overrides the release encoder."""
    import torch
    from torch import nn
    from transformers import WavLMConfig, WavLMModel

    head = {k: model_cfg.get(k, v) for k, v in RELEASE_HEAD.items()}
    if not head["use_weighted_layer_sum"]:
        raise AestheticsUnavailable("use_weighted_layer_sum false is not supported (the release uses the sum)")
    wavlm = WavLMModel(WavLMConfig(**{**RELEASE_WAVLM, **(model_cfg.get("wavlm_config") or {})}))
    net = nn.Module()
    net.wavlm_model = wavlm
    dim = wavlm.config.hidden_size
    net.proj_layer = nn.ModuleDict({a: _head(dim, head) for a in AXES})
    net.layer_weights = nn.ParameterDict({a: nn.Parameter(torch.ones(head["nth_layer"]) / head["nth_layer"])
                                          for a in AXES})
    net.head_cfg = head
    return net


def load_release(net, state_dict: dict) -> None:
    """Load a release state dict (its own key names) into ``build_model``'s network, strictly."""
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith("wavlm_model."):
            target = release_key(key[len("wavlm_model."):])
            if target is None:
                unknown.append(key)
                continue
            mapped["wavlm_model." + target] = value
        else:
            mapped[key] = value
    try:
        missing, unexpected = net.load_state_dict(mapped, strict=False)
    except RuntimeError as e:  # a weight of another shape: another architecture
        raise AestheticsUnavailable(f"not an audiobox-aesthetics state dict: {' '.join(str(e).split())[:300]}") from e
    problems = unknown + list(unexpected)
    if missing or problems:
        raise AestheticsUnavailable(
            f"not an audiobox-aesthetics state dict: {len(missing)} weight(s) missing (e.g. {missing[:2]}), "
            f"{len(problems)} unknown (e.g. {problems[:2]})")


def _frame_padding(mask, frames: int):
    """WavLM's own frame mask: a frame is padding when every sample of its share of the input is."""
    pad = ~mask
    extra = pad.shape[1] % frames
    if extra:
        pad = pad[:, :-extra]
    return pad.view(pad.shape[0], frames, -1).all(-1)


def forward(net, wav, mask) -> dict:
    """Normalised predictions per axis for windows ``wav`` [B, T] with valid-sample ``mask`` [B, T]."""
    import torch

    out = net.wavlm_model(wav, attention_mask=mask.long(), output_hidden_states=True)
    layers = torch.stack(out.hidden_states[: net.head_cfg["nth_layer"]], dim=-1)  # B T C L
    valid = (~_frame_padding(mask, layers.shape[1])).unsqueeze(-1).to(layers.dtype)
    preds = {}
    for axis in AXES:
        embed = torch.einsum("btcl,l->btc", layers, torch.softmax(net.layer_weights[axis], dim=-1))
        embed = (embed * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        if net.head_cfg["normalize_embed"]:
            embed = torch.nn.functional.normalize(embed, dim=-1)
        preds[axis] = net.proj_layer[axis](embed).squeeze(-1)
    return preds


def resolve(spec: str) -> Path:
    """The checkpoint through the one resolver: ``default`` (the models folder, ``core.registry``), a
    ``checkpoint.pt`` file (sha256-checked under its release name) or the Hugging Face folder."""
    from core.models import ModelUnavailable
    from core.registry import resolve_release

    folder = Path(spec).expanduser()
    if spec != "default" and folder.is_dir():
        if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
            raise AestheticsUnavailable(f"{folder} holds no model.safetensors and config.json of facebook/audiobox-aesthetics")
        return folder
    try:
        return resolve_release(REGISTRY_NAME, None if spec == "default" else spec).path
    except ModelUnavailable as e:
        raise AestheticsUnavailable(str(e)) from e


class AestheticsScorer:
    """The four axes of 16 kHz mono windows. Load once per worker."""

    def __init__(self, config: AestheticsConfig):
        self.config = config
        self.net = None
        self.transform: dict[str, tuple[float, float]] = {}

    def load(self) -> "AestheticsScorer":
        if self.net is None:
            sd, model_cfg, transform = read_checkpoint(resolve(self.config.model))
            path = self.config.model
            missing = [a for a in AXES if a not in transform]
            if missing:
                raise AestheticsUnavailable(f"{path}: no target_transform for {', '.join(missing)}")
            net = build_model(model_cfg)
            load_release(net, sd)
            self.net = net.to(self.config.device).eval()
            self.transform = {a: (float(transform[a]["mean"]), float(transform[a]["std"])) for a in AXES}
        return self

    def scores_batch(self, clips: list[np.ndarray]) -> list[dict[str, Any]]:
        """``aes_ce, aes_cu, aes_pc, aes_pq`` of each clip (None for an empty one)."""
        import torch

        self.load()
        win = AES_WINDOW_S * AES_SAMPLE_RATE
        pieces, owner, weight = [], [], []
        for i, clip in enumerate(clips):
            x = np.asarray(clip, np.float32)
            for lo in range(0, x.size, win):
                pieces.append(x[lo: lo + win])
                owner.append(i)
                weight.append(pieces[-1].size / win)
        out: list[dict[str, Any]] = [dict.fromkeys(AES_COLUMNS) for _ in clips]
        if not pieces:
            return out
        wav = torch.zeros(len(pieces), win)
        mask = torch.zeros(len(pieces), win, dtype=torch.bool)
        for j, p in enumerate(pieces):
            wav[j, : p.size] = torch.from_numpy(p)
            mask[j, : p.size] = True
        with torch.inference_mode():
            preds = forward(self.net, wav.to(self.config.device), mask.to(self.config.device))
        owner_a, weight_a = np.asarray(owner), np.asarray(weight)
        for axis, column in zip(AXES, AES_COLUMNS):
            mean, std = self.transform[axis]
            values = preds[axis].float().cpu().numpy() * std + mean
            for i in set(owner):
                sel = owner_a == i
                v = float(np.sum(values[sel] * weight_a[sel]) / np.sum(weight_a[sel]))
                out[i][column] = v if math.isfinite(v) else None
        return out
