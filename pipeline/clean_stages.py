"""The stages of ``pipeline.clean``: decode + AV-Align (CPU), then CLAP (model), then optionally
DeSync (Synchformer, ``metrics.desync_stage``), engine-neutral.

``DecodeScoreStage`` decodes each clip once and computes AV-Align from it; when CLAP is on it
also hands the 48 kHz audio to ``ClapStage`` in the transient ``audio_clap`` field (declared,
and dropped before the ledger). Both stages only record scores: keep/drop decisions are made later from the stored
scores (``filters.rules``), so thresholds can change without rescoring.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from filters.av_align import LEDGER_FIELDS, AVAlignConfig, decode_request_for, score_decoded, warm_up
from filters.curation import SCORE_COLUMNS as CURATION_COLUMNS
from filters.curation import (VAD_SAMPLE_RATE, CurationConfig, SpeechDetector, motion_scores, scene_cut_times,
                              silence_scores)
from core.config import DecodeLimits, SignalConfig
from core.decode import DecodeError, DecodeRequest, decode, probe
from core.device import wants_gpu
from core.stage import OK, Resources, Row, Stage, is_pending, mark_failed

AUDIO_FOR_CLAP = "audio_clap"  # float32 [n] at SignalConfig.clap_sr, for ClapStage only
AUDIO_SOURCE = "audio"  # rows of an audio-only corpus (pipeline.manifest.audio_rows)


@dataclass(frozen=True)
class CleanStageConfig:
    """Everything the clean stages need, picklable so every engine can ship it to workers."""

    signal: SignalConfig = field(default_factory=SignalConfig)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    av_align: AVAlignConfig = field(default_factory=AVAlignConfig)
    clap: object | None = None  # filters.clap.ClapConfig, or None when CLAP is skipped
    speech_music: object | None = None  # filters.speech_music.SpeechMusicConfig when enabled
    curation: CurationConfig = field(default_factory=CurationConfig)
    batch_size: int = 8
    # (metrics.desync_stage.DesyncConfig, resolved weights path), or None when DeSync is not scored
    desync: tuple | None = None


def resolve_window(row: Row, signal: SignalConfig, limits: DecodeLimits) -> tuple[float, float | None]:
    """The part of the file to use: a trimmed clip whole, an untrimmed one cut to its window."""
    start = float(row.get("start_s") or 0.0)
    duration = row.get("duration_s")
    if row.get("source") != "vggsound":
        return start, duration
    facts = probe(row["video_path"])
    if facts.duration_s <= signal.window_s + limits.trimmed_slack_s:
        return 0.0, None
    if start >= facts.duration_s:
        raise DecodeError("too_short", f"window starts at {start:.0f}s but the file is {facts.duration_s:.2f}s long")
    return start, signal.window_s


class DecodeScoreStage(Stage):
    """One decode pass per clip; AV-Align from the decoded frames and audio."""

    name = "decode_av_align"
    reads = ("video_path", "source", "start_s", "duration_s")
    writes = ("start_s", "duration_s", "video_fps", *LEDGER_FIELDS, *CURATION_COLUMNS, AUDIO_FOR_CLAP)
    transient = (AUDIO_FOR_CLAP,)

    def __init__(self, config: CleanStageConfig):
        self.config = config
        self.resources = Resources(cpus=1.0, gpus=0.0, batch_size=config.batch_size)
        self.speech = SpeechDetector(config.curation)

    def setup(self) -> None:
        warm_up()  # librosa's one-off start-up, so it is not charged to the first clip
        self.speech.load()

    def _request(self, start: float, duration: float | None) -> DecodeRequest:
        req = decode_request_for(self.config.av_align, self.config.signal)
        rates = set(req.audio_rates) | {VAD_SAMPLE_RATE}
        if self.config.clap is not None:
            rates.add(self.config.signal.clap_sr)
        return replace(req, start_s=start, duration_s=duration, audio_rates=tuple(sorted(rates)))

    def _score_audio(self, row: Row) -> np.ndarray | None:
        """An audio-only corpus window: decode the sound only; AV-Align, motion and cuts stay missing."""
        rates = (VAD_SAMPLE_RATE,) + ((self.config.signal.clap_sr,) if self.config.clap is not None else ())
        req = DecodeRequest(start_s=float(row.get("start_s") or 0.0), duration_s=row.get("duration_s"),
                            audio_rates=tuple(sorted(set(rates))), need_video=False)
        try:
            clip = decode(row["video_path"], req, self.config.limits)
        except DecodeError as e:
            mark_failed(row, e.ledger_reason)
            return None
        audio = clip.audio[VAD_SAMPLE_RATE]
        row.update(start_s=clip.start_s, duration_s=clip.duration_s, status=OK, reason="",
                   **silence_scores(audio, VAD_SAMPLE_RATE, self.config.curation.silent_frame_db))
        if self.config.clap is not None:
            row[AUDIO_FOR_CLAP] = clip.audio[self.config.signal.clap_sr]
        return audio

    def _score(self, row: Row) -> np.ndarray | None:
        """Decode and score one row in place; returns its 16 kHz audio for the VAD (None: failed)."""
        if not is_pending(row):
            return None
        if row.get("source") == AUDIO_SOURCE:
            return self._score_audio(row)
        try:
            start, duration = resolve_window(row, self.config.signal, self.config.limits)
            clip = decode(row["video_path"], self._request(start, duration), self.config.limits)
            result = score_decoded(clip, self.config.av_align)
        except DecodeError as e:
            mark_failed(row, e.ledger_reason)
            return None
        audio = clip.audio[VAD_SAMPLE_RATE]
        row.update(start_s=clip.start_s, duration_s=clip.duration_s, video_fps=clip.video_fps,
                   **result.ledger_fields(), status=OK, reason="",
                   scene_cuts=scene_cut_times(clip.gray, clip.gray_times, clip.video_fps, self.config.curation),
                   **silence_scores(audio, VAD_SAMPLE_RATE, self.config.curation.silent_frame_db),
                   **motion_scores(result.motion))
        if self.config.clap is not None:
            row[AUDIO_FOR_CLAP] = clip.audio[self.config.signal.clap_sr]
        return audio

    def process_batch(self, rows: list[Row]) -> list[Row]:
        """Decode and score each row, then run the VAD on the batch's audio (Silero's sequence
        model: one ONNX call per 16 s of audio, docs/benchmarks.md#clean)."""
        voiced = [(row, audio) for row in rows if (audio := self._score(row)) is not None]
        for (row, _), scores in zip(voiced, self.speech.scores_batch([a for _, a in voiced])):
            row.update(scores)
        return rows

    def process_row(self, row: Row) -> Row:
        return self.process_batch([row])[0]


