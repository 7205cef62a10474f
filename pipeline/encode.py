"""``python -m pipeline.encode``: ledger (+ augmentation plan) -> CLIP/VAE features -> WebDataset shards.

Encodes every ``ok`` ledger row and every plan row into ``OUT/shards/{split}-{index:06d}.tar``
and writes ``index.json`` (name, split, count, bytes, sha256 of every shard), ``card.json``
(encoders and weight hashes, signal and mel parameters, thresholds, counts) and ``failed.json``
(every sample that could not be encoded, with its reason). docs/formats.md describes each file.

Resumable: encoded samples are cached under ``OUT/shards/.work`` under the fingerprint of what
made them, and shards are written atomically as soon as their samples are all settled, so a rerun
of a killed command skips finished shards and cached samples and produces the same bytes as an
uninterrupted run; a sample whose ledger row or recipe changed is encoded again, and so is one
whose last attempt failed in a way a retry may not repeat (``pipeline.ledger.RETRYABLE``: a
crashed worker, an unexpected stage error, a decode timeout). Exit status: 0 when samples were
encoded, 1 when nothing could be or the failure-rate breaker stopped the run, 2 for bad flags or
inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from augment.render import render_row
from core import storage
from core.atomic import atomic_write_text
from core.cli_config import FlagError, add_config_args, from_args
from core.config import DEFAULT_SIGNAL, DecodeLimits
from core.fingerprint import differences
from core.lock import FolderLock, FolderLocked
from core.models import ModelUnavailable
from core.stage import Row
from pipeline.encode_models import Models, random_weights_banner, resolve_models
from pipeline.encode_work import UsageError, Work, collect_work, fingerprint_rows
from pipeline.ledger import RETRYABLE, LedgerError
from pipeline.runners import FailureRateExceeded, RunnerOptions, get_runner
from shards.card import CardError, Counts, build_card
from shards.config import EncoderConfig, MelConfig, ShardConfig
from shards.encode_stage import EncodeStageConfig, build_encode_stages
from shards.publish import check_destination, publish
from shards.shard_writer import SampleCache, ShardAssembler, ShardError, write_index

CACHE_FORMAT = 3  # 2: samples cached and shards recorded under their fingerprints; 3: vision-<encoder>.npy members


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", type=Path, required=True, help="OUT/ledger.parquet from pipeline.clean")
    p.add_argument("--plan", type=Path, help="OUT/plan.parquet from pipeline.augment (optional)")
    p.add_argument("--out", help="shard folder, or an object-storage URL such as s3://bucket/shards "
                   "(default: shards/ next to the ledger)")
    p.add_argument("--staging", type=Path, help="with a URL --out: the local folder where shards are assembled "
                   "and cached before upload (default: shards-staging/ next to the ledger)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch handed to a worker")
    add_config_args(p.add_argument_group("encoders"), EncoderConfig)
    add_config_args(p.add_argument_group("shards"), ShardConfig)
    add_config_args(p.add_argument_group("feature audio"), MelConfig, prefix="mel_",
                    skip=tuple(f.name for f in fields(MelConfig) if f.name != "resampler"))
    add_config_args(p.add_argument_group("engine"), RunnerOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:  # before the lock: a refused flag leaves nothing behind
            raise FlagError(f"--batch-size: must be a whole number >= 1, got {args.batch_size}")
        with FolderLock(local_folder(args), purpose="pipeline.encode"):  # the local folder the shards are built in
            return encode(args)
    except (UsageError, ModelUnavailable, ShardError, CardError, LedgerError, FolderLocked, FlagError,
            storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FailureRateExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def encoder_settings(models: Models, mel: MelConfig, shard_cfg: ShardConfig, audio_only: bool = False) -> dict:
    """Everything besides a sample's own inputs that changes its bytes or the shard layout."""
    hashes, enc = models.weight_hashes(), models.encoders
    extra = {"audio_only": True} if audio_only else {}  # absent for video sets: their settings stay as they were
    # an audio-only set computes no vision features or flow: their settings do not apply to it
    vision = {} if audio_only else {e: {"weights_sha256": hashes["clip" if e == "clip" else f"vision_{e}"],
                                        "fps": enc.fps_of(e)} for e in enc.encoders}
    flow = {"pair_fps": enc.flow_pair_fps, "min_scale": enc.flow_min_scale} if enc.with_flow and not audio_only else None
    return {**extra, "cache_format": CACHE_FORMAT, "clip_weights_sha256": hashes["clip"],
            "vae_weights_sha256": hashes["vae"], "clip_normalize": enc.clip_normalize, "with_mel": enc.with_mel,
            "vision": vision, "flow": flow,
            "mel": asdict(mel), "signal": asdict(DEFAULT_SIGNAL), "shard_size": shard_cfg.shard_size}


