"""``python -m pipeline.augment``: plan augmentation recipes from a ledger, or render one to mp4.

    python -m pipeline.augment plan --ledger OUT/ledger.parquet [--out OUT/plan.parquet]
        [--concat-per-clip K] [--stretch-rates 0.8,1.25 | --stretch-range 0.8:1.25] [--seed S]
    python -m pipeline.augment render --plan OUT/plan.parquet (--key KEY | --kind concat|stretch)
        --out sample.mp4

``plan`` writes recipes (which source span plays where, at which rate), not videos; the encode
stage renders them on the fly. ``render`` writes one recipe as an mp4 (H.264 + lossless FLAC)
to watch.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pyarrow as pa

from augment.config import AugmentConfig, AugmentConfigError
from augment.plan import LedgerError, build_plan, plan_meta
from augment.recipe import PlanError, Recipe, find_recipe, read_plan, write_plan
from augment.render import render_mp4
from core.cli_config import add_config_args, from_args
from core.config import DecodeLimits
from core.decode import DecodeError
from pipeline.ledger import LedgerError as ReadLedgerError, read_ledger
from core.version import code_version

_FIELDS = {f.name: f for f in AugmentConfig.__dataclass_fields__.values()}


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates like 0.8,1.25, got {text!r}") from None


def _range(text: str) -> tuple[float, float]:
    parts = text.split(":")
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI like 0.8:1.25, got {text!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("plan", help="write OUT/plan.parquet from OUT/ledger.parquet")
    pp.add_argument("--ledger", required=True, type=Path, help="ledger written by python -m pipeline.clean")
    pp.add_argument("--out", type=Path, default=None, help="plan file (default: plan.parquet beside the ledger)")
    add_config_args(pp.add_argument_group("augmentation"), AugmentConfig,
                    skip=("signal", "stretch_rates", "stretch_range"))
    rates = pp.add_mutually_exclusive_group()
    default_rates = ",".join(str(r) for r in _FIELDS["stretch_rates"].default)
    rates.add_argument("--stretch-rates", dest="rates_flag", type=_rates, default=None, metavar="R1,R2,...",
                       help=f"{_FIELDS['stretch_rates'].metadata['help']} (default: {default_rates})")
    rates.add_argument("--stretch-range", dest="range_flag", type=_range, default=None, metavar="LO:HI",
                       help=_FIELDS["stretch_range"].metadata["help"])

    rp = sub.add_parser("render", help="render one recipe to an mp4 with sound")
    rp.add_argument("--plan", required=True, type=Path, help="plan written by the plan command")
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="recipe key, e.g. cat-KEYA-KEYB or KEY-ts125")
    which.add_argument("--kind", choices=("concat", "stretch"), help="render the first recipe of this kind")
    rp.add_argument("--out", required=True, type=Path, help="mp4 to write")
    rp.add_argument("--sample-rate", type=int, default=None,
                    help="mono audio at this rate (default: the first source's own rate and channels)")
    rp.add_argument("--fps", type=float, default=None,
                    help="frame rate (default: the recipe's native rate, every source frame shown once)")
    rp.add_argument("--stretch-method", choices=("resample", "wsola"), default=None,
                    help="override the recipe's audio stretch method")
    return p


def plan_command(args: argparse.Namespace) -> int:
    overrides = {}
    if args.rates_flag is not None:
        overrides["stretch_rates"] = args.rates_flag
    if args.range_flag is not None:
        overrides["stretch_range"] = args.range_flag
    cfg = from_args(AugmentConfig, args, **overrides)
    if not args.ledger.is_file():
        raise LedgerError(f"ledger not found: {args.ledger} (run python -m pipeline.clean first)")
    try:
        ledger, _ = read_ledger(args.ledger)
    except (pa.ArrowInvalid, OSError, ReadLedgerError) as e:
        raise LedgerError(f"{args.ledger} is not a readable ledger: {e}") from e
    out = args.out or args.ledger.with_name("plan.parquet")
    recipes, summary = build_plan(ledger, cfg, progress=True)
    write_plan(out, recipes, plan_meta(cfg, str(args.ledger), summary, code_version()))
    print("== augment plan: " + "\n".join(summary.lines()))
    print(f"wrote {out}")
    return 0


def render_command(args: argparse.Namespace) -> int:
    plan, _ = read_plan(args.plan)
    if args.key:
        recipe = find_recipe(plan, args.key)
    else:
        rows = plan[plan["kind"] == args.kind].sort_values("key")
        if rows.empty:
            raise PlanError(f"{args.plan} has no {args.kind} recipe")
        recipe = Recipe.from_row(rows.iloc[0].to_dict())
    if args.stretch_method:
        recipe = dataclasses.replace(recipe, stretch_method=args.stretch_method)
    clip = render_mp4(recipe, args.out, sample_rate=args.sample_rate, fps=args.fps, limits=DecodeLimits())
    fps = args.fps or clip.video_fps
    print(f"wrote {args.out}: {recipe.kind} {recipe.key}, {recipe.duration_s:.2f}s "
          f"(target {recipe.target_s:.2f}s), {fps:g} fps, {args.sample_rate or clip.native_sr} Hz FLAC")
    print(f"   caption: {recipe.caption}")
    for seg in recipe.segments:
        print(f"   {seg.source_key} [{seg.src_start_s:.3f}, {seg.src_end_s:.3f})s x{seg.rate:g} "
              f"-> output [{seg.dst_start_s:.3f}, {seg.dst_end_s:.3f})s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return plan_command(args) if args.command == "plan" else render_command(args)
    except (AugmentConfigError, LedgerError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DecodeError as e:
        print(f"error: cannot render: {e.ledger_reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
