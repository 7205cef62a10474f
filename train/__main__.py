"""``torchrun --nproc_per_node N -m train --shards DIR --out RUN ...``: train (or resume) a VTA-LDM model.

Flags are generated from ``train.config`` (TrainConfig, ModelConfig, NoiseConfig), so every
parameter has one default and one help text. Rerunning with the same ``--out`` resumes from its
last checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from core.cli_config import add_config_args, from_args
from core.lock import FolderLock, FolderLocked
from train.config import ModelConfig, NoiseConfig, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser.add_argument_group("training"), TrainConfig)
    add_config_args(parser.add_argument_group("model"), ModelConfig)
    add_config_args(parser.add_argument_group("noise"), NoiseConfig)
    parser.add_argument("--vae-scaling-factor", type=float, default=0.0,
                        help="latent scale when the shards have no card.json (default: from card.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        tcfg, mcfg, ncfg = from_args(TrainConfig, args), from_args(ModelConfig, args), from_args(NoiseConfig, args)
    except ValueError as e:  # a flag out of range: one line, exit code 2
        build_parser().error(str(e))
    if not tcfg.shards or not tcfg.out:
        build_parser().error("--shards and --out are required")
    from train.checkpoint import CheckpointError
    from train.trainer import pretrain_model_config, train
    try:
        pretrain_model_config(tcfg, mcfg)
    except ValueError as e:
        build_parser().error(str(e))
    # rank 0 holds the run folder for the whole job; if it refuses, torchrun stops the other ranks
    lock = FolderLock(tcfg.out, purpose="python -m train") if rank == "0" else contextlib.nullcontext()
    try:
        with lock:
            train(tcfg, mcfg, ncfg, args.vae_scaling_factor)
    except (FolderLocked, CheckpointError) as e:  # CheckpointError: an --init-from that does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
