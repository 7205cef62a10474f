"""The run report: one self-contained HTML page (charts embedded as PNG) to judge a clean run.

It shows what was skipped first (CLAP with ``--clap-model none``), then counts by status and
reason, score histograms with the keep thresholds drawn, keep rate per label (top and bottom
classes) and every run parameter. Charts use matplotlib's object API (``Figure``, Agg canvas), so
making a report never touches a global pyplot backend.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

from core.atomic import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOP_LABELS = 15  # classes shown at each end of the keep-rate ranking

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#1b1f24;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #d0d7de;padding:.25em .6em;text-align:left}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.notice{background:#fff8c5;border:1px solid #d4a72c;padding:.8em 1em;border-radius:6px;margin:.6em 0;font-weight:600}
.muted{color:#57606a} img{max-width:100%;height:auto} .pair{display:flex;flex-wrap:wrap;gap:1em}
.pair>div{flex:1 1 480px}
"""


def write_report(ledger_df: pd.DataFrame, run_meta: dict, out_path: str | Path) -> Path:
    """Write the report for a finished run to ``out_path`` (atomically) and return the path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, render_report(ledger_df, run_meta))
    return out_path


def render_report(ledger_df: pd.DataFrame, run_meta: dict) -> str:
    df = _normalise(ledger_df)
    meta = dict(run_meta or {})
    title = f"Clean run report: {meta.get('dataset', 'dataset')}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if meta.get("out"):
        parts.append(f"<p class='muted'>Output folder: {_e(meta['out'])}</p>")
    parts += [f"<div class='notice'>{_e(n)}</div>" for n in notices(df, meta)]
    parts += _summary(df)
    parts += _reasons(df)
    parts += _scores(df, meta)
    parts += _labels(df)
    parts += _parameters(meta)
    parts.append("</body></html>")
    return "\n".join(parts)


def clap_skipped(meta: dict) -> bool:
    """Whether the run metadata says CLAP was skipped (top level or in a ``clap`` section)."""
    for section in (meta, meta.get("clap")):
        if not isinstance(section, dict):
            continue
        model = section.get("clap_model", section.get("model"))
        if section.get("clap_skipped") is True or (isinstance(model, str) and model.strip().lower() == "none"):
            return True
    return False


def notices(df: pd.DataFrame, meta: dict) -> list[str]:
    """Plain statements, shown at the top, of everything this run did not do."""
    out = []
    if clap_skipped(meta):
        out.append("CLAP was skipped (--clap-model none): no clip was scored or filtered for audio-text "
                   "agreement, clap_score is missing for every row, and the speech/music filter (which uses "
                   "the CLAP embedding) did not run.")
    elif len(df) and df["clap_score"].isna().all():
        out.append("No CLAP score was computed in this run (every row failed or was decided before scoring).")
    if len(df) == 0:
        out.append("The ledger is empty: this run had no input rows.")
    return out


def _normalise(ledger_df: pd.DataFrame | None) -> pd.DataFrame:
    df = pd.DataFrame() if ledger_df is None else ledger_df.copy()
    for col in ("status", "reason", "label"):
        if col not in df:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    for col in ("clap_score", "av_align", "speech_score", "music_score", "event_score", "duration_s"):
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _summary(df: pd.DataFrame) -> list[str]:
    total = len(df)
    rows = []
    for status in ("ok", "filtered", "failed"):
        n = int((df["status"] == status).sum())
        rows.append((status, n, _pct(n, total)))
    other = total - sum(r[1] for r in rows)
    if other:
        rows.append(("(undecided)", other, _pct(other, total)))
    rows.append(("total", total, "100%" if total else "-"))
    kept_h = df.loc[df["status"] == "ok", "duration_s"].sum() / 3600.0
    all_h = df["duration_s"].sum() / 3600.0
    return ["<h2>Counts by status</h2>", _table(("status", "rows", "share"), rows),
            f"<p>Kept {kept_h:.2f} h of {all_h:.2f} h of clips.</p>"]


def _reasons(df: pd.DataFrame) -> list[str]:
    out = ["<h2>Counts by reason</h2>"]
    decided = df[df["status"].isin(["filtered", "failed"])]
    if decided.empty:
        return out + ["<p>No row was filtered or failed.</p>"]
    counts = (decided.groupby(["status", "reason"]).size().reset_index(name="rows")
              .sort_values(["status", "rows", "reason"], ascending=[True, False, True]))
    out.append(_table(("status", "reason", "rows"),
                      [(r.status, r.reason or "(none)", int(r.rows)) for r in counts.itertuples()]))
    fig = _figure(figsize=(8, 0.35 * len(counts) + 1.2))
    ax = fig.add_subplot()
    labels = [_tick(f"{s}: {r or '(none)'}") for s, r in zip(counts["status"], counts["reason"])]
    colors = ["#cf222e" if s == "failed" else "#bf8700" for s in counts["status"]]
    ax.barh(range(len(labels)), counts["rows"].to_numpy()[::-1], color=colors[::-1])
    ax.set_yticks(range(len(labels)), labels[::-1])
    ax.set_xlabel("rows")
    fig.tight_layout()
    out.append(_img(fig, "rows by reason"))
    return out


def threshold(meta: dict, name: str) -> float | None:
    """A keep threshold from the run metadata (``thresholds``/``filters`` sections or top level)."""
    for section in (meta.get("thresholds"), meta.get("filters"), meta.get("filter"), meta.get("curation_rules"),
                    meta):
        if isinstance(section, dict) and isinstance(section.get(name), (int, float)):
            return float(section[name])
    return None


def av_align_version(meta: dict) -> str | None:
    """The AV-Align revision the run filtered on (``av_align_version``, or the ``av_align`` section)."""
    version = meta.get("av_align_version") or (meta.get("av_align") or {}).get("version")
    return str(version) if version else None


def _av_align_revisions(df: pd.DataFrame, version: str | None, av_min: float | None) -> list[str]:
    """Which revision filtered, and how the two published revisions' keep/drop decisions compare."""
    out = ["<h3>AV-Align revision</h3>",
           f"<p>Filtered on the <b>{_e(version or 'unrecorded')}</b> revision of the published av_align.py "
           "(2025: motion peaks &gt;= 0.1, one-to-one matching; 2023: the original, no floor, onsets may share a "
           "peak). Both are stored in the ledger (av_align_2025, av_align_2023).</p>"]
    cols = ("av_align_2025", "av_align_2023")
    if av_min is None or not all(c in df for c in cols):
        return out
    both = df[list(cols)].apply(pd.to_numeric, errors="coerce").dropna()
    if both.empty:
        return out
    keep = both > av_min
    differ = int((keep[cols[0]] != keep[cols[1]]).sum())
    rows = [(c.split("_")[-1], int(keep[c].sum()), len(both)) for c in cols]
    out.append(_table(("revision", f"kept at AV-Align > {av_min:g}", "scored"), rows))
    out.append(f"<p>The two revisions disagree on {differ} of {len(both)} scored clips.</p>")
    return out


