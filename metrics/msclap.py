"""MS-CLAP 2023 (Elizalde et al.), the audio-language model PAM prompts, loadable from CLAP_weights_2023.pth.

The ``msclap`` package cannot be used here (its package ``__init__`` imports torchaudio), so the tree
is built from maintained parts under the release's own top-level names:

- ``audio_encoder.base.htsat``: torchlibrosa's log-mel front end (STFT kernels and mel bank are
  stored in the checkpoint and loaded as they are) and transformers' ``ClapAudioEncoder``, which is
  HTSAT's Swin tree under other names: ``release_to_project`` renames the release's keys (``qkv``
  split into query/key/value, ``norm1`` -> ``layernorm_before``, ...). Checked once against msclap's
  own HTSAT (random full-size weights, 7 s windows): the 768-d embeddings agree within 5e-7.
  HTSAT's AudioSet classifier (``tscam_conv``, ``head``) does not feed the embedding and is dropped.
- ``caption_encoder.base``: transformers' GPT2Model; the text embedding is its hidden state at the
  last non-pad token (pad id 0, the '!' token msclap pads with).
- ``*.projection``: msclap's two-layer projection to 1024-d; ``logit_scale`` (its exp multiplies the cosines).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ClapAudioConfig, GPT2Config, GPT2Model
from transformers.models.clap.modeling_clap import ClapAudioEncoder

from metrics.checkpoint import load_state, load_strict

# HTSAT's own config module (msclap/models/config.py) builds the front end; config_2023.yml's rates do not reach it
N_FFT, HOP, MEL_BINS, MEL_RATE, FMIN, FMAX, AMIN = 1024, 320, 64, 32000, 50.0, 14000.0, 1e-10
PAD_ID = 0


@dataclass(frozen=True)
class MsClapSize:
    """The release's widths by default; tests use a tiny one."""

    audio_dim: int = 96
    audio_depths: tuple[int, ...] = (2, 2, 6, 2)
    audio_heads: tuple[int, ...] = (4, 8, 16, 32)
    text_dim: int = 768
    text_layers: int = 12
    text_heads: int = 12
    vocab: int = 50257
    proj_dim: int = 1024

    @property
    def audio_out(self) -> int:
        return self.audio_dim * 2 ** (len(self.audio_depths) - 1)


