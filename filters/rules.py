"""Keep/drop decisions from stored scores: "score once, filter many".

Scores are computed once and journaled; these rules turn them into ``status``/``reason`` every
time the ledger is finalized, so changing a threshold never needs a rescore. A missing score
(``NaN``: model skipped or row failed) never filters anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from core.stage import FILTERED, OK
from filters.curation import CurationFilters, curation_reasons


@dataclass(frozen=True)
class FilterConfig:
    """Keep/drop thresholds, applied to stored scores ("score once, filter many")."""

    av_align_min: float = field(default=0.2, metadata={"help": "keep when AV-Align > this"})
    clap_min: float = field(default=0.3, metadata={"help": "keep when CLAP cosine > this"})



def threshold_reasons(row: dict, filters: FilterConfig, speech_music=None) -> list[str]:
    """Why a scored row is dropped (empty list: kept). Thresholds are strict: keep when score > min.

    The CLAP threshold applies to labelled rows only: an unlabelled web video's score against its
    title is recorded, but a title rarely describes the sound, so it does not decide.
    """
    reasons = []
    clap = row.get("clap_score")
    if row.get("label") and clap is not None and not math.isnan(clap) and clap <= filters.clap_min:
        reasons.append(f"clap<{filters.clap_min:g}")
    av = row.get("av_align")
    if av is not None and not math.isnan(av) and av <= filters.av_align_min:
        reasons.append(f"av_align<{filters.av_align_min:g}")
    if speech_music is not None:
        from filters.speech_music import MUSIC, verdict

        v = verdict(row.get("speech_score"), row.get("music_score"), row.get("event_score"), speech_music,
                    kinds=(MUSIC,))
        if v:
            reasons.append(v)
    return reasons


def apply_filters(journal: pd.DataFrame, filters: FilterConfig, speech_music=None,
                  curation: CurationFilters | None = None, dataset: str = "") -> pd.DataFrame:
    """Final status for every journaled row: failures and pre-decided rows stay as they are.

    ``curation`` adds the speech (VAD), silent, static and scene-cut rules (``filters.curation``).
    """
    df = journal.copy()
    scored = df["status"] == OK
    extra = curation_reasons(df[scored], curation, dataset) if curation is not None else None
    for idx in df.index[scored]:
        reasons = threshold_reasons(df.loc[idx].to_dict(), filters, speech_music)
        if extra is not None and extra.at[idx]:
            reasons += extra.at[idx].split(",")
        if reasons:
            df.at[idx, "status"] = FILTERED
            df.at[idx, "reason"] = ",".join(reasons)
    return df