def _scores(df: pd.DataFrame, meta: dict) -> list[str]:
    out = ["<h2>Score distributions</h2>", "<div class='pair'>"]
    clap_note = "CLAP skipped (--clap-model none): no scores." if clap_skipped(meta) else None
    out.append(_histogram(df["clap_score"], "CLAP score (audio-text cosine)", threshold(meta, "clap_min"),
                          clap_note))
    version = av_align_version(meta)
    title = f"AV-Align ({version} revision)" if version else "AV-Align"
    out.append(_histogram(df["av_align"], title, threshold(meta, "av_align_min"), None))
    out.append("</div>")
    out += _av_align_revisions(df, version, threshold(meta, "av_align_min"))
    if df["speech_score"].notna().any() or df["music_score"].notna().any():
        out += ["<div class='pair'>",
                _histogram(df["speech_score"], "speech score (best speech prompt cosine)", None, None),
                _histogram(df["music_score"], "music score (best music prompt cosine)", None, None),
                "</div>"]
    return out + _curation_scores(df, meta)


def _curation_scores(df: pd.DataFrame, meta: dict) -> list[str]:
    """Speech (VAD), silence, motion and scene cuts: the curation scores of ``filters.curation``."""
    if "speech_share" not in df or not df[["speech_share", "silent_share", "motion_max"]].notna().any().any():
        return []
    peak_max = threshold(meta, "silence_peak_max")
    cuts = df["scene_cuts"].map(lambda v: float(len(v)) if v is not None else np.nan) if "scene_cuts" in df else None
    charts = [
        (df["speech_share"], "speech share (Silero VAD, share of the window voiced)", "speech_share_max"),
        (df["speech_run_s"], "longest voiced run (s)", "speech_run_max_s"),
        (df["silent_share"], "near-silent share (20 ms frames)", "silent_share_max"),
        (df["peak_db"], "peak level (dBFS)", None),
        (df["motion_max"], "largest motion (px/frame; static below the threshold)", "static_motion_max"),
    ]
    out = ["<h3>Curation scores</h3>", "<div class='pair'>"]
    for values, name, key in charts:
        thr = threshold(meta, key) if key else (20 * math.log10(peak_max) if peak_max else None)
        out.append(_histogram(values, name, thr, None, drop_above=key in ("speech_share_max", "speech_run_max_s",
                                                                         "silent_share_max")))
    if cuts is not None:
        out.append(_histogram(cuts, "scene cuts per window (PySceneDetect)", None, None))
    if "aes_pq" in df and df["aes_pq"].notna().any():
        out.append(_histogram(df["aes_pq"], "audio quality PQ (audiobox-aesthetics, 1-10)", threshold(meta, "quality_pq_min"),
                              None))
        for column, name in (("aes_pc", "PC production complexity"), ("aes_ce", "CE content enjoyment"),
                             ("aes_cu", "CU content usefulness")):
            out.append(_histogram(df[column], f"audio {name} (audiobox-aesthetics)", None, None))
    return out + ["</div>"]


