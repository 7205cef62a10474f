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
from filters.aesthetics import AES_COLUMNS, AES_SAMPLE_RATE
from filters.curation import SCORE_COLUMNS as CURATION_COLUMNS
from filters.curation import (SPLIT_REASON, VAD_SAMPLE_RATE, CurationConfig, SpeechDetector, motion_scores,
                              scene_cut_times, silence_scores, split_parts)
from core.config import DecodeLimits, SignalConfig
from core.decode import DecodeError, DecodeRequest, DecodedClip, decode, probe, sub_clip
from core.device import wants_gpu
from core.keys import make_key
from core.resample import resample
from core.stage import FILTERED, OK, Resources, Row, Stage, is_pending, mark_failed

AUDIO_SOURCE = "audio"  # rows of an audio-only corpus (pipeline.manifest.audio_rows)
AUDIO_FOR_CLAP = "audio_clap"  # float32 [n] at SignalConfig.clap_sr, for ClapStage only
AUDIO_FOR_AES = "audio_aes"  # float32 [n] at 16 kHz (torchaudio's kernel, as the package), for AestheticsStage only
# what a split part copies from its window's row (the manifest's description of the video)
MANIFEST_FIELDS = ("source", "youtube_id", "video_path", "label", "caption", "split", "line")


@dataclass(frozen=True)
class CleanStageConfig:
    """Everything the clean stages need, picklable so every engine can ship it to workers."""

    signal: SignalConfig = field(default_factory=SignalConfig)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    av_align: AVAlignConfig = field(default_factory=AVAlignConfig)
    clap: object | None = None  # filters.clap.ClapConfig, or None when CLAP is skipped
    speech_music: object | None = None  # filters.speech_music.SpeechMusicConfig when enabled
    curation: CurationConfig = field(default_factory=CurationConfig)
    aesthetics: object | None = None  # filters.aesthetics.AestheticsConfig, or None when not scored
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
    """One decode pass per clip; AV-Align and the curation scores from the decoded frames and audio.

    With ``--split-at-cuts`` a window with hard cuts is replaced by its long-enough parts between
    the cuts: the window's row is kept (its scores recorded) as ``filtered`` / ``split_at_cuts``,
    and each part follows it as a row of its own (key derived from the window's, ``parent_key``
    set), scored from the arrays already decoded (``core.decode.sub_clip``), never a second decode.
    """

    name = "decode_av_align"
    reads = ("key", "video_path", "source", "start_s", "duration_s")
    writes = ("start_s", "duration_s", "video_fps", "parent_key", *LEDGER_FIELDS, *CURATION_COLUMNS, AUDIO_FOR_CLAP,
              AUDIO_FOR_AES)
    transient = (AUDIO_FOR_CLAP, AUDIO_FOR_AES)

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
                            audio_rates=tuple(sorted(set(rates))), need_video=False,
                            audio_native=self.config.aesthetics is not None)
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
        self._aesthetics_audio(row, clip)
        return audio

    def _aesthetics_audio(self, row: Row, clip: DecodedClip) -> None:
        if self.config.aesthetics is not None and clip.audio_native is not None:
            # the package resamples each channel with torchaudio, then averages: the same, in the other order
            row[AUDIO_FOR_AES] = resample(clip.audio_native.mean(axis=0), clip.native_sr, AES_SAMPLE_RATE, "torchaudio")

    def _decode(self, row: Row) -> DecodedClip | None:
        if not is_pending(row):
            return None
        try:
            start, duration = resolve_window(row, self.config.signal, self.config.limits)
            return decode(row["video_path"], self._request(start, duration), self.config.limits)
        except DecodeError as e:
            mark_failed(row, e.ledger_reason)
            return None

    def _record(self, row: Row, clip: DecodedClip) -> np.ndarray | None:
        """Score one decoded window into its row; returns its 16 kHz audio for the VAD (None: failed)."""
        try:
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
        self._aesthetics_audio(row, clip)
        return audio

    def _split(self, row: Row, clip: DecodedClip) -> list[tuple[Row, np.ndarray | None]]:
        """The parts of a scored window between its cuts, each scored; the window row is marked."""
        cfg = self.config.curation
        min_s = max(cfg.split_min_s, self.config.limits.min_duration_s)
        parts = split_parts(row["scene_cuts"], clip.duration_s, min_s)
        row.pop(AUDIO_FOR_CLAP, None)  # the window itself is replaced: only its parts go on to the models
        row.pop(AUDIO_FOR_AES, None)
        row.update(status=FILTERED, reason=f"{SPLIT_REASON}: {len(parts)} part(s) >= {min_s:g}s"
                   if parts else f"scene_cut: no part between the cuts is >= {min_s:g}s")
        out = []
        for t0, t1 in parts:
            child = {**{k: v for k, v in row.items() if k in MANIFEST_FIELDS}, "status": "", "reason": "",
                     "key": make_key(row["key"], f"at{int(round(t0 * 1000)):06d}ms"), "parent_key": row["key"]}
            out.append((child, self._record(child, sub_clip(clip, t0, t1))))
        return out

    def process_batch(self, rows: list[Row]) -> list[Row]:
        """Decode and score each row (and the parts of a split window), then run the VAD on the
        batch's audio (Silero's sequence model: one ONNX call per 16 s of audio,
        docs/benchmarks.md#clean)."""
        out: list[Row] = []
        voiced: list[tuple[Row, np.ndarray]] = []
        for row in rows:
            out.append(row)
            if row.get("source") == AUDIO_SOURCE:  # no picture: sound-only scores, never split at cuts
                audio = self._score_audio(row) if is_pending(row) else None
                voiced += [(row, audio)] if audio is not None else []
                continue
            clip = self._decode(row)
            if clip is None:
                continue
            scored = [(row, self._record(row, clip))]
            if self.config.curation.split_at_cuts and row.get("status") == OK and row["scene_cuts"]:
                scored += self._split(row, clip)
                out += [child for child, _ in scored[1:]]
            voiced += [(r, audio) for r, audio in scored if audio is not None]
        for (row, _), scores in zip(voiced, self.speech.scores_batch([a for _, a in voiced])):
            row.update(scores)
        return out

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


class AestheticsStage(Stage):
    """The audiobox-aesthetics axes (PQ, PC, CE, CU) of rows decoded upstream (``filters.aesthetics``)."""

    name = "aesthetics"
    uses_model = True
    reads = (AUDIO_FOR_AES,)
    writes = AES_COLUMNS

    def __init__(self, config: CleanStageConfig):
        from filters.aesthetics import AestheticsScorer

        self.config = config
        self.scorer = AestheticsScorer(config.aesthetics)
        self.resources = Resources(cpus=1.0, gpus=1.0 if wants_gpu(config.aesthetics.device) else 0.0,
                                   batch_size=config.batch_size)

    def setup(self) -> None:
        self.scorer.load()

    def process_batch(self, rows: list[Row]) -> list[Row]:
        todo = [(row, audio) for row in rows if (audio := row.pop(AUDIO_FOR_AES, None)) is not None]
        if todo:
            for (row, _), scores in zip(todo, self.scorer.scores_batch([a for _, a in todo])):
                row.update(scores)
        return rows


def build_clean_stages(config: CleanStageConfig) -> list[Stage]:
    """The stage chain every runner drives, in order."""
    stages: list[Stage] = [DecodeScoreStage(config)]
    if config.clap is not None:
        stages.append(ClapStage(config))
    if config.aesthetics is not None:
        stages.append(AestheticsStage(config))
    if config.desync is not None:
        from metrics.desync_stage import DesyncStage

        stages.append(DesyncStage(*config.desync))
    return stages
