"""The clean run's gallery: watch what each filter kept and dropped, without writing code.

``OUT/gallery/index.html`` is a self-contained folder (it opens from disk): for every status and
reason, and for the clips just above and just below each threshold, a row with a small preview
(H.264 + AAC, the clip's own sound, in sync), the label, every score, and for AV-Align a plot of
the audio onsets and the video motion with its peaks over time. Runbook: docs/curation.md.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from core.atomic import atomic_write, atomic_write_text
from core.config import DecodeLimits
from core.decode import DecodeError, DecodeRequest, decode
from core.keys import is_safe
from core.mux import AudioTrack, VideoTrack, mux
from core.stage import FAILED, FILTERED, OK
from filters.av_align import AVAlignConfig, decode_request_for, score_decoded

PREVIEW_FPS = 10
PREVIEW_WIDTH = 320
SCORE_COLUMNS = ("av_align", "audio_peaks", "video_peaks", "clap_score", "speech_share", "speech_run_s",
                 "peak_db", "rms_db", "silent_share", "motion_max", "speech_score", "music_score", "event_score")
_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#1b1f24}
h2{border-bottom:1px solid #d0d7de;margin-top:1.6em} .row{display:flex;gap:1em;align-items:flex-start;
border-bottom:1px solid #eee;padding:.6em 0} .row video{width:320px;background:#000} .row img{width:420px}
table{border-collapse:collapse;font-size:.85em} td{border:1px solid #d0d7de;padding:.1em .4em}
.muted{color:#57606a} .reason{font-weight:600}"""


@dataclass(frozen=True)
class Bucket:
    title: str
    keys: tuple[str, ...]


def _pick(df: pd.DataFrame, n: int) -> tuple[str, ...]:
    """``n`` rows spread over the bucket (deterministic: key order), not just its first rows."""
    keys = sorted(df["key"])
    if len(keys) <= n:
        return tuple(keys)
    idx = np.linspace(0, len(keys) - 1, n).round().astype(int)
    return tuple(keys[i] for i in idx)


def buckets(ledger: pd.DataFrame, thresholds: dict[str, float], n: int) -> list[Bucket]:
    """One bucket per (status, reason), then the clips nearest each threshold on either side.

    A clip dropped for several reasons (``av_align<0.2,silent``) shows under each of them.
    """
    out = []
    def tokens(status: str, reason: str) -> list[str]:  # filters join their reasons with commas
        parts = reason.split(",") if status == FILTERED else [reason]
        return sorted({p.split(":")[0] for p in parts} - {""})

    reasons = pd.Series([tokens(s, r) for s, r in zip(ledger["status"], ledger["reason"].fillna(""))],
                        index=ledger.index)
    for status in (OK, FILTERED, FAILED):
        at = ledger["status"] == status
        for why in sorted({w for ws in reasons[at] for w in ws} | ({""} if (reasons[at].map(len) == 0).any() else set())):
            hit = reasons[at].map(lambda ws, why=why: why in ws if why else not ws)
            out.append(Bucket(f"{status}" + (f": {why}" if why else ""), _pick(ledger[at][hit], n)))
    scored = ledger[ledger["status"].isin([OK, FILTERED])]
    for column, thr in thresholds.items():
        if column not in scored:
            continue
        values = pd.to_numeric(scored[column], errors="coerce")
        for title, mask, distance in ((f"just above {column} = {thr:g}", values > thr, values - thr),
                                      (f"just below {column} = {thr:g}", values <= thr, thr - values)):
            near = scored[mask].assign(_d=distance[mask]).sort_values(["_d", "key"]).head(n)
            out.append(Bucket(title, tuple(near["key"])))
    return [b for b in out if b.keys]


def _preview_frames(rgb: np.ndarray, times: np.ndarray, size: tuple[int, int]):
    for image, t in zip(rgb, times):
        yield cv2.resize(image, size, interpolation=cv2.INTER_AREA), Fraction(float(t)).limit_denominator(90000)


def write_preview(row: pd.Series, path: Path, av_align: AVAlignConfig, limits: DecodeLimits):
    """A small H.264 + AAC mp4 of the clip's window with its own sound; returns the AV-Align result."""
    req = decode_request_for(av_align)
    start, duration = float(row.get("start_s") or 0.0), row.get("duration_s")
    duration = float(duration) if duration is not None and math.isfinite(float(duration)) else None
    clip = decode(str(row["video_path"]), DecodeRequest(
        start_s=start, duration_s=duration, audio_rates=(44100,), rgb_fps=PREVIEW_FPS, gray=True,
        gray_max_side=req.gray_max_side, audio_native=True), limits)
    result = score_decoded(clip, av_align)
    h, w = clip.rgb.shape[1:3]
    scale = PREVIEW_WIDTH / w
    size = (PREVIEW_WIDTH, max(2, int(round(h * scale / 2)) * 2))
    video = VideoTrack(frames=_preview_frames(clip.rgb, clip.rgb_times, size), size=size,
                       rate=Fraction(PREVIEW_FPS), options={"crf": "30", "preset": "veryfast"})
    audio = AudioTrack(pcm=clip.audio[44100][None, :], sample_rate=44100, codec="aac")
    mux(path, video, audio, container_format="mp4", options={"movflags": "+faststart"})
    return result


