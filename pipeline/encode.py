"""``python -m pipeline.encode``: ledger (+ augmentation plan) -> CLIP/VAE features -> WebDataset shards.

Encodes every ``ok`` ledger row and every plan row into ``OUT/shards/{split}-{index:06d}.tar``
(DESIGN.md section 3) and writes ``index.json`` (name, split, count, bytes, sha256 of every
shard), ``card.json`` (encoders and weight hashes, signal and mel parameters, thresholds,
counts) and ``failed.json`` (every sample that could not be encoded, with its reason).

Resumable: encoded samples are cached under ``OUT/shards/.work`` as they finish and shards are
written atomically as soon as their samples are all settled, so a rerun of a killed command
skips finished shards and cached samples and produces the same bytes as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from core.version import code_version
from core.cli_config import add_config_args, from_args
from core.config import DEFAULT_SIGNAL, DecodeLimits
from core.jsonsafe import json_safe
from core.keys import is_safe, sanitize
from core.atomic import atomic_write_text
from augment.render import render_row
from pipeline.ledger import read_ledger
from pipeline.runners import RunnerOptions, get_runner
from core.stage import OK, PENDING, Row
from shards.config import MEMBER_ORDER, EncoderConfig, MelConfig, ShardConfig, latent_shape
from shards.encode_stage import KIND_CLIP, EncodeStageConfig, build_encode_stages
from shards.encoders import ModelLoadError, ResolvedModel, resolve_pretrained
from shards.random_models import build_random_clip, build_random_vae, is_random
from shards.shard_writer import SampleCache, ShardAssembler, ShardError, write_index

CARD_FORMAT = "v2a-shards/1"


class UsageError(Exception):
    """A problem with the command line or its inputs, reported before any work starts."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", type=Path, required=True, help="OUT/ledger.parquet from pipeline.clean")
    p.add_argument("--plan", type=Path, help="OUT/plan.parquet from pipeline.augment (optional)")
    p.add_argument("--out", type=Path, help="shard folder (default: shards/ next to the ledger)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch handed to a worker")
    add_config_args(p.add_argument_group("encoders"), EncoderConfig)
    add_config_args(p.add_argument_group("shards"), ShardConfig)
    add_config_args(p.add_argument_group("engine"), RunnerOptions)
    return p


# ---------------------------------------------------------------------------------------------
# work items

def ledger_rows(ledger: pd.DataFrame) -> list[Row]:
    rows = []
    for rec in ledger[ledger["status"] == OK].to_dict("records"):
        row = json_safe(rec)
        row.update(kind=KIND_CLIP, status=PENDING, reason="", ledger_status=OK)
        rows.append(row)
    return rows


def plan_rows(path: Path) -> tuple[list[Row], list[Row], dict]:
    """Valid recipes as work rows, invalid ones as failed rows (with the planner's reason)."""
    from augment.recipe import PlanError, Recipe, read_plan

    try:
        plan, meta = read_plan(path)
    except PlanError as e:
        raise UsageError(str(e)) from e
    rows, bad = [], []
    for rec in plan.to_dict("records"):
        try:
            row = Recipe.from_row(rec).as_row()
        except PlanError as e:
            bad.append({"key": str(rec.get("key") or ""), "split": str(rec.get("split") or ""),
                        "reason": f"plan_error: {e}"})
            continue
        row.update(status=PENDING, reason="")
        rows.append(row)
    return rows, bad, meta