def check_settings(work_dir: Path, settings: dict) -> None:
    """A folder holds samples of one encoder setting: another one is refused, naming what differs."""
    path = work_dir / "settings.json"
    text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() != text:
        changed = differences(json.loads(path.read_text()), settings)
        shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
        raise UsageError(f"{work_dir.parent} holds samples encoded with other settings ({shown}); "
                         f"encode into a new --out folder (or delete this one)")
    atomic_write_text(path, text)


@dataclass(frozen=True)
class EncodeRun:
    """A run made ready: the work, the models, the cache and the shard layout."""

    out: Path
    work: Work
    models: Models
    cache: SampleCache
    assembler: ShardAssembler
    splits: dict[str, list[str]]


def destination(args: argparse.Namespace) -> str:
    """Where the shards end up: a local folder, or an object-storage URL they are published to."""
    return args.out or str(args.ledger.parent / "shards")


def local_folder(args: argparse.Namespace) -> Path:
    """Where the shards are assembled: the output folder itself, or the staging folder of a URL."""
    if storage.is_url(destination(args)):
        return args.staging or args.ledger.parent / "shards-staging"
    return Path(destination(args))


def is_audio_only(work: Work) -> bool:
    """A ledger of an audio-only corpus (``pipeline.clean --dataset audio``): shards without video members."""
    return work.run_meta.get("dataset") == "audio"


def prepare(args: argparse.Namespace, enc: EncoderConfig, shard_cfg: ShardConfig, mel: MelConfig) -> EncodeRun:
    """Check the inputs, find the models, fingerprint every sample and set up cache and layout."""
    work = collect_work(args.ledger, args.plan)
    out = local_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    cache = SampleCache(out)
    removed = cache.clean_partials()
    if removed:
        print(f"removed {removed} temporary file(s) left by an interrupted run")
    models = resolve_models(enc, cache.root)
    if models.random:
        print(random_weights_banner(models.random_reason or "random-weight folders were passed explicitly"),
              flush=True)
    settings = encoder_settings(models, mel, shard_cfg, is_audio_only(work))
    check_settings(cache.root, settings)
    fps = fingerprint_rows(work.rows, settings)
    stale = cache.drop_stale(fps)
    if stale:
        print(f"dropped {stale} cached sample(s) made from other inputs (a changed ledger row or recipe)")
    retried = cache.drop_failures(RETRYABLE)
    if retried:
        print(f"retrying {len(retried)} sample(s) whose last attempt failed with {', '.join(RETRYABLE)} "
              f"(e.g. {retried[0]})")
    splits: dict[str, list[str]] = {}
    for row in work.rows:
        splits.setdefault(row["split"], []).append(row["key"])
    assembler = ShardAssembler(out, splits, shard_cfg.shard_size, fps, cache)
    return EncodeRun(out, work, models, cache, assembler, splits)


def run_encoders(run: EncodeRun, args: argparse.Namespace, mel: MelConfig,
                 options: RunnerOptions) -> tuple[int, float]:
    """Encode every sample not yet in the cache or a finished shard; returns (samples, seconds)."""
    stage_config = EncodeStageConfig(encoders=run.models.encoders, mel=mel, signal=DEFAULT_SIGNAL,
                                     limits=DecodeLimits(), clip_image_size=run.models.clip_image_size(),
                                     image_sizes=run.models.image_sizes(),
                                     batch_size=args.batch_size, render=render_row,
                                     audio_only=is_audio_only(run.work))
    assembler = run.assembler
    assembler.advance()  # a resumed run first finishes what the cache already holds
    pending = assembler.pending_keys()
    todo = sorted((r for r in run.work.rows if r["key"] in pending), key=lambda r: (r["split"], r["key"]))
    if len(todo) < len(run.work.rows):
        print(f"resuming: {len(run.work.rows) - len(todo)} of {len(run.work.rows)} samples already encoded or "
              f"in finished shards ({len(assembler.skipped)} shard(s) skipped)")
    bar = tqdm(total=len(todo), desc="encode", unit="sample", dynamic_ncols=True)

    def on_batch(batch: list[Row]) -> None:
        bar.update(len(batch))
        assembler.advance()

    t0 = time.perf_counter()
    if todo:
        get_runner(options.runner)(todo, build_encode_stages, stage_config, run.cache, batch_size=args.batch_size,
                                   options=options, on_batch=on_batch)
    bar.close()
    assembler.advance(final=True)
    return len(todo), time.perf_counter() - t0


