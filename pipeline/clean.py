"""``python -m pipeline.clean``: manifest -> decode -> score -> filter -> ``OUT/ledger.parquet``.

Writes ``OUT/ledger.parquet`` (one row per input item), ``OUT/run.json`` (parameters and counts),
``OUT/report.html`` and the journal ``OUT/ledger.parts/`` that makes reruns resume. Every journaled
row carries the fingerprint of the scoring settings that made it: a rerun with other scoring
settings stops before any decoding (``--rescore`` recomputes those rows; threshold changes never
rescore). One run at a time holds OUT (``OUT/.v2a.lock``). See docs/resume.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from filters.aesthetics import AestheticsConfig, AestheticsUnavailable
from filters.av_align import AVAlignConfig, select_version
from filters.av_align import run_metadata as av_align_metadata
from filters.clap import ClapConfig, ClapModelUnavailable, check_available, run_metadata
from filters.curation import CurationConfig, CurationFilters
from filters.speech_music import SpeechMusicConfig
from filters.rules import FilterConfig, apply_filters
from metrics.desync_stage import DesyncConfig
from pipeline.clean_stages import CleanStageConfig, build_clean_stages
from core import storage
from core.cli_config import FlagError, add_config_args, check_count, from_args
from core.config import DecodeLimits, SignalConfig
from core.fingerprint import SettingsRegistry, differences, fingerprint
from core.lock import FolderLock, FolderLocked
from core.models import ModelUnavailable
from core.registry import require
from pipeline.ledger import MANIFEST_REASONS, RETRYABLE, Ledger, current_rows, done_keys, redone
from pipeline.report import write_report
from pipeline.manifest import WindowConfig, audio_rows, load_excluded_ids, vggsound_rows, youtube_rows
from pipeline.runners import FailureRateExceeded, RunnerOptions, get_runner
from core.version import code_version
from core.stage import FAILED, FILTERED, OK, Row, is_pending

DATASETS = ("vggsound", "youtube", "sample", "audio")
# scores that need a picture: recorded as not applicable (missing) for audio-only corpora, never as failures
VIDEO_ONLY_SCORES = ("av_align", "audio_peaks", "video_peaks", "motion_max", "motion_mean", "scene_cuts", "desync")


class UsageError(Exception):
    """A problem with the command line or the input folders, reported before any work starts."""


def location(text: str) -> Path | str:
    """A local path, or an object-storage URL kept as a string (``Path`` would fold ``s3://``)."""
    return text if storage.is_url(text) else Path(text)


@dataclass(frozen=True)
class RunConfig:
    """How much of the manifest this run takes and how it treats rows scored with other settings."""

    limit: int = field(default=0, metadata={"help": "only the first N manifest items (0: all)"})
    batch_size: int = field(default=8, metadata={"help": "rows per batch handed to a worker"})
    rescore: bool = field(default=False, metadata={
        "help": "recompute journaled rows that were scored with other scoring settings (else the run refuses)"})

    def __post_init__(self) -> None:
        check_count("limit", self.limit)
        check_count("batch_size", self.batch_size, minimum=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.clean", description=__doc__)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--root", type=location, help="dataset folder or URL, e.g. s3://bucket/vggsound "
                   "(default: data/<dataset>)")
    p.add_argument("--out", type=Path, help="output folder (default: out/<dataset>)")
    p.add_argument("--csv", type=location, help="VGGSound CSV (default: ROOT/vggsound.csv)")
    p.add_argument("--video-dir", type=location, help="VGGSound clips folder (default: ROOT/video)")
    p.add_argument("--exclude-ids", type=location,
                   help="YouTube ids to drop as test_leak: a VGGSound CSV (its test split) or one id per line")
    add_config_args(p.add_argument_group("run"), RunConfig)
    add_config_args(p.add_argument_group("engine"), RunnerOptions)
    add_config_args(p.add_argument_group("thresholds"), FilterConfig)
    add_config_args(p.add_argument_group("AV-Align"), AVAlignConfig, prefix="av_align_")
    add_config_args(p.add_argument_group("decoding"), DecodeLimits)
    add_config_args(p.add_argument_group("windows of long files (youtube, audio)"), WindowConfig)
    add_config_args(p.add_argument_group("CLAP"), ClapConfig, prefix="clap_")
    add_config_args(p.add_argument_group("CLAP music rule (speech is decided by the VAD)"), SpeechMusicConfig)
    add_config_args(p.add_argument_group("curation scores"), CurationConfig)
    add_config_args(p.add_argument_group("curation rules"), CurationFilters)
    add_config_args(p.add_argument_group("DeSync (Synchformer; --desync-max filters on it)"), DesyncConfig,
                    prefix="desync_")
    add_config_args(p.add_argument_group("audio quality (audiobox-aesthetics)"), AestheticsConfig, prefix="aes_")
    p.add_argument("--gallery", type=int, default=0, metavar="N",
                   help="write OUT/gallery/index.html with N clips per bucket (default: 0, no gallery)")
    return p


def resolve_paths(args: argparse.Namespace) -> tuple[Path | str, Path]:
    root = args.root or Path("data") / args.dataset
    out = args.out or Path("out") / args.dataset
    if args.dataset == "sample" and not storage.is_url(root) and not root.exists():
        from pipeline.sample import generate

        print(f"sample dataset not found at {root}: generating it", file=sys.stderr)
        generate(root, kind="vggsound")
    if not storage.is_dir(root):
        raise UsageError(f"dataset folder {root} does not exist (looked there for --dataset {args.dataset}; "
                         f"pass --root DIR)")
    return root, out


def build_manifest(args: argparse.Namespace, root: Path | str, signal: SignalConfig) -> list[Row]:
    excluded = load_excluded_ids(args.exclude_ids) if args.exclude_ids else set()
    if args.dataset in ("vggsound", "sample"):
        csv_path = args.csv or storage.join(root, "vggsound.csv")
        if not storage.is_file(csv_path):
            raise UsageError(f"VGGSound CSV {csv_path} not found (pass --csv FILE)")
        rows = vggsound_rows(csv_path, args.video_dir or storage.join(root, "video"), signal, excluded)
    elif args.dataset == "audio":
        try:
            rows = audio_rows(root, signal, from_args(WindowConfig, args), excluded)
        except ValueError as e:  # no caption manifest in the folder
            raise UsageError(str(e)) from e
    else:
        rows = youtube_rows(root, signal, from_args(WindowConfig, args), excluded)
    return rows[: args.limit] if args.limit > 0 else rows


def summarize(ledger: pd.DataFrame, processed: int, seconds: float, video_s: float) -> dict:
    by_status = Counter(ledger["status"])
    by_reason = Counter(r.split(":")[0] for r in ledger.loc[ledger["status"] != OK, "reason"])
    return {
        "total": int(len(ledger)),
        "ok": int(by_status.get(OK, 0)),
        "filtered": int(by_status.get(FILTERED, 0)),
        "failed": int(by_status.get(FAILED, 0)),
        "reasons": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "processed_this_run": processed,
        "clips_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "video_hours_this_run": round(video_s / 3600.0, 4),
    }


def print_summary(summary: dict, out: Path, clap_skipped: bool) -> None:
    print(f"\n== clean summary: {summary['total']} items -> ok {summary['ok']}, "
          f"filtered {summary['filtered']}, failed {summary['failed']}")
    for reason, n in summary["reasons"].items():
        print(f"   {n:6d}  {reason}")
    print(f"   this run: {summary['processed_this_run']} clips, {summary['clips_per_s']} clips/s, "
          f"{summary['video_hours_this_run']} h of video")
    if clap_skipped:
        print("   CLAP was SKIPPED (--clap-model none): clap_score is missing, nothing was filtered on it")
    print(f"   ledger: {out / 'ledger.parquet'}   run: {out / 'run.json'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return clean(args)
    except (UsageError, ClapModelUnavailable, ModelUnavailable, AestheticsUnavailable, FlagError, FolderLocked,
            storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except storage.backend_errors() as e:  # the dataset root or CSV could not be read (endpoint, credentials)
        print(f"error: cannot read the input: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except FailureRateExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def scoring_settings(args: argparse.Namespace, stage_config: CleanStageConfig) -> dict:
    """Every setting that changes a stored score or decision of a row (thresholds excluded)."""
    clap, sm = stage_config.clap, stage_config.speech_music
    settings = {
        "signal": asdict(stage_config.signal),
        # the revision only picks which stored column is `av_align`: switching it re-filters, never rescores
        "av_align": {k: v for k, v in asdict(stage_config.av_align).items() if k != "version"},
        "decode": {k: getattr(stage_config.limits, k) for k in ("min_duration_s", "trimmed_slack_s")},
        "clap": None if clap is None else {k: getattr(clap, k) for k in ("model", "template", "window")},
        "speech_music_prompts": None if sm is None else {
            k: getattr(sm, k) for k in ("speech_prompts", "music_prompts", "event_prompts")},
        "windows": asdict(from_args(WindowConfig, args)) if args.dataset in ("youtube", "audio") else None,
        "curation": stage_config.curation.fingerprint_fields() if stage_config.curation is not None else None,
        "desync": desync_settings(stage_config.desync),
    }
    if stage_config.aesthetics is not None:  # only when on: runs without it keep their fingerprint
        from filters.aesthetics import resolve

        settings["aesthetics"] = {"model": str(resolve(stage_config.aesthetics.model).resolve())}
    return settings


def desync_settings(desync: tuple | None) -> dict | None:
    """What makes a DeSync score: the weights file (name and size; hashing 900 MB each run would cost
    seconds) and the segments per pass (device and chunk do not change the argmax beyond float noise)."""
    if desync is None:
        return None
    path = Path(desync[1])
    return {"weights": path.name, "bytes": path.stat().st_size}


def resolve_desync(filters: FilterConfig, cfg: DesyncConfig) -> tuple[DesyncConfig, str] | None:
    """The DeSync config and weights path when it is scored (--desync-score or --desync-max); a missing
    checkpoint stops the run here, before anything is decoded."""
    if not cfg.score and filters.desync_max is None:
        return None
    entry = require({"synchformer": cfg.weights or None}, cfg.models_dir or None)["synchformer"]
    return cfg, str(entry.path)


def check_settings(scan: pd.DataFrame, settings: dict, registry: SettingsRegistry, out: Path, rescore: bool) -> int:
    """Refuse to resume over rows scored with other settings, unless ``--rescore``; count those rows."""
    fp = fingerprint(settings)
    # a split part is judged with its window: rescoring the window replaces its parts
    stale = scan[(scan["settings_fp"] != fp) & ~redone(scan, RETRYABLE + MANIFEST_REASONS)
                 & (scan["parent_key"] == "")]
    if stale.empty or rescore:
        return len(stale)
    lines = []
    for old_fp, n in stale["settings_fp"].value_counts().items():
        old = registry.get(old_fp) if old_fp else None
        what = ("\n".join(f"     {d}" for d in differences(old, settings)) if old is not None
                else "     (settings not recorded: journaled by an older version)")
        lines.append(f"   {n} row(s) with settings {old_fp or 'unknown'}, which differ in:\n{what}")
    raise UsageError(
        f"{out} holds {len(stale)} row(s) scored with other scoring settings; nothing was decoded.\n"
        + "\n".join(lines) + "\nWays forward:\n"
        "   --rescore   recompute those rows with the new settings, into this folder\n"
        "   --out DIR   write the new results to another folder, keeping these\n"
        "   or rerun with the old settings to resume (threshold changes never need a rescore)")


def plan_resume(rows: list[Row], scan: pd.DataFrame, fp: str) -> tuple[list[Row], list[Row]]:
    """Rows to journal as decided by the manifest, and rows to score; the rest are already done.

    A row counts as done when journaled with these settings and not a retryable failure. Manifest
    decisions (missing file, bad line, ...) are re-made every run: a file may have appeared since.
    A window split at its cuts is redone when one of its parts failed in a way worth retrying.
    """
    done = done_keys(scan, RETRYABLE + MANIFEST_REASONS, fp)
    mine = scan[scan["settings_fp"] == fp]
    # split parts are never manifest rows; a part that failed retryably sends its window back
    done -= set(scan.loc[scan["parent_key"] != "", "key"])
    done -= set(mine.loc[redone(mine, RETRYABLE + MANIFEST_REASONS), "parent_key"])
    journaled = dict(zip(mine["key"], zip(mine["status"], mine["reason"])))
    decided = [r for r in rows if not is_pending(r) and journaled.get(r["key"]) != (r["status"], r["reason"])]
    pending = [r for r in rows if is_pending(r) and r["key"] not in done]
    return decided, pending


def clean(args: argparse.Namespace) -> int:
    signal = SignalConfig()
    run_cfg = from_args(RunConfig, args)
    clap = from_args(ClapConfig, args, prefix="clap_")
    speech_music = from_args(SpeechMusicConfig, args)
    filters = from_args(FilterConfig, args)
    options = from_args(RunnerOptions, args)
    wants_desync = filters.desync_max is not None or from_args(DesyncConfig, args, prefix="desync_").score
    if args.dataset == "audio" and wants_desync:
        raise UsageError("DeSync measures audio-video sync: an audio-only corpus (--dataset audio) has no video")
    aes = from_args(AestheticsConfig, args, prefix="aes_")
    if aes.enabled:  # a wrong checkpoint stops the run here, before anything is decoded
        from filters.aesthetics import AestheticsScorer

        AestheticsScorer(aes).load()
    stage_config = CleanStageConfig(signal=signal, limits=from_args(DecodeLimits, args),
                                    av_align=from_args(AVAlignConfig, args, prefix="av_align_"),
                                    clap=clap if clap.enabled else None,
                                    speech_music=speech_music if clap.enabled else None,
                                    curation=from_args(CurationConfig, args), batch_size=run_cfg.batch_size,
                                    aesthetics=aes if aes.enabled else None,
                                    desync=resolve_desync(filters, from_args(DesyncConfig, args, prefix="desync_")))
    curation = from_args(CurationFilters, args)
    root, out = resolve_paths(args)
    clap_meta = check_available(clap)  # a missing model stops the run here, before anything is decoded
    with FolderLock(out, purpose=f"pipeline.clean --dataset {args.dataset}"):
        return _clean_locked(args, root, out, run_cfg, stage_config, (filters, curation), options,
                             (clap, clap_meta), speech_music)


def _clean_locked(args, root: Path, out: Path, run_cfg: RunConfig, stage_config: CleanStageConfig,
                  rules: tuple[FilterConfig, CurationFilters], options: RunnerOptions,
                  clap_and_meta: tuple[ClapConfig, dict | None], speech_music: SpeechMusicConfig) -> int:
    """The run itself, with OUT locked: check settings, resume, score, filter, finalize."""
    clap, clap_meta = clap_and_meta
    signal = stage_config.signal
    filters, curation = rules
    settings = scoring_settings(args, stage_config)
    fp = fingerprint(settings)
    ledger = Ledger(out, settings_fp=fp)
    registry = SettingsRegistry(ledger.parts_dir / "settings.json")
    scan = ledger.scan()
    stale = check_settings(scan, settings, registry, out, run_cfg.rescore)
    registry.record(settings)
    rule = speech_music if speech_music.enabled_for(args.dataset) else None
    rows = build_manifest(args, root, signal)
    decided, pending = plan_resume(rows, scan, fp)
    skipped = len(rows) - len(decided) - len(pending)
    if stale:
        print(f"rescoring: {stale} journaled row(s) were scored with other settings and are recomputed")
    if skipped:
        print(f"resuming: {skipped} of {len(rows)} items already in {ledger.parts_dir}")
    ledger.append(decided)

    bar = tqdm(total=len(pending), desc="clean", unit="clip", dynamic_ncols=True)

    def on_batch(batch: list[Row]) -> None:
        bar.update(len(batch))

    t0 = time.perf_counter()
    try:
        get_runner(options.runner)(pending, build_clean_stages, stage_config, ledger.append,
                                   batch_size=run_cfg.batch_size, options=options, on_batch=on_batch)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    keys = {r["key"] for r in rows}
    journal = current_rows(ledger.compact(), keys, fp)
    # hours from the journal, not from on_batch: remote Beam workers journal batches the driver never sees
    ran_keys = {r["key"] for r in pending}
    ran = journal[(journal["key"].isin(ran_keys) | journal["parent_key"].isin(ran_keys)) & (journal["status"] == OK)]
    video_s = float(ran["duration_s"].fillna(0.0).sum())
    # both revisions are stored: the selected one becomes av_align, so switching re-filters without rescoring
    journal = select_version(journal, stage_config.av_align.version)
    final = apply_filters(journal, filters, rule, curation, args.dataset)
    missing = keys - set(final["key"])
    if missing:  # every input item must be accounted for; a gap means a runner lost rows
        raise RuntimeError(f"{len(missing)} items have no ledger row (e.g. {sorted(missing)[:3]}); rerun to resume")
    summary = summarize(final, len(pending), seconds, video_s)
    meta = _run_record(args, root, options, stage_config, (filters, curation), (clap, clap_meta),
                       (speech_music, rule is not None), fp, summary)
    ledger.write_final(final, meta)
    report = write_report(final, meta, out / "report.html")
    if args.gallery:
        print(f"   gallery: {_gallery(final, meta, out, args.gallery, stage_config, filters, curation)}")
    print_summary(summary, out, clap_skipped=not clap.enabled)
    if meta["not_applicable"]:
        print(f"   not applicable to an audio-only corpus (left empty): {', '.join(meta['not_applicable'])}")
    if not clap.enabled and args.dataset == "youtube":
        print("   speech/music filter did NOT run: it needs CLAP embeddings")
    print(f"   report: {report}")
    return 0


def _run_record(args, root: Path, options: RunnerOptions, stage_config: CleanStageConfig,
             rules: tuple[FilterConfig, CurationFilters], clap_and_meta: tuple[ClapConfig, dict | None],
             speech_music_rule: tuple[SpeechMusicConfig, bool], fp: str, summary: dict) -> dict:
    """run.json: every setting that made the ledger, the counts and what does not apply."""
    filters, curation = rules
    clap, clap_meta = clap_and_meta
    speech_music, rule_enabled = speech_music_rule
    signal = stage_config.signal
    return {
        "dataset": args.dataset, "root": str(root), "runner": options.runner,
        "filters": asdict(filters), "av_align": asdict(stage_config.av_align),
        "av_align_version": stage_config.av_align.version,
        "av_align_revisions": av_align_metadata(stage_config.av_align)["revisions"],
        "signal": asdict(signal), "clap": {**run_metadata(clap), **(clap_meta or {})}, "clap_skipped": not clap.enabled,
        "speech_music": {**asdict(speech_music), "enabled": rule_enabled},
        "curation": asdict(stage_config.curation),
        "desync": None if stage_config.desync is None else {**asdict(stage_config.desync[0]),
                                                            "weights_path": stage_config.desync[1]},
        "curation_rules": {**asdict(curation), "enabled": {name: curation.enabled(name, args.dataset)
                                                           for name in ("speech", "silent", "static", "quality")}},
        "aesthetics": asdict(stage_config.aesthetics) if stage_config.aesthetics is not None else None,
        "settings_fp": fp, "code_version": code_version(),
        "counts": {k: summary[k] for k in ("total", "ok", "filtered", "failed")},
        "reasons": summary["reasons"],
        "not_applicable": list(VIDEO_ONLY_SCORES) if args.dataset == "audio" else [],
    }


def _gallery(final: pd.DataFrame, meta: dict, out: Path, per_bucket: int, stage_config: CleanStageConfig,
             filters: FilterConfig, curation: CurationFilters) -> Path:
    from pipeline.gallery import write_gallery

    thresholds = {"av_align": filters.av_align_min, "clap_score": filters.clap_min,
                  "speech_share": curation.speech_share_max, "silent_share": curation.silent_share_max,
                  "motion_max": curation.static_motion_max}
    return write_gallery(final, meta, out / "gallery", per_bucket, stage_config.av_align, thresholds,
                         stage_config.limits)


if __name__ == "__main__":
    sys.exit(main())