def assign_keys(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """Make every key a safe WebDataset key; a duplicate (after sanitising) fails, already-safe keys win."""
    seen: set[str] = set()
    kept, dup = [], []
    for row in sorted(rows, key=lambda r: (not is_safe(str(r["key"])), str(r["key"]), str(r.get("kind")))):
        original = str(row["key"])
        key = original if is_safe(original) else sanitize(original)
        if key in seen:
            dup.append({"key": key, "split": row.get("split") or "",
                        "reason": f"duplicate_key: {original!r} collides with an earlier sample key"})
            continue
        seen.add(key)
        if key != original:
            row["original_key"] = original
        row["key"] = key
        kept.append(row)
    return kept, dup


# ---------------------------------------------------------------------------------------------
# models

def resolve_models(enc: EncoderConfig, work_dir: Path) -> tuple[EncoderConfig, ResolvedModel, ResolvedModel, str]:
    """Find both models before any work starts; for the demo only, fall back to random weights."""
    try:
        clip = resolve_pretrained(enc.clip_model)
        vae = resolve_pretrained(enc.vae, pipeline_subfolder="vae")
        return enc, clip, vae, ""
    except ModelLoadError as e:
        if not enc.allow_random_weights:
            raise
        reason = str(e)
    folder = (work_dir / "random-models").resolve()
    clip_dir, vae_dir = folder / "clip", folder / "vae"
    if not is_random(clip_dir):
        build_random_clip(clip_dir, size="tiny", projection_dim=768)
    if not is_random(vae_dir):
        build_random_vae(vae_dir, size="tiny")
    enc = replace(enc, clip_model=str(clip_dir), vae=str(vae_dir))
    return enc, resolve_pretrained(enc.clip_model), resolve_pretrained(enc.vae, pipeline_subfolder="vae"), reason


def random_weights_banner(reason: str) -> str:
    bar = "!" * 96
    return (f"{bar}\n!!! RANDOM WEIGHTS: the real CLIP / AudioLDM VAE weights could not be loaded, so these shards\n"
            f"!!! hold features from TINY RANDOM-WEIGHT models (--allow-random-weights). They are good for a\n"
            f"!!! demo of the data flow and NOTHING else; card.json says random_weights: true.\n"
            f"!!! cause: {reason[:300]}\n{bar}")


# ---------------------------------------------------------------------------------------------
# dataset card

def build_card(enc: EncoderConfig, clip: ResolvedModel, vae: ResolvedModel, hashes: dict, mel: MelConfig,
               shards, counts: dict, run_meta: dict, plan_meta: dict | None, random_reason: str,
               shard_cfg: ShardConfig) -> dict:
    clip_cfg = clip.config()
    vision = clip_cfg.get("vision_config", clip_cfg)
    text = clip_cfg.get("text_config", {})
    vae_cfg = vae.config()
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    random_weights = is_random(clip.path) or is_random(vae.path)
    card = {
        "format": CARD_FORMAT,
        "code_version": code_version(),
        "random_weights": random_weights,
        "clip_model": enc.clip_model,
        "clip_weights_sha256": hashes["clip"],
        "clip_normalize": enc.clip_normalize,
        "clip_pixel_range": "CLIP mean/std normalised" if enc.clip_normalize else "[0, 1] (VTA-LDM release)",
        "clip_fps": DEFAULT_SIGNAL.clip_fps,
        "clip_image_size": int(vision.get("image_size", 224)),
        "clip_resize": "short side to image_size, bicubic (antialiased), centre crop",
        "clip_dim": int(vision.get("projection_dim", clip_cfg.get("projection_dim", 0))),
        "clip_feature": "CLIPVisionModelWithProjection.image_embeds, one token per frame",
        "text_model": enc.clip_model,
        "text_dim": int(text.get("projection_dim", clip_cfg.get("projection_dim", 0))),
        "text_feature": "CLIPTextModelWithProjection.text_embeds of the caption (label when empty)",
        "vae_model": enc.vae,
        "vae_weights_sha256": hashes["vae"],
        "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 1.0)),
        "latent_shape": list(latent_shape(int(vae_cfg["latent_channels"]), mel, down)),
        "latent_dtype": "float16",
        "latent_layout": "[posterior mean, posterior std] of AutoencoderKL.encode(mel [1, frames, n_mels])",
        "sample_rate": mel.sample_rate,
        "audio_seconds": mel.seconds,
        "window_s": DEFAULT_SIGNAL.window_s,
        "audio_member": "audio.flac: 16-bit mono at sample_rate, the decoded window (not padded)",
        "mel": {**asdict(mel), "layout": "[n_mels, frames]", "window": "hann (periodic)", "center": True,
                "pad_mode": "reflect", "mel_scale": "slaney", "mel_norm": "slaney", "magnitude": True},
        "with_mel": enc.with_mel,
        "members": [m for m in MEMBER_ORDER if enc.with_mel or m != "mel.npy"],
        "thresholds": run_meta.get("filters", run_meta.get("thresholds")),
        "ledger_run": {k: run_meta.get(k) for k in ("dataset", "code_version", "counts", "clap", "clap_skipped")
                       if k in run_meta},
        "augmentation_plan": plan_meta,
        "shard_size": shard_cfg.shard_size,
        "shards": len(shards),
        **counts,
    }
    if random_weights:
        card["random_weights_reason"] = random_reason or "weights were built by shards.random_models"
    return card


# ---------------------------------------------------------------------------------------------
# the command

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return encode(args)
    except (UsageError, ModelLoadError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def collect_work(args: argparse.Namespace) -> tuple[list[Row], list[Row], int, int, dict, dict | None]:
    """Work rows (ok ledger clips + valid recipes, safe unique keys), rows failed up front, counts, metadata."""
    ledger, run_meta = read_ledger(args.ledger)
    if not run_meta and (args.ledger.parent / "run.json").is_file():
        run_meta = json.loads((args.ledger.parent / "run.json").read_text())
    work = ledger_rows(ledger)
    n_ledger = len(work)
    pre_failed: list[Row] = []
    plan_meta = None
    if args.plan:
        rows, bad, plan_meta = plan_rows(args.plan)
        work += rows
        pre_failed += bad
    n_plan = len(work) - n_ledger + len(pre_failed)  # every recipe, valid or not
    work, dup = assign_keys(work)
    for row in work:
        row["split"] = str(row.get("split") or "train")
    return work, pre_failed + dup, n_ledger, n_plan, run_meta, plan_meta


def check_settings(work_dir: Path, settings: dict) -> None:
    """Cached samples are only reused by a run that would encode them the same way."""
    path = work_dir / "settings.json"
    text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() != text:
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise UsageError(f"{work_dir.parent} holds samples encoded with other settings ({', '.join(changed)}); "
                         f"encode into a new --out folder (or delete this one)")
    atomic_write_text(path, text)


def encode(args: argparse.Namespace) -> int:
    if not args.ledger.is_file():
        raise UsageError(f"ledger {args.ledger} not found (run python -m pipeline.clean first)")
    out: Path = args.out or args.ledger.parent / "shards"
    enc = from_args(EncoderConfig, args)
    shard_cfg = from_args(ShardConfig, args)
    options = from_args(RunnerOptions, args)
    mel = MelConfig.from_signal(DEFAULT_SIGNAL)
    work, pre_failed, n_ledger, n_plan, run_meta, plan_meta = collect_work(args)

    out.mkdir(parents=True, exist_ok=True)
    cache = SampleCache(out)
    removed = cache.clean_partials()
    if removed:
        print(f"removed {removed} partial file(s) left by an interrupted run")
    splits: dict[str, list[str]] = {}
    for row in work:
        splits.setdefault(row["split"], []).append(row["key"])
    assembler = ShardAssembler(out, splits, shard_cfg.shard_size, cache)

    enc, clip_model, vae_model, random_reason = resolve_models(enc, cache.root)
    if random_reason or is_random(clip_model.path) or is_random(vae_model.path):
        print(random_weights_banner(random_reason or "random-weight folders were passed explicitly"), flush=True)
    hashes = {"clip": clip_model.weight_hashes(), "vae": vae_model.weight_hashes()}
    check_settings(cache.root, {"clip_weights_sha256": hashes["clip"], "vae_weights_sha256": hashes["vae"],
                                "clip_normalize": enc.clip_normalize, "with_mel": enc.with_mel,
                                "mel": asdict(mel), "signal": asdict(DEFAULT_SIGNAL),
                                "shard_size": shard_cfg.shard_size})
    image_size = int(clip_model.config().get("vision_config", clip_model.config()).get("image_size", 224))
    stage_config = EncodeStageConfig(encoders=enc, mel=mel, signal=DEFAULT_SIGNAL, limits=DecodeLimits(),
                                     clip_image_size=image_size, batch_size=args.batch_size, render=render_row)

    assembler.advance()  # a resumed run first finishes what the cache already holds
    pending = assembler.pending_keys()
    todo = sorted((r for r in work if r["key"] in pending), key=lambda r: (r["split"], r["key"]))
    if len(todo) < len(work):
        print(f"resuming: {len(work) - len(todo)} of {len(work)} samples already encoded or in finished shards "
              f"({len(assembler.skipped)} shard(s) skipped)")

    bar = tqdm(total=len(todo), desc="encode", unit="sample", dynamic_ncols=True)

    def on_batch(batch: list[Row]) -> None:
        bar.update(len(batch))
        assembler.advance()

    t0 = time.perf_counter()
    if todo:
        get_runner(options.runner)(todo, build_encode_stages, stage_config, cache, batch_size=args.batch_size,
                                   options=options, on_batch=on_batch)
    seconds = time.perf_counter() - t0
    bar.close()
    assembler.advance(final=True)

    shards = assembler.index()
    failed = [cache.failure(k) for ks in splits.values() for k in ks if cache.status(k) == "failed"]
    failed = sorted(failed + pre_failed, key=lambda r: r["key"])
    per_split = {split: 0 for split in sorted(splits)}
    for s in shards:
        per_split[s.split] += s.count
    counts = {
        "counts": per_split,
        "samples": sum(per_split.values()),
        "from_ledger": n_ledger,
        "from_plan": n_plan,
        "failed": len(failed),
        "failed_reasons": dict(sorted(Counter(r["reason"].split(":")[0] for r in failed).items())),
    }
    atomic_write_text(out / "failed.json", json.dumps(failed, indent=1, sort_keys=True) + "\n")
    write_index(out, shards)
    card = build_card(enc, clip_model, vae_model, hashes, mel, shards, counts, run_meta, plan_meta, random_reason,
                      shard_cfg)
    atomic_write_text(out / "card.json", json.dumps(card, indent=1, sort_keys=True) + "\n")

    stale = assembler.stale_shards()
    print(f"\n== encode summary: {len(work)} samples ({n_ledger} ledger clips, {counts['from_plan']} recipes) -> "
          f"{counts['samples']} encoded in {len(shards)} shard(s), {len(failed)} failed")
    for reason, n in counts["failed_reasons"].items():
        print(f"   {n:6d}  {reason}")
    print(f"   this run: {len(todo)} samples in {seconds:.1f}s, {len(assembler.written)} shard(s) written, "
          f"{len(assembler.skipped)} skipped (already finished)")
    if stale:
        print(f"   WARNING: {len(stale)} .tar file(s) in {out} are not in index.json (e.g. {stale[0].name})")
    if card["random_weights"]:
        print("   RANDOM WEIGHTS: features are from random-weight models (card.json random_weights: true)")
    print(f"   shards: {out}   index: {out / 'index.json'}   card: {out / 'card.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
