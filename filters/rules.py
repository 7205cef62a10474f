"""Keep/drop decisions from stored scores: "score once, filter many".

Scores are computed once and journaled; these rules turn them into ``status``/``reason`` every
time the ledger is finalized, so changing a threshold never needs a rescore. A missing score
(``NaN``: model skipped or row failed) never filters anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.cli_config import check_finite
from core.stage import FILTERED, OK
from filters.curation import CurationFilters, curation_reasons


@dataclass(frozen=True)
class FilterConfig:
    """Keep/drop thresholds, applied to stored scores ("score once, filter many")."""

    av_align_min: float = field(default=0.2, metadata={"help": "keep when AV-Align > this (within [-1, 1]; "
                                                                 "below 0 keeps every score)"})
    clap_min: float = field(default=0.3, metadata={"help": "keep when CLAP cosine > this (within [-1, 1])"})
    desync_max: float | None = field(default=None, metadata={
        "help": "keep when DeSync (Synchformer's mean |offset|, s) <= this; scores DeSync (needs its weights). "
                "Off by default"})

    def __post_init__(self) -> None:
        if self.desync_max is not None:
            check_finite("desync_max", self.desync_max, lo=0.0)
        # a NaN threshold would silently keep everything (every comparison with NaN is False)
        check_finite("av_align_min", self.av_align_min, lo=-1.0, hi=1.0)
        check_finite("clap_min", self.clap_min, lo=-1.0, hi=1.0)


def threshold_reasons(df: pd.DataFrame, filters: FilterConfig, speech_music=None) -> pd.Series:
    """Why each scored row is dropped, comma-joined ("" keeps it). Thresholds are strict: keep when
    score > min. Vectorised: 200k rows take well under a second.

    The CLAP threshold applies to labelled rows and to audio-corpus captions (written to describe
    the sound): an unlabelled web video's score against its title is recorded, but a title rarely
    describes the sound, so it does not decide. A missing score (NaN) never filters.
    """
    clap = pd.to_numeric(df["clap_score"], errors="coerce")
    av = pd.to_numeric(df["av_align"], errors="coerce")
    audio = df["source"].fillna("").astype(str) == "audio" if "source" in df else False
    labelled = (df["label"].fillna("").astype(str) != "") | audio
    parts = [np.where(labelled & (clap <= filters.clap_min), f"clap<{filters.clap_min:g}", ""),
             np.where(av <= filters.av_align_min, f"av_align<{filters.av_align_min:g}", "")]
    if filters.desync_max is not None and "desync" in df:
        desync = pd.to_numeric(df["desync"], errors="coerce")
        parts.append(np.where(desync > filters.desync_max, f"desync>{filters.desync_max:g}", ""))
    if speech_music is not None:
        from filters.speech_music import MUSIC, verdicts

        parts.append(verdicts(df["speech_score"], df["music_score"], df["event_score"], speech_music,
                              kinds=(MUSIC,)))
    return join_reasons(parts, df.index)


def join_reasons(parts: list, index: pd.Index) -> pd.Series:
    """Comma-join per-row reason arrays ("" where a rule keeps the row), without a Python loop."""
    joined = np.asarray(parts[0], dtype=object)
    for part in parts[1:]:
        part = np.asarray(part, dtype=object)
        joined = np.where(joined == "", part, np.where(part == "", joined, joined + "," + part))
    return pd.Series(joined, index=index, dtype=object)


def apply_filters(journal: pd.DataFrame, filters: FilterConfig, speech_music=None,
                  curation: CurationFilters | None = None, dataset: str = "") -> pd.DataFrame:
    """Final status for every journaled row: failures and pre-decided rows stay as they are.

    ``curation`` adds the speech (VAD), silent, static and scene-cut rules (``filters.curation``).
    """
    df = journal.copy()
    scored = df["status"] == OK
    reasons = threshold_reasons(df[scored], filters, speech_music)
    if curation is not None:
        reasons = join_reasons([reasons, curation_reasons(df[scored], curation, dataset).reindex(reasons.index)
                                .fillna("")], reasons.index)
    dropped = reasons[reasons != ""]
    df.loc[dropped.index, "status"] = FILTERED
    df.loc[dropped.index, "reason"] = dropped
    return df