def _histogram(values: pd.Series, name: str, thr: float | None, note: str | None, drop_above: bool = False) -> str:
    data = values.dropna().to_numpy(dtype=float)
    missing = int(values.isna().sum())
    head = f"<div><h3>{_e(name)}</h3>"
    if note:
        return head + f"<p class='notice'>{_e(note)}</p></div>"
    if data.size == 0:
        return head + f"<p>No {_e(name)} was computed ({missing} rows missing).</p></div>"
    fig = _figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    lo, hi = float(data.min()), float(data.max())
    if thr is not None:
        lo, hi = min(lo, thr), max(hi, thr)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    ax.hist(data, bins=np.linspace(lo, hi, 41), color="#0969da", alpha=0.85)
    if thr is not None:
        rule = f"dropped above {thr:g}" if drop_above else f"keep threshold > {thr:g}"
        ax.axvline(thr, color="#cf222e", linestyle="--", linewidth=2, label=rule)
        ax.legend(loc="upper left")
    ax.set_xlabel(name)
    ax.set_ylabel("rows")
    fig.tight_layout()
    stats = (f"{data.size} scored, {missing} missing; median {np.median(data):.3f}"
             + (f"; {int((data > thr).sum())} above the threshold {thr:g}" if thr is not None else
                "; no threshold recorded"))
    return head + _img(fig, name) + f"<p class='muted'>{_e(stats)}</p></div>"