class Projection(nn.Module):
    """msclap's projection: ``layer_norm(l1(x) + l2(gelu(l1(x))))`` (its dropout is inactive in eval)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.linear1(x)
        return self.layer_norm(e + self.linear2(F.gelu(e)))


def _stft_kernels() -> tuple[torch.Tensor, torch.Tensor]:
    """torchlibrosa's conv STFT kernels: periodic Hann times the DFT's first n_fft/2 + 1 rows."""
    n = np.arange(N_FFT)
    window = librosa.filters.get_window("hann", N_FFT, fftbins=True)
    phase = -2 * np.pi * np.outer(np.arange(N_FFT // 2 + 1), n) / N_FFT
    real, imag = (np.cos(phase) * window, np.sin(phase) * window)
    return (torch.tensor(real, dtype=torch.float32)[:, None], torch.tensor(imag, dtype=torch.float32)[:, None])


class _Stft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_real = nn.Conv1d(1, N_FFT // 2 + 1, N_FFT, stride=HOP, bias=False)
        self.conv_imag = nn.Conv1d(1, N_FFT // 2 + 1, N_FFT, stride=HOP, bias=False)
        real, imag = _stft_kernels()
        self.conv_real.weight.data.copy_(real)
        self.conv_imag.weight.data.copy_(imag)


class _LogMel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        bank = librosa.filters.mel(sr=MEL_RATE, n_fft=N_FFT, n_mels=MEL_BINS, fmin=FMIN, fmax=FMAX).T
        self.melW = nn.Parameter(torch.tensor(bank, dtype=torch.float32), requires_grad=False)


class Htsat(nn.Module):
    """Waveform (n, samples) -> HTSAT's 768-d ``latent_output``."""

    def __init__(self, size: MsClapSize) -> None:
        super().__init__()
        self.spectrogram_extractor = nn.Module()
        self.spectrogram_extractor.stft = _Stft()
        self.logmel_extractor = _LogMel()
        self.encoder = ClapAudioEncoder(ClapAudioConfig(
            patch_embeds_hidden_size=size.audio_dim, depths=list(size.audio_depths), hidden_size=size.audio_out,
            num_attention_heads=list(size.audio_heads), num_mel_bins=MEL_BINS, enable_fusion=False))

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(n, 1, frames, 64): centred reflect-padded frames, power spectrum, mel, 10 log10 (ref 1, amin 1e-10)."""
        stft = self.spectrogram_extractor.stft
        x = F.pad(audio[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")
        power = stft.conv_real(x) ** 2 + stft.conv_imag(x) ** 2
        mel = power.transpose(1, 2) @ self.logmel_extractor.melW
        return 10.0 * torch.log10(mel.clamp(min=AMIN))[:, None]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.log_mel(audio)).pooler_output


class MsClap(nn.Module):
    def __init__(self, size: MsClapSize = MsClapSize()) -> None:
        super().__init__()
        self.size = size
        gpt2 = GPT2Config(n_embd=size.text_dim, n_layer=size.text_layers, n_head=size.text_heads,
                          vocab_size=size.vocab, bos_token_id=size.vocab - 1, eos_token_id=size.vocab - 1)
        self.audio_encoder = nn.ModuleDict({"base": nn.ModuleDict({"htsat": Htsat(size)}),
                                            "projection": Projection(size.audio_out, size.proj_dim)})
        self.caption_encoder = nn.ModuleDict({"base": GPT2Model(gpt2),
                                              "projection": Projection(size.text_dim, size.proj_dim)})
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def audio_embeddings(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, samples) 44.1 kHz windows -> (n, proj_dim), unnormalised."""
        return self.audio_encoder["projection"](self.audio_encoder["base"]["htsat"](windows))

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, L) GPT-2 ids padded with 0 -> (n, proj_dim): the hidden state at the last non-pad token."""
        hidden = self.caption_encoder["base"](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = torch.ne(input_ids, PAD_ID).sum(-1) - 1
        return self.caption_encoder["projection"](hidden[torch.arange(len(hidden), device=hidden.device), last])

    @classmethod
    def load(cls, path: str | Path, size: MsClapSize | None = None) -> "MsClap":
        """The model of a release-layout state dict, at the size it was made for unless ``size`` is given."""
        state = load_state(path, key="model")
        return load_strict(path, "an MS-CLAP 2023 state dict", lambda: cls(size or size_of(state)), state,
                           convert=release_to_project).eval()


_HTSAT = "audio_encoder.base.htsat."


def size_of(state: dict[str, torch.Tensor]) -> MsClapSize:
    """The size a release-layout state dict was made for. Shapes do not give GPT-2's head count: the
    release's 12 at width 768, else width / 8 (the tests' tiny models)."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})

    layers = count(_HTSAT + "layers.")
    depths = tuple(count(f"{_HTSAT}layers.{i}.blocks.") for i in range(layers))
    heads = tuple(int(state[f"{_HTSAT}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
                  for i in range(layers))
    vocab, text_dim = state["caption_encoder.base.wte.weight"].shape
    return MsClapSize(audio_dim=int(state[_HTSAT + "patch_embed.proj.weight"].shape[0]), audio_depths=depths,
                      audio_heads=heads, text_dim=int(text_dim), text_layers=count("caption_encoder.base.h."),
                      text_heads=12 if text_dim == 768 else max(1, int(text_dim) // 8), vocab=int(vocab),
                      proj_dim=int(state["audio_encoder.projection.linear1.weight"].shape[0]))
_RENAMES = ((r"^bn0\.", "batch_norm."), (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after."),
            (r"\.attn\.relative_position_", ".attention.self.relative_position_"),
            (r"\.attn\.proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
            (r"\.mlp\.fc2\.", ".output.dense."))
_DROPPED = re.compile(r"^(tscam_conv|head)\.|\.attn_mask$")  # classifier head; shift masks are recomputed
_OLD_GPT2_BUFFERS = re.compile(r"^caption_encoder\.base\.h\.\d+\.attn\.(masked_)?bias$")


def release_to_project(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLAP_weights_2023.pth's keys -> this tree's (HTSAT renamed into ClapAudioEncoder, qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _OLD_GPT2_BUFFERS.match(key):  # causal-mask buffers older transformers saved
            continue
        if not key.startswith(_HTSAT):
            out[key] = value
            continue
        name = key[len(_HTSAT):]
        if _DROPPED.search(name):
            continue
        if name.startswith(("spectrogram_extractor.", "logmel_extractor.")):
            out[key] = value
            continue
        qkv = re.match(r"(.*)\.attn\.qkv\.(weight|bias)$", name)
        if qkv:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{_HTSAT}encoder.{qkv.group(1)}.attention.self.{part}.{qkv.group(2)}"] = chunk
            continue
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        out[f"{_HTSAT}encoder.{name}"] = value
    return out
