"""``python -m train.evaluate --generated DIR``: AV-Align and CLAP of generated soundtracks.

For every sampler output in DIR (``NAME.wav`` + its ``NAME.json`` sidecar) this scores the
generated sound against its video with AV-Align, in both the published ``reference`` mode and the
``fast`` mode (``filters.av_align``, on the muxed mp4; one is muxed when the sampler was run
without ``--mux``), and against its caption with CLAP (``filters.clap``, the cleaning stage's
scorer). A score that cannot be computed (no caption, no CLAP model, undecodable file) is left
empty with the reason, never filled in. Writes ``eval.csv`` (one row per soundtrack) and
``summary.json`` (means, counts, settings) to ``--out`` (default ``DIR/eval``).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from filters.av_align import AVAlignConfig, score_clip
from filters.clap import CLAP_SAMPLE_RATE, ClapConfig, ClapModelUnavailable, ClapScorer
from core.cli_config import add_config_args, from_args
from core.decode import DecodeError
from train.config import EvalConfig
from train.sample import mux, write_record

log = logging.getLogger("train.evaluate")

MODES = ("reference", "fast")
COLUMNS = ["name", "wav", "video", "caption", "av_align_reference", "av_align_fast", "audio_peaks",
           "video_peaks", "clap", "status", "reason", "random_weights"]


def find_outputs(folder: Path) -> list[tuple[Path, dict]]:
    """Sampler outputs: every ``NAME.json`` sidecar whose ``NAME.wav`` exists."""
    found = []
    for side in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", side, e)
            continue
        wav = side.with_suffix(".wav")
        if isinstance(meta, dict) and "video" in meta and wav.is_file():
            found.append((wav, meta))
    return found


def _muxed(wav: Path, meta: dict, out: Path) -> Path:
    if meta.get("mux") and Path(meta["mux"]).is_file():
        return Path(meta["mux"])
    audio, sr = sf.read(str(wav), dtype="float32")
    return mux(meta["video"], audio, sr, out / "muxed" / f"{wav.stem}.mp4", float(meta.get("start_s") or 0.0))


def evaluate(cfg: EvalConfig, clap_cfg: ClapConfig) -> dict:
    folder = Path(cfg.generated)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    out = Path(cfg.out) if cfg.out else folder / "eval"
    out.mkdir(parents=True, exist_ok=True)
    outputs = find_outputs(folder)
    if not outputs:
        raise FileNotFoundError(f"{folder}: no sampler outputs (NAME.wav with NAME.json)")

    scorer, clap_reason = None, ""
    if clap_cfg.enabled:
        try:
            scorer = ClapScorer(clap_cfg).load()
        except ClapModelUnavailable as e:
            clap_reason = f"clap_unavailable: {' '.join(str(e).split())[:200]}"
            log.warning("CLAP scores are left empty: %s", e)
    else:
        clap_reason = "clap_disabled"

    rows = []
    for wav, meta in tqdm(outputs, desc="evaluate", dynamic_ncols=True):
        row = {"name": wav.stem, "wav": str(wav), "video": meta["video"], "caption": meta.get("caption") or "",
               "status": "ok", "reason": "", "random_weights": ",".join(meta.get("random_weights") or [])}
        reasons = []
        if cfg.av_align:
            try:
                video = _muxed(wav, meta, out)
                for mode in MODES:
                    result = score_clip(video, AVAlignConfig(mode=mode))
                    row[f"av_align_{mode}"] = result.score
                    if mode == "reference":
                        row["audio_peaks"], row["video_peaks"] = result.audio_peaks, result.video_peaks
            except (DecodeError, ValueError, OSError) as e:
                row["status"] = "failed"
                reasons.append(f"av_align: {' '.join(str(e).split())[:200]}")
        if scorer is None:
            reasons.append(clap_reason)
        elif not row["caption"]:
            reasons.append("clap: no caption in the sidecar")
        else:
            audio, sr = sf.read(str(wav), dtype="float32")
            audio48 = soxr.resample(audio, sr, CLAP_SAMPLE_RATE, quality="HQ").astype(np.float32)
            score = float(scorer.score(scorer.audio_embeddings([audio48]), [row["caption"]])[0])
            if math.isnan(score):
                reasons.append("clap: audio could not be embedded (silent or non-finite)")
            else:
                row["clap"] = score
        row["reason"] = "; ".join(r for r in reasons if r)
        rows.append(row)

    with open(out / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if isinstance(r.get(key), float)]
        return float(np.mean(vals)) if vals else None

    random_sources = sorted({s for r in rows for s in r["random_weights"].split(",") if s})
    summary = {"count": len(rows), "failed": sum(r["status"] == "failed" for r in rows),
               "av_align_reference_mean": mean("av_align_reference"), "av_align_fast_mean": mean("av_align_fast"),
               "clap_mean": mean("clap"), "clap_scored": sum(isinstance(r.get("clap"), float) for r in rows),
               "clap": scorer.metadata() if scorer is not None else {"model": clap_cfg.model, "reason": clap_reason},
               "random_weights": random_sources}
    return write_record(out / "summary.json", summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, EvalConfig)
    add_config_args(parser.add_argument_group("CLAP"), ClapConfig, prefix="clap_")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        summary = evaluate(from_args(EvalConfig, args), from_args(ClapConfig, args, prefix="clap_"))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "clap"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
