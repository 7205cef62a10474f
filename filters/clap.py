"""CLAP audio-text agreement: cosine similarity of L2-normalised CLAP embeddings (transformers ``ClapModel``).

VTA-LDM keeps a pair when ``cosine(audio, text("the sound of {label}")) > 0.3`` with LAION-CLAP's
``630k-audioset-best`` checkpoint (``laion/clap-htsat-unfused`` on the Hugging Face hub).

LAION's input, step by step (``get_audio_embedding_from_data``), reproduced here:
1. every waveform is quantised through int16 (``int16_to_float32(float32_to_int16(x))``: clip to
   [-1, 1], times 32767, truncate toward zero, divide by 32767), ``laion_quantize``; skipping it
   moves near-silent mel bins by up to 12 dB;
2. truncation and padding are passed explicitly, never inherited from the checkpoint's
   preprocessor config: ``rand_trunc`` + ``repeatpad`` for unfused checkpoints (LAION's
   ``630k-audioset-best``), ``fusion`` + ``repeatpad`` for fused ones (``laion_modes``);
3. the mel is the checkpoint's own (transformers ``ClapFeatureExtractor``: HTSAT's Slaney mel
   for unfused, the HTK mel stacked four times for fused audio of at most 10 s).

Reproducibility: LAION crops audio longer than 10 s at a random offset, and transformers'
extractor marks one random clip of every fused batch as "longer". Neither happens here: audio
longer than the model's window (10 s at 48 kHz, read from the checkpoint's feature extractor)
is cut deterministically (``window="start"``: the first 10 s, i.e. exactly the clip's
``[start_s, start_s + 10)``; ``"center"``: the middle 10 s), so no clip ever reaches the random
crop; shorter audio is repeat-padded as LAION does; ``is_longer`` is always false (for a clip of
at most 10 s LAION's own value). A clip's score is therefore the same on every run, in every
batch and on every worker.

The score is the cosine of the normalised embeddings, never the model's logits (those are
multiplied by ``exp(logit_scale)``, about 14-100).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from core.device import DeviceUnavailable, resolve_device
from core.models import ModelUnavailable, ResolvedModel, looks_like_hub_id, resolve_pretrained
from core.registry import default_spec

CLAP_NONE = "none"
DEFAULT_CLAP_MODEL = default_spec("clap")
CLAP_SAMPLE_RATE = 48000


@dataclass(frozen=True)
class ClapConfig:
    """Which CLAP model scores clips and how (CLI prefix ``clap_``: ``--clap-model``, ...)."""

    model: str = field(default=DEFAULT_CLAP_MODEL, metadata={
        "help": "CLAP checkpoint: a Hugging Face id (HF cache and HF_HUB_OFFLINE honoured), a local folder "
                "saved with save_pretrained, or 'none' to skip the CLAP filter (scores recorded as missing)"})
    template: str = field(default="the sound of {label}", metadata={
        "help": "caption template for a label; must contain {label}"})
    batch_size: int = field(default=16, metadata={"help": "clips per CLAP forward pass"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:N"})
    window: Literal["start", "center"] = field(default="start", metadata={
        "help": "which 10 s of longer audio CLAP hears: start (the clip's own window) or center"})

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            raise ValueError("clap model must be a Hugging Face id, a local folder or 'none'")
        if "{label}" not in self.template:
            raise ValueError(f"clap template {self.template!r} must contain '{{label}}'")
        try:
            self.template.format(label="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"clap template {self.template!r} may only use the placeholder {{label}}: {e}") from e
        if self.batch_size < 1:
            raise ValueError(f"clap batch size must be >= 1, got {self.batch_size}")
        if self.window not in ("start", "center"):
            raise ValueError(f"clap window must be 'start' or 'center', got {self.window!r}")

    @property
    def enabled(self) -> bool:
        return self.model.strip().lower() != CLAP_NONE

    def caption(self, label: str) -> str:
        """The text CLAP compares the audio with: the template applied to ``label``."""
        return self.template.format(label=label)


class ClapModelUnavailable(ModelUnavailable):
    """The requested CLAP checkpoint cannot be loaded; the run must stop before decoding anything."""

    def __init__(self, spec: str, cause: str, how: bool = True):
        self.spec, self.cause = spec, cause
        RuntimeError.__init__(self, unavailable_message(spec, cause) if how else cause)


def unavailable_message(model: str, cause: str) -> str:
    hub_id = model if looks_like_hub_id(model) else DEFAULT_CLAP_MODEL
    return (
        f"CLAP model {model!r} could not be loaded: {cause}\n"
        "Provide it in one of these ways:\n"
        "  1. a local folder: --clap-model /path/to/folder, holding config.json, the weights "
        "(model.safetensors), the tokenizer files and preprocessor_config.json, as written by "
        "ClapModel.save_pretrained + ClapProcessor.save_pretrained;\n"
        f"  2. the Hugging Face cache: on a machine with network run `hf download {hub_id}` (older "
        f"huggingface_hub: `huggingface-cli download {hub_id}`), copy its HF_HOME folder (default "
        "~/.cache/huggingface) here and point HF_HOME at it; HF_HUB_OFFLINE=1 keeps the run off the network;\n"
        "  3. --clap-model none: run without the CLAP filter (clap_score is recorded as missing)."
    )


def laion_quantize(audio: np.ndarray) -> np.ndarray:
    """LAION-CLAP's ``int16_to_float32(float32_to_int16(x))``: clip, x 32767, truncate, / 32767."""
    x = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return ((x * np.float32(32767.0)).astype(np.int16) / 32767.0).astype(np.float32)