class ClapStage(Stage):
    """CLAP audio-text score (and speech/music/event scores) for rows decoded upstream.

    Labelled rows are compared with the template applied to their label; unlabelled web videos
    with their caption (yt-dlp title/tags), audio-corpus windows with their caption as the prompt.
    A row with neither keeps ``clap_score`` missing.
    """

    name = "clap"
    uses_model = True
    reads = (AUDIO_FOR_CLAP, "label", "caption")
    writes = ("clap_score", "speech_score", "music_score", "event_score")

    def __init__(self, config: CleanStageConfig):
        from filters.clap import ClapScorer

        self.config = config
        self.scorer = ClapScorer(config.clap)
        self.resources = Resources(cpus=1.0, gpus=1.0 if wants_gpu(config.clap.device) else 0.0, batch_size=config.batch_size)

    def setup(self) -> None:
        self.scorer.load()

    def teardown(self) -> None:
        self.scorer.unload()

    def _text(self, row: Row) -> str:
        return self.scorer.caption(row["label"]) if row.get("label") else (row.get("caption") or "")

    def process_batch(self, rows: list[Row]) -> list[Row]:
        from filters.clap import audio_problem

        todo = []
        for row in rows:
            audio = row.pop(AUDIO_FOR_CLAP, None)
            if audio is None:
                continue
            problem = audio_problem(audio)
            if problem:
                mark_failed(row, f"clap_error: {problem}")
            else:
                todo.append((row, np.asarray(audio, dtype=np.float32)))
        if not todo:
            return rows
        emb = self.scorer.audio_embeddings([a for _, a in todo])
        texts = [self._text(r) for r, _ in todo]
        scored = [i for i, t in enumerate(texts) if t]
        if scored:
            scores = self.scorer.score(emb[scored], [texts[i] for i in scored])
            for i, score in zip(scored, scores):
                todo[i][0]["clap_score"] = float(score)
        if self.config.speech_music is not None:
            from filters.speech_music import score_speech_music

            labels = [self.scorer.caption(r["label"]) if r.get("label") else None for r, _ in todo]
            for (row, _), d in zip(todo, score_speech_music(self.scorer, emb, self.config.speech_music, labels)):
                row.update(speech_score=d.speech, music_score=d.music, event_score=d.event)
        return rows


def build_clean_stages(config: CleanStageConfig) -> list[Stage]:
    """The stage chain every runner drives, in order."""
    stages: list[Stage] = [DecodeScoreStage(config)]
    if config.clap is not None:
        stages.append(ClapStage(config))
    if config.desync is not None:
        from metrics.desync_stage import DesyncStage

        stages.append(DesyncStage(*config.desync))
    return stages