def write_plot(result, duration_s: float, path: Path) -> None:
    """Audio onsets (vertical lines) over the video motion trajectory with its peaks (dots)."""
    fig = Figure(figsize=(6.0, 1.9), dpi=80)
    ax = fig.add_subplot()
    t = np.arange(len(result.motion)) / result.fps if result.fps else np.zeros(0)
    ax.plot(t, result.motion, color="#57606a", lw=1, label="video motion (px/frame)")
    peaks = np.round(np.asarray(result.video_peak_times) * result.fps).astype(int)
    peaks = peaks[(peaks >= 0) & (peaks < len(result.motion))]
    ax.plot(t[peaks], np.asarray(result.motion)[peaks], "o", color="#cf222e", ms=3, label="motion peaks")
    for i, a in enumerate(result.audio_peak_times):
        ax.axvline(a, color="#0969da", lw=0.8, alpha=0.7, label="audio onsets" if i == 0 else None)
    ax.set_xlim(0, max(duration_s, 0.1))
    ax.set_xlabel("seconds")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _scores_table(row: pd.Series) -> str:
    cells = []
    for c in SCORE_COLUMNS:
        v = row.get(c)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        cells.append(f"<tr><td>{c}</td><td>{v:.4g}</td></tr>" if isinstance(v, (float, np.floating))
                     else f"<tr><td>{c}</td><td>{html.escape(str(v))}</td></tr>")
    cuts = row.get("scene_cuts")
    if cuts is not None and len(cuts):
        cells.append(f"<tr><td>scene_cuts</td><td>{', '.join(f'{c:.2f}' for c in cuts)}</td></tr>")
    return f"<table>{''.join(cells)}</table>"


def _row_html(row: pd.Series, media: str | None, plot: str | None, note: str) -> str:
    e = html.escape
    player = (f"<video controls preload='metadata'><source src='{e(media)}' type='video/mp4'></video>"
              if media else f"<div class='muted' style='width:320px'>no preview: {e(note)}</div>")
    picture = f"<img src='{e(plot)}' alt='AV-Align onsets and motion of {e(row['key'])}'>" if plot else ""
    return (f"<div class='row'>{player}<div><b>{e(row['key'])}</b><br>{e(str(row.get('label') or ''))}"
            f"<br><span class='reason'>{e(row['status'])} {e(str(row.get('reason') or ''))}</span>"
            f"{_scores_table(row)}</div>{picture}</div>")


def write_gallery(ledger: pd.DataFrame, meta: dict, out_dir: str | Path, per_bucket: int,
                  av_align: AVAlignConfig, thresholds: dict[str, float],
                  limits: DecodeLimits = DecodeLimits()) -> Path:
    """Write ``out_dir/index.html`` with its ``media/`` and ``plots/`` folders and return its path."""
    out = Path(out_dir)
    (out / "media").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    by_key = ledger.set_index("key", drop=False)
    chosen = buckets(ledger, thresholds, per_bucket)
    rendered: dict[str, tuple[str | None, str | None, str]] = {}
    for key in tqdm(sorted({k for b in chosen for k in b.keys}), desc="gallery", unit="clip", dynamic_ncols=True):
        rendered[key] = _render(by_key.loc[key], out, av_align, limits)
    sections = []
    for bucket in chosen:
        rows = [_row_html(by_key.loc[key], *rendered[key]) for key in bucket.keys]
        sections.append(f"<h2>{html.escape(bucket.title)} <span class='muted'>({len(bucket.keys)})</span></h2>"
                        + "".join(rows))
    title = f"Clean gallery: {html.escape(str(meta.get('dataset', '')))}"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1><p class='muted'>{len(rendered)} clips, up to "
            f"{per_bucket} per bucket; blue lines: audio onsets, red dots: video motion peaks.</p>"
            + "".join(sections) + "</body></html>")
    return atomic_write_text(out / "index.html", page)


def _render(row: pd.Series, out: Path, av_align: AVAlignConfig, limits: DecodeLimits):
    """(media path, plot path, note) of one clip, relative to the gallery folder."""
    key = str(row["key"])
    if not is_safe(key):
        return None, None, "unsafe key"
    if row["status"] == FAILED:
        return None, None, str(row.get("reason") or "failed")
    try:
        result = write_preview(row, out / "media" / f"{key}.mp4", av_align, limits)
    except DecodeError as e:
        return None, None, e.ledger_reason
    duration = float(row.get("duration_s") or len(result.motion) / max(result.fps, 1e-9))
    write_plot(result, duration, out / "plots" / f"{key}.png")
    return f"media/{key}.mp4", f"plots/{key}.png", ""