def count(run: EncodeRun, failed: list[dict]) -> Counts:
    per_split = {split: 0 for split in sorted(run.splits)}
    for s in run.assembler.index():
        per_split[s.split] += s.count
    return Counts(counts=per_split, samples=sum(per_split.values()), from_ledger=run.work.n_ledger,
                  from_plan=run.work.n_plan, failed=len(failed),
                  failed_reasons=dict(sorted(Counter(r["reason"].split(":")[0] for r in failed).items())))


def summarise(run: EncodeRun, counts: Counts, todo: int, seconds: float) -> None:
    asm, out = run.assembler, run.out
    print(f"\n== encode summary: {len(run.work.rows)} samples ({counts.from_ledger} ledger clips, "
          f"{counts.from_plan} recipes) -> {counts.samples} encoded in {len(asm.index())} shard(s), "
          f"{counts.failed} failed")
    for reason, n in counts.failed_reasons.items():
        print(f"   {n:6d}  {reason}")
    print(f"   this run: {todo} samples in {seconds:.1f}s, {len(asm.written)} shard(s) written, "
          f"{len(asm.skipped)} skipped (already finished), {len(asm.restored)} rebuilt (samples changed)")
    stale = asm.stale_shards()
    if stale:
        print(f"   WARNING: {len(stale)} .tar file(s) in {out} are not in index.json (e.g. {stale[0].name})")
    if run.models.random:
        print("   RANDOM WEIGHTS: features are from random-weight models (card.json random_weights: true)")
    print(f"   shards: {out}   index: {out / 'index.json'}   card: {out / 'card.json'}")


def encode(args: argparse.Namespace) -> int:
    enc, shard_cfg = from_args(EncoderConfig, args), from_args(ShardConfig, args)
    options = from_args(RunnerOptions, args)
    mel = MelConfig.from_signal(DEFAULT_SIGNAL, resampler=args.mel_resampler)
    remote = destination(args) if storage.is_url(destination(args)) else ""
    if remote:
        check_destination(remote)  # a wrong endpoint or missing credentials fail now, not after the work
    run = prepare(args, enc, shard_cfg, mel)
    if is_audio_only(run.work) and run.work.n_plan:
        raise UsageError("an augmentation plan needs video; this ledger is an audio-only corpus (--dataset audio)")
    todo, seconds = run_encoders(run, args, mel, options)

    failed = sorted(run.assembler.failures() + run.work.pre_failed, key=lambda r: r["key"])
    counts = count(run, failed)
    atomic_write_text(run.out / "failed.json", json.dumps(failed, indent=1, sort_keys=True) + "\n")
    shards = run.assembler.index()
    write_index(run.out, shards)
    card = build_card(run.models.encoders, run.models.clip, run.models.vae, run.models.weight_hashes(), mel,
                      shard_cfg, len(shards), counts, run.work.run_meta, run.work.plan_meta,
                      run.models.random_reason, audio_only=is_audio_only(run.work),
                      vision={} if is_audio_only(run.work) else
                      {e: run.models.describe(e) for e in run.models.encoders.encoders})
    atomic_write_text(run.out / "card.json", card.to_json())
    summarise(run, counts, todo, seconds)
    if remote and counts.samples:
        sent = publish(run.out, remote, shards)
        kept = f" ({sent.kept} already there from an interrupted upload)" if sent.kept else ""
        print(f"   published to {remote}: " + ("already there, unchanged" if sent.unchanged else
                                               f"{sent.uploaded} shard(s){kept}, then card.json and index.json"))
    if counts.samples == 0:
        print(f"error: nothing could be encoded ({counts.failed} failed, see {run.out / 'failed.json'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