def laion_modes(enable_fusion: bool) -> tuple[str, str]:
    """(truncation, padding) as LAION's ``get_audio_embedding_from_data`` passes them."""
    return ("fusion" if enable_fusion else "rand_trunc"), "repeatpad"


def clap_window(audio: np.ndarray, n_samples: int, rule: str = "start") -> np.ndarray:
    """The deterministic ``n_samples`` window CLAP hears; shorter audio is returned whole."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size <= n_samples:
        return audio
    offset = 0 if rule == "start" else (audio.size - n_samples) // 2
    return audio[offset: offset + n_samples]


def _pooled(output: Any):
    """``get_*_features`` returns a tensor in transformers 4.x and a model output (pooler_output) in 5.x."""
    return output if hasattr(output, "dim") else output.pooler_output


def audio_problem(audio: np.ndarray) -> str:
    """Why CLAP cannot embed this audio (``""``: it can). The stage records it as a failure reason."""
    audio = np.asarray(audio)
    if audio.size == 0:
        return "empty audio"
    if not np.all(np.isfinite(audio)):
        return "non-finite audio samples"
    return ""


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows; a zero or non-finite row becomes NaN (a missing embedding, never a made-up one)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    bad = ~np.isfinite(norm) | (norm == 0)
    return np.where(bad, np.nan, x / np.where(bad, 1.0, norm)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [B, D] (or [D]) arrays of L2-normalised embeddings, clamped to [-1, 1]."""
    return np.clip(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=-1), -1.0, 1.0)


