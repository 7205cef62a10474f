"""Benchmark: do augmented samples keep their audio-visual alignment, and what does rendering cost?

1. Stretch methods on a click train (pure audio): onset error, lost clicks and smear of
   ``resample`` and ``wsola`` (augment.stretch) against FFmpeg's ``atempo`` (through PyAV's filter
   graph) and librosa's phase vocoder, the alternatives that were rejected.
2. AV-Align (reference mode) of rendered samples relative to their sources: every stretch (both
   methods) and concat recipe of a plan over the real VGGSound clips in tests/data (treated as
   training clips here; their CSV marks them test) and over generated clips with known events.
   Each recipe is rendered to mp4 exactly as ``python -m pipeline.augment render`` does and scored
   from the file. A rate-1 copy of each source measures what the re-encode alone costs.
3. Render time per sample (what the encode stage asks: 16 kHz audio + 2 fps RGB) relative to
   decoding the source window(s) it plays with the same request, in the same run.

    .venv/bin/python bench/augment.py [--real N] [--generated N] [--skip-av-align] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import librosa
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment.config import AugmentConfig  # noqa: E402
from augment.plan import build_plan  # noqa: E402
from augment.recipe import Recipe, Segment  # noqa: E402
from augment.render import RenderRequest, render, render_mp4  # noqa: E402
from augment.stretch import stretch_audio  # noqa: E402
from filters.av_align import AVAlignConfig, score_clip  # noqa: E402
from core.config import DEFAULT_SIGNAL  # noqa: E402
from core.decode import DecodeRequest, decode, probe  # noqa: E402
from core.synth import write_event_clip  # noqa: E402

REAL = ROOT / "tests" / "data" / "vggsound"
SR = 16000


# ----------------------------------------------------------------------------- 1. stretch methods

def atempo(x: np.ndarray, sr: int, rate: float) -> np.ndarray:
    """FFmpeg's atempo (WSOLA, ~64 ms windows) through PyAV's filter graph."""
    graph = av.filter.Graph()
    src = graph.add_abuffer(sample_rate=sr, format="flt", layout="mono", time_base=Fraction(1, sr))
    graph.link_nodes(src, graph.add("atempo", f"{rate}"), graph.add("abuffersink")).configure()
    out = []

    def drain():
        while True:
            try:
                out.append(graph.pull().to_ndarray().reshape(-1))
            except (av.error.BlockingIOError, av.error.EOFError):
                return

    for i in range(0, x.size, 1024):
        frame = av.AudioFrame.from_ndarray(x[None, i: i + 1024].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sr, i, Fraction(1, sr)
        graph.push(frame)
        drain()
    graph.push(None)
    drain()
    return np.concatenate(out)


METHODS = {
    "resample": lambda x, sr, r: stretch_audio(x, sr, r, "resample"),
    "wsola": lambda x, sr, r: stretch_audio(x, sr, r, "wsola"),
    "ffmpeg atempo": atempo,
    "phase vocoder": lambda x, sr, r: librosa.effects.time_stretch(x, rate=r),
}


def click_train(sr: int, seconds: float = 60.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5 ms noise bursts at irregular times (at least 0.2 s apart) over a faint noise floor."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.003, int(seconds * sr)).astype(np.float32)
    times = np.sort(rng.uniform(0.3, seconds - 0.5, int(seconds * 2.5)))
    times = times[np.concatenate([[True], np.diff(times) > 0.2])]
    n = int(0.005 * sr)
    for t in times:
        i = int(round(t * sr))
        x[i: i + n] += rng.uniform(-0.8, 0.8, n).astype(np.float32)
    return x, times


def measure_clicks(y: np.ndarray, sr: int, expected: np.ndarray) -> tuple[list[float], int, list[float]]:
    """Per expected click: onset error (first sample above 0.2 within +-60 ms) and 90%-energy width."""
    errors, widths, lost = [], [], 0
    for t in expected:
        lo, hi = int((t - 0.06) * sr), int((t + 0.06) * sr)
        seg = y[max(lo, 0): hi]
        loud = np.nonzero(np.abs(seg) > 0.2)[0]
        if not len(loud):
            lost += 1
            continue
        errors.append((max(lo, 0) + loud[0]) / sr - t)
        e = np.cumsum(seg.astype(np.float64) ** 2)
        a, b = np.searchsorted(e, [0.05 * e[-1], 0.95 * e[-1]])
        widths.append((b - a) / sr)
    return errors, lost, widths


def bench_methods(rates=(0.8, 1.25)) -> list[dict]:
    x, times = click_train(SR)
    rows = []
    for rate in rates:
        for name, fn in METHODS.items():
            fn(x[: SR], SR, rate)  # warm-up: librosa compiles on first use
            t0 = time.perf_counter()
            y = fn(x, SR, rate)
            seconds = time.perf_counter() - t0
            err, lost, width = measure_clicks(y, SR, times / rate)
            e = np.abs(err) * 1000 if err else np.array([np.nan])
            rows.append({"rate": rate, "method": name, "clicks": len(times), "lost": lost,
                         "mean_err_ms": float(np.mean(err) * 1000) if err else float("nan"),
                         "max_abs_err_ms": float(e.max()), "median_width_ms": float(np.median(width) * 1000),
                         "seconds_per_10s": seconds * 10.0 / (x.size / SR)})
    print("\n== 1. stretch methods on a click train (16 kHz, 5 ms clicks are 5/r ms wide when sped by r)")
    print(f"{'rate':>5} {'method':<14} {'lost':>7} {'mean err ms':>12} {'max|err| ms':>12} {'90% width ms':>13} "
          f"{'s per 10 s':>11}")
    for r in rows:
        print(f"{r['rate']:>5} {r['method']:<14} {r['lost']:>3}/{r['clicks']:<3} {r['mean_err_ms']:>12.1f} "
              f"{r['max_abs_err_ms']:>12.1f} {r['median_width_ms']:>13.1f} {r['seconds_per_10s']:>11.3f}")
    return rows


# ----------------------------------------------------------------------------- 2./3. rendered samples

def real_ledger(n: int) -> pd.DataFrame:
    csv = pd.read_csv(REAL / "vggsound.csv", header=None, names=["yid", "start", "label", "split"])
    rows = []
    for r in csv.head(n).itertuples():
        path = REAL / "video" / f"{r.yid}_{int(r.start):06d}.mp4"
        info = probe(path)
        clip = decode(path, DecodeRequest(duration_s=DEFAULT_SIGNAL.window_s, audio_rates=(SR,), need_video=False))
        rows.append(dict(key=f"vggsound-{r.yid}-{int(r.start):06d}", source="vggsound", youtube_id=r.yid,
                         video_path=str(path), label=r.label, caption=r.label, split="train", start_s=0.0,
                         duration_s=min(clip.duration_s, info.duration_s), video_fps=info.video_fps, status="ok"))
    return pd.DataFrame(rows)


def generated_ledger(n: int, folder: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = ["hammering", "dog barking", "chopping wood", "woodpecker", "door knocking", "ping pong", "typing"]
    rows = []
    for i in range(n):
        fps = (25.0, 30.0)[i % 2]
        events = np.sort(rng.choice(np.arange(8, 92) / 10.0, size=5, replace=False))
        while np.any(np.diff(events) < 0.6):
            events = np.sort(rng.choice(np.arange(8, 92) / 10.0, size=5, replace=False))
        clip = write_event_clip(folder / f"gen{i}.mp4", fps=fps, event_times=tuple(events), seed=100 + i)
        rows.append(dict(key=f"gen-{i:03d}", source="sample", youtube_id=f"gen{i}", video_path=str(clip.path),
                         label=labels[i % len(labels)], caption=labels[i % len(labels)], split="train", start_s=0.0,
                         duration_s=clip.duration_s, video_fps=clip.fps, status="ok"))
    return pd.DataFrame(rows)


def identity(row: pd.Series) -> Recipe:
    """The source window played at rate 1: what re-encoding alone does to AV-Align."""
    seg = Segment(row["key"], row["video_path"], row["start_s"], row["start_s"] + row["duration_s"], 0.0, 1.0)
    return Recipe(key=f"{row['key']}-copy", kind="stretch", caption="", label="", split="train", source="",
                  duration_s=seg.dst_end_s, target_s=seg.dst_end_s, video_fps=row["video_fps"], segments=(seg,),
                  rate=1.0)


def bench_set(name: str, ledger: pd.DataFrame, folder: Path, av_align: bool) -> list[dict]:
    cfg = AVAlignConfig(mode="reference")
    recipes, _ = build_plan(ledger, AugmentConfig(concat_per_clip=1, stretch_rates=(0.8, 1.25)))
    by_key = ledger.set_index("key")
    source_score = {}
    if av_align:
        for _, row in ledger.iterrows():
            source_score[row["key"]] = score_clip(row["video_path"], cfg, row["start_s"], row["duration_s"]).score
    jobs = [("copy", identity(row)) for _, row in ledger.iterrows()]
    for r in recipes:
        jobs.append((r.kind if r.kind == "concat" else "stretch resample", r))
        if r.kind == "stretch":
            jobs.append(("stretch wsola", dataclasses.replace(r, stretch_method="wsola")))
    req = RenderRequest(audio_rates=(SR,), rgb_fps=DEFAULT_SIGNAL.clip_fps)
    results = []
    for label, recipe in jobs:
        # 3. render vs decoding the source windows with the same request (best of two)
        t_render = min(_timed(lambda: render(recipe, req)) for _ in range(2))
        t_decode = 0.0
        for seg_key in dict.fromkeys(s.source_key for s in recipe.segments):
            src = by_key.loc[seg_key]
            dreq = DecodeRequest(start_s=src["start_s"], duration_s=src["duration_s"], audio_rates=(SR,),
                                 rgb_fps=DEFAULT_SIGNAL.clip_fps)
            t_decode += min(_timed(lambda: decode(src["video_path"], dreq)) for _ in range(2))
        row = {"set": name, "what": label, "key": recipe.key, "render_s": t_render, "decode_s": t_decode,
               "render_vs_decode": t_render / t_decode}
        if av_align:
            out = folder / f"{recipe.key}-{label.replace(' ', '_')}.mp4"
            render_mp4(recipe, out)
            score = score_clip(out, cfg).score
            src = [source_score[s.source_key] for s in recipe.segments]
            w = [s.dst_end_s - s.dst_start_s for s in recipe.segments]
            expected = float(np.average(src, weights=w))  # concat: its sources weighted by playing time
            row.update(av_align=score, source_av_align=expected,
                       retention=score / expected if expected > 0 else float("nan"))
        results.append(row)
        print(f"   {name:<9} {label:<17} {recipe.key[:58]:<58} render/decode {row['render_vs_decode']:5.2f}"
              + (f"  AV-Align {row['av_align']:.3f} (source {row['source_av_align']:.3f})" if av_align else ""),
              flush=True)
    return results


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarize(results: list[dict], av_align: bool) -> None:
    df = pd.DataFrame(results)
    print("\n== 2./3. per set and kind: medians (AV-Align reference mode, from the rendered mp4)")
    cols = {"n": ("key", "count"), "render/decode": ("render_vs_decode", "median")}
    if av_align:
        cols.update({"AV-Align": ("av_align", "median"), "source": ("source_av_align", "median"),
                     "retention": ("retention", "median"), "min retention": ("retention", "min")})
    print(df.groupby(["set", "what"], sort=False).agg(**cols).round(3).to_string())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=int, default=5, help="real VGGSound clips from tests/data (0-5)")
    p.add_argument("--generated", type=int, default=4, help="generated clips with known events")
    p.add_argument("--skip-av-align", action="store_true", help="timing only (reference AV-Align is slow)")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args(argv)
    report = {"methods": bench_methods()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("\n== 2./3. rendered samples")
        if args.generated:
            results += bench_set("generated", generated_ledger(args.generated, folder), folder, not args.skip_av_align)
        if args.real:
            results += bench_set("real", real_ledger(args.real), folder, not args.skip_av_align)
    summarize(results, not args.skip_av_align)
    report["samples"] = results
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