def keep_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Per label: rows, ok, filtered, failed and keep rate = ok / (ok + filtered) (failed rows excluded)."""
    labelled = df[df["label"] != ""]
    if labelled.empty:
        return pd.DataFrame(columns=["label", "rows", "ok", "filtered", "failed", "keep_rate"])
    counts = pd.crosstab(labelled["label"], labelled["status"])
    table = pd.DataFrame({"label": counts.index.astype(str), "rows": counts.sum(axis=1).to_numpy()})
    for status in ("ok", "filtered", "failed"):
        table[status] = counts[status].to_numpy() if status in counts else 0
    table = table.reset_index(drop=True)
    scored = table["ok"] + table["filtered"]
    table["keep_rate"] = np.where(scored > 0, table["ok"] / scored.where(scored > 0, 1), np.nan)
    return table.sort_values(["keep_rate", "rows", "label"], ascending=[False, False, True],
                             na_position="last").reset_index(drop=True)


def _labels(df: pd.DataFrame) -> list[str]:
    out = ["<h2>Keep rate per label</h2>",
           "<p class='muted'>keep rate = ok / (ok + filtered); failed rows (decode errors, missing files) "
           "are not held against a label.</p>"]
    rates = keep_rates(df)
    rated = rates.dropna(subset=["keep_rate"])
    if rated.empty:
        return out + ["<p>No labelled row was scored (a dataset without labels, such as a YouTube corpus, "
                      "or every labelled row failed).</p>"]
    n = min(TOP_LABELS, len(rated))
    top = rated.head(n)
    bottom = rated.tail(n).iloc[::-1]
    cols = ("label", "rows", "ok", "filtered", "failed", "keep rate")

    def rows(t: pd.DataFrame) -> Iterable[tuple]:
        return [(r.label, int(r.rows), int(r.ok), int(r.filtered), int(r.failed), f"{r.keep_rate:.0%}")
                for r in t.itertuples()]

    out.append(f"<p>{len(rated)} labels with scored rows.</p><div class='pair'>")
    out.append(f"<div><h3>Top {n} (highest keep rate)</h3>{_table(cols, rows(top))}</div>")
    out.append(f"<div><h3>Bottom {n} (lowest keep rate)</h3>{_table(cols, rows(bottom))}</div></div>")
    chart = (pd.concat([top, bottom]).drop_duplicates("label")
             .sort_values(["keep_rate", "rows"], ascending=[True, True]))  # barh draws bottom-up
    fig = _figure(figsize=(8, 0.28 * len(chart) + 1.2))
    ax = fig.add_subplot()
    rates = chart["keep_rate"].to_numpy() * 100
    ax.barh(range(len(chart)), rates, color="#1a7f37")
    ax.set_yticks(range(len(chart)), [_tick(x) for x in chart["label"]])
    for y, (rate, ok, scored) in enumerate(zip(rates, chart["ok"], chart["ok"] + chart["filtered"])):
        ax.text(min(rate, 100) + 1, y, f"{int(ok)}/{int(scored)}", va="center", fontsize=8)
    ax.set_xlabel("keep rate (%), ok/scored at the bar end")
    ax.set_xlim(0, 112)
    fig.tight_layout()
    out.append(_img(fig, "keep rate per label, top and bottom"))
    return out


def _parameters(meta: dict) -> list[str]:
    if not meta:
        return ["<h2>Run parameters</h2>", "<p>No run metadata was recorded.</p>"]
    rows = [(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
            for k, v in sorted(_flatten(meta).items())]
    return ["<h2>Run parameters</h2>", _table(("parameter", "value"), rows)]


def _flatten(meta: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _figure(**kwargs) -> Figure:
    """A matplotlib Figure; matplotlib is imported here, so ``--help`` and importers stay light."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if isinstance(c, (int, float)) and not isinstance(c, bool)
                         else f"<td>{_e(c)}</td>" for c in row) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tick(text: str, width: int = 60) -> str:
    """A chart label: shortened, and with ``$`` escaped so matplotlib never parses it as math."""
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("$", r"\$")


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def _e(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "missing"
    return html.escape(str(value), quote=True)
