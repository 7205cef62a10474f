"""Random-weight CLIP and AudioLDM-VAE checkpoints built from configs, saved like real ones.

Three uses, never a real run: tests (tiny widths), the benchmark (``full``: the exact ViT-L/14
and AudioLDM VAE architectures, so the compute is the real compute) and the offline demo, which
says loudly that its features are meaningless. The folders are ``save_pretrained`` output, so
they load through exactly the code path real weights take. ``tiny`` keeps the real output shapes
(768-d embeddings, 8 latent channels, x4 downsampling) unless ``projection_dim`` says otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Size = Literal["tiny", "full"]
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"

# openai/clip-vit-large-patch14's architecture
_FULL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, hidden_act="quick_gelu")
_FULL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, hidden_act="quick_gelu")
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77)
# cvssp/audioldm-s-full-v2's vae/ architecture (diffusers' AudioLDM conversion: ch 128, mult 1,2,4)
_FULL_VAE = dict(block_out_channels=(128, 256, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
_TINY_VAE = dict(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)


def _byte_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary with no merges: every byte of a word is a token (CLIP's scheme)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _mark(folder: Path, what: str) -> None:
    (folder / RANDOM_MARKER).write_text(f"{what}: random weights built from a config, not a trained model.\n")


def clip_config(size: Size = "tiny", projection_dim: int = 768):
    """``CLIPConfig`` of ViT-L/14 (``full``) or a tiny one, with the byte-level tokenizer's vocabulary size."""
    from transformers import CLIPConfig

    vocab = _byte_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    vision = dict(_FULL_VISION if size == "full" else _TINY_VISION, projection_dim=projection_dim)
    text = dict(_FULL_TEXT if size == "full" else _TINY_TEXT, projection_dim=projection_dim,
                vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def clip_tokenizer():
    """CLIP's tokenizer class over the byte vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77)


def vae_config(size: Size = "tiny", latent_channels: int = 8, scaling_factor: float = 1.0) -> dict:
    """``AutoencoderKL`` keyword arguments of AudioLDM's VAE (``full``) or a tiny one with the same contract."""
    arch = _FULL_VAE if size == "full" else _TINY_VAE
    blocks = len(arch["block_out_channels"])
    return dict(in_channels=1, out_channels=1, latent_channels=latent_channels, scaling_factor=scaling_factor,
                down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                **arch)


def build_random_clip(folder: str | Path, size: Size = "tiny", projection_dim: int = 768, seed: int = 0) -> Path:
    """A CLIPModel (vision + text towers) with random weights, its tokenizer and image processor config."""
    import torch
    from transformers import CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = clip_config(size, projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    side = config.vision_config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": side, "width": side},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True}, indent=2))
    _mark(folder, f"CLIP ({size})")
    return folder


def build_random_vae(folder: str | Path, size: Size = "tiny", latent_channels: int = 8, seed: int = 0,
                     scaling_factor: float = 1.0) -> Path:
    """An AudioLDM-shaped AutoencoderKL (1-channel mel in, ``latent_channels`` out, x4) with random weights."""
    import torch
    from diffusers import AutoencoderKL

    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderKL(**vae_config(size, latent_channels, scaling_factor)).eval().save_pretrained(folder)
    _mark(folder, f"AudioLDM VAE ({size})")
    return folder


def is_random(folder: str | Path) -> bool:
    """True for a folder this module wrote (its marker file is there)."""
    return (Path(folder) / RANDOM_MARKER).is_file()


# The vision encoders of the study (shards.vision), tiny: the release's model class and key names,
# a 32-px input, a 32-d width; ``full`` is the released architecture (benchmarks only).
_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _save(model, folder: Path, what: str, preprocessor: dict | None = None,
          preprocessor_name: str = "preprocessor_config.json") -> Path:
    model.eval().save_pretrained(folder)
    if preprocessor is not None:
        (folder / preprocessor_name).write_text(json.dumps(preprocessor, indent=2))
    _mark(folder, what)
    return folder


def build_random_siglip2(folder: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """A SiglipModel shaped like google/siglip2-base-patch16-512 (the fixed-resolution SigLIP 2 releases
    are SiglipModel checkpoints: ``vision_model.*`` and ``text_model.*`` keys, the MAP pooling head)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=512, patch_size=16) if size == "full" else dict(_TINY_VIT, image_size=32, patch_size=8))
    text = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=256000) if size == "full" else dict(_TINY_VIT, vocab_size=300, pad_token_id=1, bos_token_id=2, eos_token_id=3))
    torch.manual_seed(seed)
    return _save(SiglipModel(SiglipConfig(vision_config=vision, text_config=text)), folder, f"SigLIP 2 ({size})",
                 {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "do_normalize": True,
                  "size": {"height": vision["image_size"], "width": vision["image_size"]}})


def build_random_siglip2_naflex(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Siglip2VisionModel (the NaFlex SigLIP 2 releases: patches in, ``spatial_shapes``)."""
    import torch
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return _save(Siglip2VisionModel(Siglip2VisionConfig(**_TINY_VIT, patch_size=8, num_patches=16)), folder,
                 "SigLIP 2 NaFlex (tiny)")


def build_random_vivit(folder: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """A VivitForVideoClassification like google/vivit-b-16x2-kinetics400 (``vivit.*`` keys + classifier)."""
    import torch
    from transformers import VivitConfig, VivitForVideoClassification

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = (dict(num_frames=32, tubelet_size=[2, 16, 16], image_size=224, num_labels=400) if size == "full"
            else dict(_TINY_VIT, num_frames=4, tubelet_size=[2, 8, 8], image_size=32, num_labels=3))
    torch.manual_seed(seed)
    return _save(VivitForVideoClassification(VivitConfig(**arch)), folder, f"ViViT ({size})",
                 {"image_processor_type": "VivitImageProcessor", "do_rescale": True, "rescale_factor": 1 / 127.5,
                  "offset": True, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})


def build_random_vjepa2(folder: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """A VJEPA2Model like facebook/vjepa2-vitl-fpc64-256 (encoder and predictor keys)."""
    import torch
    from transformers import VJEPA2Config, VJEPA2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = (dict() if size == "full" else
            dict(_TINY_VIT, frames_per_clip=4, tubelet_size=2, crop_size=32, patch_size=8, pred_hidden_size=32,
                 pred_num_hidden_layers=1, pred_num_attention_heads=2, pred_num_mask_tokens=2))
    torch.manual_seed(seed)
    return _save(VJEPA2Model(VJEPA2Config(**arch)), folder, f"V-JEPA 2 ({size})",
                 {"video_processor_type": "VJEPA2VideoProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
                 "video_preprocessor_config.json")
