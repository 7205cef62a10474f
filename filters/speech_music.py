"""Zero-shot speech/music detection with the CLAP audio embedding the CLAP filter already computed.

No second model: the clip's audio embedding is compared (cosine) with three prompt sets, and a
set's score is its best-matching prompt:

- ``speech_score``: best cosine over the speech prompts ("a person talking", ...);
- ``music_score``: best cosine over the music prompts ("music", "a song", ...);
- ``event_score``: cosine with the clip's own label caption when the clip has a label (VGGSound),
  otherwise the best cosine over a general sound-event prompt set (YouTube corpora have no labels).

The rule (``verdict``), applied to stored scores so it can be re-run without
rescoring: let ``top`` be the larger of speech and music (speech wins a tie). The clip is dropped
as ``top`` when

    top_score > event_score + margin   and   top_score >= min_score

``margin`` > 0 drops only clips where talking/music clearly beats the sound event; < 0 is stricter.
``min_score`` keeps a clip whose best speech/music match is too weak to mean anything (silence,
noise). On by default for ``--dataset youtube``, off by default (scores still recorded) otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

import numpy as np

from core.cli_config import check_finite
from filters.clap import ClapScorer, cosine

SPEECH = "speech"
MUSIC = "music"

SPEECH_PROMPTS = (
    "a person talking",
    "a man speaking",
    "a woman speaking",
    "people talking",
    "a person giving a speech",
    "a narrator speaking",
)
MUSIC_PROMPTS = (
    "music",
    "a song",
    "musical instruments playing",
    "a person singing",
    "background music",
)
EVENT_PROMPTS = (
    "a sound effect",
    "the sound of an object",
    "an animal making a sound",
    "a vehicle passing by",
    "a machine running",
    "something hitting a surface",
    "footsteps",
    "water splashing",
    "wind blowing",
    "tools being used",
    "a door closing",
    "an explosion",
)

DATASETS_ON_BY_DEFAULT = ("youtube",)


@dataclass(frozen=True)
class SpeechMusicConfig:
    """Prompt sets and the drop rule of the speech/music filter (flags ``--speech-music`` etc.)."""

    speech_music: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "speech/music filter: auto (on for youtube, off otherwise; scores are recorded either way), on, off"})
    speech_prompts: tuple[str, ...] = field(default=SPEECH_PROMPTS, metadata={"help": "speech prompt set"})
    music_prompts: tuple[str, ...] = field(default=MUSIC_PROMPTS, metadata={"help": "music prompt set"})
    event_prompts: tuple[str, ...] = field(default=EVENT_PROMPTS, metadata={
        "help": "general sound-event prompt set, the event score of clips without a label"})
    speech_music_margin: float = field(default=0.0, metadata={
        "help": "drop when max(speech, music) score > event score + this margin"})
    speech_music_min: float = field(default=0.2, metadata={
        "help": "never drop a clip whose best speech/music cosine is below this"})

    def __post_init__(self) -> None:
        if self.speech_music not in ("auto", "on", "off"):
            raise ValueError(f"speech_music must be auto, on or off, got {self.speech_music!r}")
        for name in ("speech_prompts", "music_prompts", "event_prompts"):
            prompts = getattr(self, name)
            if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"{name} must be a non-empty tuple of non-empty strings, got {prompts!r}")
        check_finite("speech_music_margin", self.speech_music_margin, lo=-2.0, hi=2.0)
        check_finite("speech_music_min", self.speech_music_min, lo=-1.0, hi=1.0)

    def enabled_for(self, dataset: str) -> bool:
        """Whether the rule drops clips for this dataset (``auto``: only web corpora without labels)."""
        if self.speech_music == "auto":
            return dataset in DATASETS_ON_BY_DEFAULT
        return self.speech_music == "on"


class PromptSets(NamedTuple):
    """L2-normalised text embeddings of each prompt set, [N, D] each."""

    speech: np.ndarray
    music: np.ndarray
    event: np.ndarray


class SpeechMusicDecision(NamedTuple):
    """One clip's scores (ledger columns speech_score, music_score, event_score) and the rule's verdict."""

    speech: float
    music: float
    event: float
    verdict: str  # "" (keep), "speech" or "music"


def embed_prompts(scorer: ClapScorer, config: SpeechMusicConfig) -> PromptSets:
    """Text embeddings of the three prompt sets (cached by the scorer: computed once per worker)."""
    return PromptSets(
        speech=scorer.text_embeddings(list(config.speech_prompts)),
        music=scorer.text_embeddings(list(config.music_prompts)),
        event=scorer.text_embeddings(list(config.event_prompts)),
    )


def verdicts(speech, music, event, config: SpeechMusicConfig, kinds: tuple[str, ...] = (SPEECH, MUSIC)) -> np.ndarray:
    """The drop rule on arrays of stored scores: ``"speech"``, ``"music"`` or ``""`` (keep) per clip.

    ``kinds`` are the verdicts the rule may return: the clean pipeline passes ``(MUSIC,)``, since
    speech is decided by the VAD (``filters.curation``) and the CLAP speech score is only recorded.
    A missing score (None or NaN: CLAP skipped or the row failed) never drops a clip. A tie between
    speech and music goes to speech.
    """
    s, m, e = (np.asarray(x, dtype=np.float64) for x in (speech, music, event))
    if SPEECH in kinds and MUSIC in kinds:
        top, kind, finite = np.maximum(s, m), np.where(s >= m, SPEECH, MUSIC), np.isfinite(s) & np.isfinite(m)
    else:
        top = s if SPEECH in kinds else m
        kind, finite = np.full(top.shape, SPEECH if SPEECH in kinds else MUSIC), np.isfinite(top)
    drop = finite & np.isfinite(e) & (top > e + config.speech_music_margin) & (top >= config.speech_music_min)
    return np.where(drop, kind, "").astype(object)


def verdict(speech_score: float | None, music_score: float | None, event_score: float | None,
            config: SpeechMusicConfig, kinds: tuple[str, ...] = (SPEECH, MUSIC)) -> str:
    """:func:`verdicts` for one clip. See the module doc."""
    return str(verdicts([speech_score], [music_score], [event_score], config, kinds)[0])


def _best(audio_emb: np.ndarray, prompts: np.ndarray) -> float:
    return float(np.max(cosine(np.asarray(audio_emb)[None, :], np.asarray(prompts))))


def decide(audio_emb: np.ndarray, prompts: PromptSets, config: SpeechMusicConfig,
           label_emb: np.ndarray | None = None) -> SpeechMusicDecision:
    """Scores and verdict for one clip from its CLAP audio embedding.

    ``label_emb`` is the text embedding of the clip's caption (its label through the CLAP
    template); without one, the event score comes from the general sound-event prompt set.
    """
    speech = _best(audio_emb, prompts.speech)
    music = _best(audio_emb, prompts.music)
    if label_emb is not None:
        event = float(cosine(audio_emb, label_emb))
    else:
        event = _best(audio_emb, prompts.event)
    return SpeechMusicDecision(speech, music, event, verdict(speech, music, event, config))


def decide_batch(audio_embs: np.ndarray, prompts: PromptSets, config: SpeechMusicConfig,
                 label_embs: Sequence[np.ndarray | None] | None = None) -> list[SpeechMusicDecision]:
    """``decide`` for every row of ``audio_embs``; ``label_embs[i]`` may be None (no label)."""
    if label_embs is not None and len(label_embs) != len(audio_embs):
        raise ValueError(f"{len(audio_embs)} audio embeddings but {len(label_embs)} label embeddings")
    return [decide(a, prompts, config, None if label_embs is None else label_embs[i])
            for i, a in enumerate(audio_embs)]


def score_speech_music(scorer: ClapScorer, audio_embs: np.ndarray, config: SpeechMusicConfig,
                       label_texts: Sequence[str | None] | None = None) -> list[SpeechMusicDecision]:
    """The clean stage's entry point: decisions for a batch of CLAP audio embeddings.

    ``label_texts[i]`` is the CLAP text of row i's label (``scorer.caption(label)``), or None/""
    for a row without a label, whose event score then comes from the general event prompts.
    """
    prompts = embed_prompts(scorer, config)
    label_embs = None
    if label_texts is not None:
        if len(label_texts) != len(audio_embs):
            raise ValueError(f"{len(audio_embs)} audio embeddings but {len(label_texts)} label texts")
        texts = [t for t in label_texts if t]
        table = dict(zip(texts, scorer.text_embeddings(texts))) if texts else {}
        label_embs = [table[t] if t else None for t in label_texts]
    return decide_batch(audio_embs, prompts, config, label_embs)