class ClapScorer:
    """One loaded CLAP model: audio and text embeddings, cosine scores. Load once per worker."""

    def __init__(self, config: ClapConfig):
        if not config.enabled:
            raise ValueError("ClapScorer needs a model; with --clap-model none the CLAP filter is skipped")
        self.config = config
        self.model = None
        self.feature_extractor = None
        self.tokenizer = None
        self.device = "cpu"
        self.resolved: ResolvedModel | None = None
        self.truncation, self.padding = laion_modes(False)
        self._text_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_components(cls, config: ClapConfig, model, feature_extractor, tokenizer,
                        device: str = "cpu") -> "ClapScorer":
        """Wrap an already-built model (benchmarks build the full architecture with random weights)."""
        scorer = cls(config)
        scorer._attach(model, feature_extractor, tokenizer, device)
        return scorer

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, device: str | None = None) -> "ClapScorer":
        """Load model and processor (idempotent). Raises ``ClapModelUnavailable`` with how to provide it.

        The checkpoint is found by the project's one resolver (``core.models``): a local folder, else
        the Hugging Face cache, else the hub when ``HF_HUB_OFFLINE`` is not set, with the hub
        client's own timeout.
        """
        if self.loaded:
            return self
        name = self.config.model
        target = _device(device or self.config.device)
        try:
            self.resolved = resolve_pretrained(name)
        except ModelUnavailable as e:
            raise ClapModelUnavailable(name, e.cause) from e
        folder = self.resolved.path
        try:
            processor, model, info = _from_pretrained(str(folder))
        except _LOAD_ERRORS as e:
            raise ClapModelUnavailable(name, f"the folder {folder} does not hold a complete CLAP checkpoint "
                                             f"({_short(e)})") from e
        # weights the checkpoint lacks would be random: such a model would make scores up
        params = {n for n, _ in model.named_parameters()} - {"logit_scale_a", "logit_scale_t"}
        missing = sorted(k for k in info.get("missing_keys", []) if k in params)
        if missing:
            raise ClapModelUnavailable(
                name, f"the checkpoint has no weights for {len(missing)} parameters (e.g. {missing[0]}); "
                      "it is not a complete CLAP checkpoint")
        self._attach(model, processor.feature_extractor, processor.tokenizer, target)
        return self

    def _attach(self, model, feature_extractor, tokenizer, device: str) -> None:
        rate = getattr(feature_extractor, "sampling_rate", None)
        if rate != CLAP_SAMPLE_RATE:
            raise ClapModelUnavailable(
                self.config.model, f"its feature extractor expects {rate} Hz audio, the pipeline feeds "
                                   f"{CLAP_SAMPLE_RATE} Hz (LAION CLAP)")
        self.device = device
        self.model = model.to(device).eval()
        self.truncation, self.padding = laion_modes(bool(getattr(model.config.audio_config, "enable_fusion", False)))
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self._text_cache.clear()

    def unload(self) -> None:
        self.model = self.feature_extractor = self.tokenizer = None
        self._text_cache.clear()

    @property
    def window_samples(self) -> int:
        return int(self.feature_extractor.nb_max_samples)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("ClapScorer.load() must be called (once per worker) before scoring")

    def input_features(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """The model input for audio windows of at most 10 s at 48 kHz: LAION's int16 round trip,
        then the checkpoint's mel with LAION's truncation and padding, passed explicitly."""
        self._require_loaded()
        # for fused checkpoints the extractor draws a "longer" clip from NumPy's global generator
        # (the scorer ignores it): keep that state as it was, so nothing else's randomness moves
        rng_state = np.random.get_state()
        try:
            # a list always takes the feature extractor's batched (float64) path: batch == one-by-one
            feats = self.feature_extractor([laion_quantize(w) for w in windows], sampling_rate=CLAP_SAMPLE_RATE,
                                           truncation=self.truncation, padding=self.padding, return_tensors="np")
        finally:
            np.random.set_state(rng_state)
        return feats["input_features"]

    def audio_embeddings(self, audios: Sequence[np.ndarray], sample_rate: int = CLAP_SAMPLE_RATE) -> np.ndarray:
        """L2-normalised embeddings [B, D] of mono float audio at 48 kHz, in batches of ``batch_size``.

        A clip that cannot be embedded (``audio_problem``: empty, non-finite samples) gets a row of
        NaN, never a number; its score is then NaN and the stage records why.
        """
        import torch

        self._require_loaded()
        if sample_rate != CLAP_SAMPLE_RATE:
            raise ValueError(f"CLAP audio must be {CLAP_SAMPLE_RATE} Hz, got {sample_rate} Hz")
        windows = [clap_window(a, self.window_samples, self.config.window) for a in audios]
        usable = [i for i, w in enumerate(windows) if not audio_problem(w)]
        out = np.full((len(windows), self.embedding_dim), np.nan, np.float32)
        bs = self.config.batch_size
        for lo in range(0, len(usable), bs):
            idx = usable[lo: lo + bs]
            feats = torch.from_numpy(self.input_features([windows[i] for i in idx]))
            # every window is at most 10 s: never "longer" (the extractor would flag a random one)
            is_longer = torch.zeros((len(idx), 1), dtype=torch.bool)
            with torch.inference_mode():
                emb = self.model.get_audio_features(input_features=feats.to(self.device, torch.float32),
                                                    is_longer=is_longer.to(self.device))
            out[idx] = _l2_normalise(_pooled(emb).float().cpu().numpy())
        return out

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings [N, D] of texts; each distinct text is computed once per worker."""
        import torch

        self._require_loaded()
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        bs = max(self.config.batch_size, 32)
        for lo in range(0, len(todo), bs):
            chunk = todo[lo: lo + bs]
            tok = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                emb = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device))
            for text, vec in zip(chunk, _l2_normalise(_pooled(emb).float().cpu().numpy())):
                self._text_cache[text] = vec
        if not texts:
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.stack([self._text_cache[t] for t in texts])

    def caption(self, label: str) -> str:
        return self.config.caption(label)

    def score(self, audio_embs: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity in [-1, 1] of each audio embedding with its own text (row i with text i)."""
        audio_embs = np.asarray(audio_embs)
        if len(texts) != len(audio_embs):
            raise ValueError(f"{len(audio_embs)} audio embeddings but {len(texts)} texts")
        return cosine(audio_embs, self.text_embeddings(texts))

    def score_labels(self, audio_embs: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """``score`` against the caption template applied to each label."""
        return self.score(audio_embs, [self.caption(label) for label in labels])

    def metadata(self) -> dict[str, Any]:
        """What a run must record to be reproducible (goes into the ledger's run metadata)."""
        meta = run_metadata(self.config)
        if self.loaded:
            cfg = self.model.config
            meta.update({
                "clap_device": self.device,
                "clap_window_samples": self.window_samples,
                "clap_sample_rate": CLAP_SAMPLE_RATE,
                "clap_projection_dim": self.embedding_dim,
                "clap_enable_fusion": bool(getattr(cfg.audio_config, "enable_fusion", False)),
                "clap_truncation": self.truncation,
                "clap_padding": self.padding,
                "clap_checkpoint_truncation": getattr(self.feature_extractor, "truncation", None),
                "clap_checkpoint_padding": getattr(self.feature_extractor, "padding", None),
                "clap_commit": getattr(cfg, "_commit_hash", None),
            })
        return meta


def run_metadata(config: ClapConfig) -> dict[str, Any]:
    """CLAP settings for ``run.json``; says plainly when CLAP was skipped."""
    meta = {f"clap_{k}": v for k, v in asdict(config).items()}
    meta["clap_skipped"] = not config.enabled
    if config.enabled:
        meta["clap_quantize"] = "int16 round trip (LAION float32_to_int16 / int16_to_float32)"
        meta["clap_is_longer"] = False
    meta["clap_score"] = ("cosine of L2-normalised CLAP audio and text embeddings"
                          if config.enabled else "skipped (--clap-model none): clap_score is missing for every row")
    return meta


def check_available(config: ClapConfig) -> dict[str, Any] | None:
    """Start-up check, before any decoding: load the model once (on CPU) or raise ``ClapModelUnavailable``.

    Returns the loaded model's ``metadata()`` (truncation, padding, fusion: for ``run.json``);
    ``--clap-model none`` returns None at once without loading anything.
    """
    if not config.enabled:
        return None
    if config.device != "auto":
        _device(config.device)
    scorer = ClapScorer(config).load(device="cpu")
    meta = scorer.metadata()
    meta.pop("clap_device", None)  # where the start-up check ran, not where workers score
    scorer.unload()
    return meta


def _device(preference: str) -> str:
    """``core.device.resolve_device``, its error reported as the CLAP model being unavailable."""
    try:
        return resolve_device(preference, "--clap-device")
    except DeviceUnavailable as e:
        raise ClapModelUnavailable(preference, str(e), how=False) from e


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)


_LOAD_ERRORS = _load_errors()


def _from_pretrained(folder: str):
    from transformers import ClapModel, ClapProcessor

    processor = ClapProcessor.from_pretrained(folder, local_files_only=True)
    model, info = ClapModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    return processor, model, info


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:400] + "..."
