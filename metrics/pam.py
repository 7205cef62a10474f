"""PAM (Deshmukh et al. 2024, "PAM: Prompting Audio-Language Models for Audio Quality Assessment").

The definition, as the authors' code (soham97/PAM) computes it from MS-CLAP 2023 embeddings:

- the audio, mono at 44.1 kHz, is cut into 7 s windows (``pam_windows``): a clip of at most 7 s is
  tiled (repeated) and cut to 7 s; a longer one gives its whole 7 s windows from the start plus,
  when samples are left over, one more window of its last 7 s;
- every window's MS-CLAP audio embedding ``a`` and the two prompts' text embeddings ``t+``
  ("the sound is clear and clean.") and ``t-`` ("the sound is noisy and with artifacts.") are
  L2-normalised; ``p = softmax(s * [a.t+, a.t-])[0]`` with ``s = exp(logit_scale)``, the model's
  learned scale (``pam_probabilities``);
- the clip's PAM is the mean of ``p`` over its windows (``pam_score``), in [0, 1], higher = better
  quality; the set's PAM is the mean over clips (the reference's ``run.py``).

The paper's "PAM" is this one pair of prompts (the code's ``PAM_PROMPTS``), not an average over
several pairs. Deliberate difference: the reference flattens a multi-channel file (channels end to
end); the project averages channels to mono first, as every other metric here does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metrics.msclap import PAD_ID, MsClap, MsClapSize

SAMPLE_RATE = 44100
WINDOW_S = 7
WINDOW = SAMPLE_RATE * WINDOW_S
PROMPTS = ("the sound is clear and clean.", "the sound is noisy and with artifacts.")
TEXT_LEN = 77


def pam_windows(audio: np.ndarray) -> np.ndarray:
    """The (n, 7 s) windows the reference's ``AudioDataset.process_audio`` + ``collate`` cut from 44.1 kHz mono."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    if audio.size == 0:
        raise ValueError("PAM needs audio: the clip has no samples")
    if audio.size <= WINDOW:
        return np.tile(audio, math.ceil(WINDOW / audio.size))[:WINDOW][None]
    whole = audio.size // WINDOW
    windows = audio[:whole * WINDOW].reshape(whole, WINDOW)
    if audio.size % WINDOW:
        windows = np.concatenate([windows, audio[-WINDOW:][None]])
    return windows


def pam_probabilities(audio_embeddings: np.ndarray, prompt_embeddings: np.ndarray, scale: float) -> np.ndarray:
    """Per window: the softmax probability of the positive prompt over the pair's scaled cosines.

    ``audio_embeddings`` (n, d); ``prompt_embeddings`` (2, d), positive prompt first; ``scale`` the
    multiplier itself (MS-CLAP's ``logit_scale.exp()``), not its logarithm.
    """
    a = np.asarray(audio_embeddings, np.float64)
    t = np.asarray(prompt_embeddings, np.float64)
    if a.ndim != 2 or t.shape != (2, a.shape[1]):
        raise ValueError(f"PAM needs (n, d) audio and (2, d) prompt embeddings, got {a.shape} and {t.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = float(scale) * a @ t.T
    # softmax over two classes: p+ = 1 / (1 + exp(l- - l+)), stable for any scale
    return 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))


def pam_score(window_probabilities: np.ndarray) -> float:
    """A clip's PAM: the mean of its windows' positive-prompt probabilities."""
    p = np.asarray(window_probabilities, np.float64).reshape(-1)
    if p.size == 0:
        raise ValueError("PAM of a clip needs at least one window")
    return float(p.mean())


def prompt_tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's text input: each prompt + ' <|endoftext|>', GPT-2 ids padded with '!' to 77."""
    tokenizer.add_special_tokens({"pad_token": "!"})
    if tokenizer.pad_token_id != PAD_ID:
        raise ValueError(f"not GPT-2's tokenizer: '!' is id {tokenizer.pad_token_id}, GPT-2's is {PAD_ID}")
    enc = tokenizer([p + " <|endoftext|>" for p in PROMPTS], padding="max_length", max_length=TEXT_LEN,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@dataclass(frozen=True)
class PamResult:
    score: float
    windows: np.ndarray  # each 7 s window's positive-prompt probability


class PamScorer:
    """PAM of 44.1 kHz mono clips with one MS-CLAP; the two prompts are embedded once."""

    def __init__(self, model: MsClap, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 device: str = "cpu", chunk: int = 4) -> None:
        self.model, self.device, self.chunk = model.to(device).eval(), device, chunk
        with torch.no_grad():
            self.prompts = model.text_embeddings(input_ids.to(device), attention_mask.to(device)).double().cpu().numpy()
            self.scale = float(model.logit_scale.exp())

    @classmethod
    def load(cls, weights: str | Path, tokenizer_dir: str | Path, device: str = "cpu",
             size: MsClapSize | None = None) -> "PamScorer":
        from transformers import AutoTokenizer

        return cls(MsClap.load(weights, size), *prompt_tokens(AutoTokenizer.from_pretrained(str(tokenizer_dir))), device)

    def score(self, audio: np.ndarray) -> PamResult:
        windows = torch.from_numpy(pam_windows(audio))
        with torch.no_grad():
            emb = torch.cat([self.model.audio_embeddings(windows[i:i + self.chunk].to(self.device)).cpu()
                             for i in range(0, len(windows), self.chunk)])
        probabilities = pam_probabilities(emb.double().numpy(), self.prompts, self.scale)
        return PamResult(pam_score(probabilities), probabilities)
