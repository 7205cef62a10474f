"""A tiny, randomly initialised CLAP (transformers ``ClapModel`` + ``ClapProcessor``) saved to a folder.

Weights cannot be downloaded on the project's machines, so tests load this folder exactly as a
user loads a real checkpoint saved with ``save_pretrained``. The audio front end keeps the real
48 kHz / 10 s input contract; only the mel resolution and the network widths are shrunk. The
tokenizer is a byte-level RoBERTa BPE built from the 256-symbol byte alphabet and no merges, so
every byte of a caption is one token and different captions get different token sequences.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def _byte_alphabet() -> list[str]:
    """The 256 printable symbols GPT-2/RoBERTa byte-level BPE maps bytes to."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_byte_bpe_tokenizer(folder: Path) -> RobertaTokenizer:
    """A RoBERTa tokenizer whose vocabulary is the byte alphabet (vocab.json + empty merges.txt)."""
    from transformers import RobertaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _byte_alphabet() + ["<mask>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return RobertaTokenizer.from_pretrained(folder, model_max_length=128)


def tiny_clap_config(vocab_size: int, projection_dim: int = 16, fusion: bool = False) -> HFClapConfig:
    """Small widths, real structure: RoBERTa text tower, HTSAT (Swin) audio tower, projections."""
    from transformers import ClapConfig as HFClapConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=130, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    # 16 mel bins, spec_size 64: freq_ratio 4, so up to 256 time frames fit the 64x64 "image".
    audio = dict(num_mel_bins=16, spec_size=64, window_size=4, patch_embeds_hidden_size=8,
                 depths=[1, 1], num_attention_heads=[1, 2], hidden_size=16, enable_fusion=fusion,
                 hidden_dropout_prob=0.0)
    return HFClapConfig(text_config=text, audio_config=audio, projection_dim=projection_dim)


def build_tiny_clap(folder: str | Path, seed: int = 0, projection_dim: int = 16, fusion: bool = False) -> Path:
    """Save a tiny random ClapModel and its ClapProcessor into ``folder`` and return the folder.

    ``fusion=True`` builds the feature-fusion variant (as ``laion/clap-htsat-fused``): four mel
    channels per clip and the ``is_longer`` branch.
    """
    import torch
    from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor

    folder = Path(folder)
    tokenizer = write_byte_bpe_tokenizer(folder / "_tokenizer_src")
    # 48 kHz and a 10 s window as the real checkpoint; hop 2000 gives 241 frames (<= 256).
    feature_extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=2000,
                                             max_length_s=10, fft_window_size=2048, frequency_min=50,
                                             frequency_max=14000, truncation="fusion" if fusion else "rand_trunc",
                                             padding="repeatpad")
    processor = ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = ClapModel(tiny_clap_config(len(tokenizer), projection_dim, fusion)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer_src")
    return folder
