"""``python -m train.evaluate --generated DIR [--reference DIR]``: the metrics V2A papers report.

For every sampler output in DIR (``NAME.wav`` + its ``NAME.json`` sidecar) it computes, in one run:

- per clip (``eval.csv``): AV-Align of the generated sound against its video in the published
  ``reference`` mode and the ``fast`` mode (``filters.av_align``, on the muxed mp4; one is muxed
  when the sampler ran without ``--mux``); the CLAP score against its caption (``filters.clap``,
  the cleaning stage's scorer); with ``--reference``, KL (softmax and sigmoid) of the PANNs CNN14
  and PaSST classifiers between the clip and the reference clip of the same file name;
- per set (``summary.json``, and a table on stdout): the means of those, FD of PANNs CNN14 (16 kHz)
  and PaSST-S (32 kHz) embeddings and FAD of VGGish embeddings between all generated and all
  reference clips, the Inception Score of the generated clips' PANNs and PaSST logits, the mean DeSync and
  the mean PAM (MS-CLAP 2023, per clip in ``eval.csv``); with ``--cavp``, the CAVP score (Diff-Foley's
  encoders) per clip and its mean. Each metric records its value, model, weights sha256 and settings.

Every model is resolved (``core.registry``) before any clip is read: a missing one stops the run
with one message naming all of them. A score that cannot be computed (no caption, undecodable
file, too few clips) is left empty with the reason, never filled in. Definitions: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from core.cli_config import add_config_args, from_args
from core.decode import DecodeError, DecodeRequest, decode
from core.models import ModelUnavailable
from core.resample import resample
from filters.av_align import AVAlignConfig, score_clip
from filters.clap import CLAP_SAMPLE_RATE, ClapConfig
from metrics.divergence import kl_sigmoid, kl_softmax
from metrics.cavp import SAMPLE_RATE as CAVP_SR
from metrics.cavp import cavp_request
from metrics.desync import MIN_SECONDS as DESYNC_MIN_S
from metrics.desync import SAMPLE_RATE as DESYNC_SR
from metrics.desync import sync_request
from metrics.pam import SAMPLE_RATE as PAM_SR
from metrics.panns import SAMPLE_RATE as PANNS_SR
from metrics.passt import SAMPLE_RATE as PASST_SR
from metrics.vggish import SAMPLE_RATE as VGGISH_SR
from train.config import EvalConfig
from train.eval_models import Models, load_models
from train.eval_summary import (CLASSIFIERS, MODES, cavp_metrics, classifier_metrics, clip_metrics, desync_metrics,
                                pam_metrics, table, vggish_metrics)
from train.soundtrack import mux, write_record

log = logging.getLogger("train.evaluate")

AUDIO_EXT = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_EXT = (".mp4", ".mkv", ".webm", ".avi", ".mov")
COLUMNS = ["name", "wav", "video", "reference", "caption", "av_align_reference", "av_align_fast", "audio_peaks",
           "video_peaks", "clap", "kl_softmax_panns", "kl_sigmoid_panns", "kl_softmax_passt", "kl_sigmoid_passt",
           "desync", "desync_first_s", "desync_last_s", "cavp", "pam", "status", "reason", "random_weights"]
RATES = {"panns": PANNS_SR, "vggish": VGGISH_SR, "passt": PASST_SR}


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


def find_references(folder: Path) -> dict[str, Path]:
    """Reference clips by file stem (audio preferred over video when both exist)."""
    found: dict[str, Path] = {}
    for ext in VIDEO_EXT + AUDIO_EXT[::-1]:
        for path in sorted(folder.glob(f"*{ext}")):
            found[path.stem] = path
    return found


def read_audio(path: Path, rate: int, resampler: str = "soxr_hq") -> np.ndarray:
    """Mono float32 audio of an audio file (channel mean, soxr HQ or torchaudio's kernel) or a video's audio track."""
    if path.suffix.lower() in AUDIO_EXT:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return resample(audio.mean(axis=1), sr, rate, resampler)
    clip = decode(path, DecodeRequest(audio_rates=(rate,), need_video=False, resampler=resampler))
    return np.asarray(clip.audio[rate], np.float32)


def _muxed(wav: Path, meta: dict, out: Path) -> Path:
    if meta.get("mux") and Path(meta["mux"]).is_file():
        return Path(meta["mux"])
    audio, sr = sf.read(str(wav), dtype="float32")
    return mux(meta["video"], audio, sr, out / "muxed" / f"{wav.stem}.mp4", float(meta.get("start_s") or 0.0))


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _av_align(row: dict, wav: Path, meta: dict, out: Path, reasons: list[str]) -> None:
    try:
        video = _muxed(wav, meta, out)
        for mode in MODES:
            result = score_clip(video, AVAlignConfig(mode=mode))
            row[f"av_align_{mode}"] = result.score
            if mode == "reference":
                row["audio_peaks"], row["video_peaks"] = result.audio_peaks, result.video_peaks
    except (DecodeError, ValueError, OSError) as e:
        row["status"] = "failed"
        reasons.append(f"av_align: {_short(e)}")


def _clap(row: dict, wav: Path, models: Models, reasons: list[str]) -> None:
    if models.clap is None:
        reasons.append(models.clap_reason)
    elif not row["caption"]:
        reasons.append("clap: no caption in the sidecar")
    else:
        audio48 = read_audio(wav, CLAP_SAMPLE_RATE)
        score = float(models.clap.score(models.clap.audio_embeddings([audio48]), [row["caption"]])[0])
        if math.isnan(score):
            reasons.append("clap: audio could not be embedded (silent or non-finite)")
        else:
            row["clap"] = score


def _desync(row: dict, wav: Path, meta: dict, models: Models, reasons: list[str]) -> None:
    """av-benchmark's DeSync of the generated sound against the frames of its video (from ``start_s``)."""
    if models.desync is None:
        return
    try:
        audio = read_audio(wav, DESYNC_SR, resampler="torchaudio")
        seconds = len(audio) / DESYNC_SR
        if seconds + 1e-9 < DESYNC_MIN_S:  # refused before the video is decoded
            raise ValueError(f"needs {DESYNC_MIN_S:.1f} s of sound, the output has {seconds:.2f} s")
        request = sync_request(float(meta.get("start_s") or 0.0), audio=False, duration_s=seconds,
                               size=models.desync.model.size.image_size)
        clip = decode(meta["video"], request)
        result = models.desync.score(clip.rgb, audio)
    except (DecodeError, ValueError, OSError) as e:
        reasons.append(f"desync: {_short(e)}")
        return
    row.update(desync=result.desync, desync_first_s=result.first_s, desync_last_s=result.last_s)


def _cavp(row: dict, wav: Path, meta: dict, models: Models, reasons: list[str]) -> None:
    """Diff-Foley's CAVP score of the generated sound against its video's frames (from ``start_s``)."""
    if models.cavp is None:
        return
    try:
        audio = read_audio(wav, CAVP_SR)
        seconds = int(len(audio) / CAVP_SR)
        if seconds < 1:  # refused before the video is decoded
            raise ValueError(f"needs 1 s of sound, the output has {len(audio) / CAVP_SR:.2f} s")
        clip = decode(meta["video"], cavp_request(float(meta.get("start_s") or 0.0), float(seconds)))
        row["cavp"] = models.cavp.score(clip.rgb, audio).score
    except (DecodeError, ValueError, OSError) as e:
        reasons.append(f"cavp: {_short(e)}")


def _pam(row: dict, wav: Path, models: Models, reasons: list[str]) -> None:
    """PAM of the generated sound: 44.1 kHz mono (torchaudio's resampling kernel, as soham97/PAM loads it)."""
    if models.pam is None:
        return
    try:
        row["pam"] = models.pam.score(read_audio(wav, PAM_SR, resampler="torchaudio")).score
    except (DecodeError, ValueError, OSError) as e:
        reasons.append(f"pam: {_short(e)}")


def metric_audio(path: Path, rate: int, length_s: float) -> np.ndarray:
    """What the PANNs/VGGish/PaSST metrics hear, as av-benchmark's AudioDataset (from audioldm_eval)
    prepares it: mono, mean removed, at ``rate``, the first ``length_s`` seconds (0: all)."""
    audio = read_audio(path, rate)
    audio = audio - audio.mean() if audio.size else audio
    return audio[:int(round(rate * length_s))] if length_s else audio


def _features(path: Path, models: Models, cfg: EvalConfig, reasons: list[str], what: str) -> dict:
    """PANNs and PaSST (features, logits) and VGGish examples of one clip, for each model loaded."""
    feats: dict = {}
    audio: dict[int, np.ndarray] = {}
    for attr in ("panns", "vggish", "passt"):
        model, rate = getattr(models, attr), RATES[attr]
        if model is None:
            continue
        try:
            if rate not in audio:
                audio[rate] = metric_audio(path, rate, cfg.audio_length_s)
            feats[attr] = model.embed(audio[rate])
        except (DecodeError, ValueError, OSError, RuntimeError) as e:
            reasons.append(f"{attr} ({what}): {_short(e)}")
    return feats


def _kl_columns(row: dict, feats: dict, ref: dict | None, references: dict, reasons: list[str]) -> None:
    for attr in CLASSIFIERS:
        if attr not in feats:
            continue
        if ref is not None and attr in ref:
            logits, ref_logits = feats[attr][1][None], ref[attr][1][None]
            row[f"kl_softmax_{attr}"] = float(kl_softmax(logits, ref_logits)[0])
            row[f"kl_sigmoid_{attr}"] = float(kl_sigmoid(logits, ref_logits)[0])
        elif references and f"kl ({attr}): no reference clip of this name" not in reasons:
            reasons.append(f"kl ({attr}): no reference clip of this name")


def score_outputs(cfg: EvalConfig, models: Models, outputs, references: dict[str, Path], out: Path):
    """Per-clip rows, and the PANNs, VGGish and PaSST features of every generated and reference clip."""
    rows, gen_feats, ref_feats = [], {}, {}
    if any(getattr(models, attr) is not None for attr in RATES):
        for name, path in tqdm(sorted(references.items()), desc="reference", dynamic_ncols=True):
            problems: list[str] = []
            ref_feats[name] = _features(path, models, cfg, problems, "reference")
            if problems:
                log.warning("reference %s: %s", path, "; ".join(problems))
    for wav, meta in tqdm(outputs, desc="evaluate", dynamic_ncols=True):
        row = {"name": wav.stem, "wav": str(wav), "video": meta["video"], "caption": meta.get("caption") or "",
               "reference": str(references.get(wav.stem, "")), "status": "ok", "reason": "",
               "random_weights": ",".join((meta.get("random_weights") or []) + models.random)}
        reasons: list[str] = []
        if meta.get("video"):  # text-to-audio outputs (video null) get the audio-only metrics
            if cfg.av_align:
                _av_align(row, wav, meta, out, reasons)
            _desync(row, wav, meta, models, reasons)
            _cavp(row, wav, meta, models, reasons)
        else:
            reasons.append("text-to-audio: no video, so no AV-Align, DeSync or CAVP")
        _clap(row, wav, models, reasons)
        _pam(row, wav, models, reasons)
        gen_feats[wav.stem] = feats = _features(wav, models, cfg, reasons, "generated")
        _kl_columns(row, feats, ref_feats.get(wav.stem), references, reasons)
        row["reason"] = "; ".join(r for r in reasons if r)
        rows.append(row)
    return rows, gen_feats, ref_feats


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def evaluate(cfg: EvalConfig, clap_cfg: ClapConfig) -> dict:
    folder = Path(cfg.generated)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if cfg.reference and not Path(cfg.reference).is_dir():
        raise FileNotFoundError(f"--reference {cfg.reference}: no such folder")
    outputs = find_outputs(folder)
    if not outputs:
        raise FileNotFoundError(f"{folder}: no sampler outputs (NAME.wav with NAME.json)")
    models = load_models(cfg, clap_cfg)  # before any clip is read
    out = Path(cfg.out) if cfg.out else folder / "eval"
    out.mkdir(parents=True, exist_ok=True)
    references = find_references(Path(cfg.reference)) if cfg.reference else {}
    rows, gen_feats, ref_feats = score_outputs(cfg, models, outputs, references, out)
    write_csv(out / "eval.csv", rows)
    metrics = clip_metrics(rows, models, clap_cfg)
    for attr in CLASSIFIERS:
        if getattr(models, attr) is not None:
            metrics.update(classifier_metrics(cfg, models, rows, gen_feats, ref_feats, attr))
    if models.vggish is not None:
        metrics.update(vggish_metrics(cfg, models, gen_feats, ref_feats))
    if models.desync is not None:
        metrics.update(desync_metrics(rows, models))
    if models.cavp is not None:
        metrics.update(cavp_metrics(rows, models))
    if cfg.pam:
        metrics.update(pam_metrics(rows, models))
    random_sources = sorted({s for r in rows for s in r["random_weights"].split(",") if s})
    summary = {"count": len(rows), "failed": sum(r["status"] == "failed" for r in rows),
               "references": len(references), "metrics": metrics, "random_weights": random_sources,
               "settings": asdict(cfg)}
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
    except (FileNotFoundError, ModelUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(summary["metrics"]))
    if summary["random_weights"]:
        print(f"RANDOM WEIGHTS in {', '.join(summary['random_weights'])}: these numbers say nothing about quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
