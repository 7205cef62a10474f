"""Batch diversity of the training reader against a true shuffle, measured in the same run.

Shards are built like the default augmentation plan (every source clip ``vggsound-{id}-{start}``
with its ``-ts080`` and ``-ts125`` stretches and one ``cat-{A}-{B}`` concat: a quarter of the
samples are concats), written with ``shards.shard_writer.write_tar`` in the writer's order
(``shard_order``: hashed keys) and, for comparison, in plain sorted key order (the order before
hashing). Members are tiny arrays: this measures order, not speed (``bench/shards.py`` does that).

For each reader setting, over the batches of 2 ranks:
* ``two versions``: share of batches holding two or more samples made from one source clip
  (a concat counts for both of its clips);
* ``concat share``: mean and standard deviation of the per-batch share of concat samples, and the
  share of batches that are all concat or hold none;
* ``rank overlap``: share of steps at which the two ranks' batches share a sample.
The baseline is a true shuffle (a random permutation of all samples, dealt to the ranks).

    python bench/reader.py [--clips 2000] [--per-shard 500] [--batch-size 8] [--batches 400]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards.reader import ReaderConfig, TrainLoader  # noqa: E402
from shards.shard_writer import npy_bytes, shard_order, write_tar  # noqa: E402
from shards.sources import Shard  # noqa: E402


def plan_keys(clips: int, rng: np.random.Generator) -> dict[str, tuple[str, ...]]:
    """Sample key -> the source clips it is made of, as the default plan names them."""
    ids = [f"vggsound-{''.join(rng.choice(list('abcdefghijkLMNOPQ0123456789_'), 11))}-{rng.integers(0, 300):06d}"
           for _ in range(clips)]
    out: dict[str, tuple[str, ...]] = {}
    for i, key in enumerate(ids):
        out[key] = (key,)
        out[f"{key}-ts080"] = (key,)
        out[f"{key}-ts125"] = (key,)
        partner = ids[(i + 1 + int(rng.integers(0, clips - 1))) % clips]
        out[f"cat-{key}-{partner}"] = (key, partner)
    return out


def write(folder: Path, keys: list[str], per_shard: int) -> list[Shard]:
    folder.mkdir(parents=True, exist_ok=True)
    members = {"clip.npy": npy_bytes(np.ones((2, 4), np.float16)),
               "latent.npy": npy_bytes(np.ones((2, 1, 2, 2), np.float16))}
    shards = []
    for index, start in enumerate(range(0, len(keys), per_shard)):
        path = folder / f"train-{index:06d}.tar"
        count, _, _ = write_tar(path, ((k, members) for k in keys[start:start + per_shard]))
        shards.append(Shard(str(path), "train", count))
    return shards


def reader_batches(shards: list[Shard], cfg: ReaderConfig, batch_size: int, n: int) -> list[list[list[str]]]:
    """``n`` batches of keys for each of 2 ranks."""
    out = []
    for rank in range(2):
        it = iter(TrainLoader(shards, batch_size, rank, 2, cfg))
        out.append([next(it)["keys"] for _ in range(n)])
    return out


def true_shuffle(keys: list[str], batch_size: int, n: int, seed: int = 0) -> list[list[list[str]]]:
    rng = np.random.default_rng(seed)
    order = [keys[i] for i in rng.permutation(len(keys))]
    while len(order) < 2 * n * batch_size:
        order += [keys[i] for i in rng.permutation(len(keys))]
    deal = [order[i * batch_size:(i + 1) * batch_size] for i in range(2 * n)]
    return [deal[0::2], deal[1::2]]


def diversity(ranks: list[list[list[str]]], sources: dict[str, tuple[str, ...]]) -> dict[str, float]:
    batches = [b for r in ranks for b in r]
    two = 0
    shares = []
    for b in batches:
        clips = [c for k in b for c in sources[k]]
        two += len(clips) != len(set(clips))
        shares.append(sum(k.startswith("cat-") for k in b) / len(b))
    shares_a = np.array(shares)
    overlap = np.mean([bool(set(a) & set(b)) for a, b in zip(*ranks)])
    return {"two_versions": two / len(batches), "concat_mean": float(shares_a.mean()),
            "concat_std": float(shares_a.std()), "all_or_none": float(np.mean((shares_a == 0) | (shares_a == 1))),
            "rank_overlap": float(overlap)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=400, help="batches per rank")
    args = p.parse_args(argv)
    sources = plan_keys(args.clips, np.random.default_rng(0))
    keys = list(sources)
    default = ReaderConfig(workers=0)
    print(f"== batch diversity: {len(keys)} samples ({args.clips} clips + 2 stretches + 1 concat each), "
          f"shards of {args.per_shard}, batch {args.batch_size}, 2 ranks x {args.batches} batches, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_reader_") as tmp:
        hashed = write(Path(tmp) / "hashed", sorted(keys, key=shard_order), args.per_shard)
        plain = write(Path(tmp) / "sorted", sorted(keys), args.per_shard)
        rows = [("true shuffle (baseline)", true_shuffle(keys, args.batch_size, args.batches))]
        settings = [("sorted keys, mix 4, no buffer (before)", plain, ReaderConfig(workers=0, mix_shards=4,
                                                                                   shuffle_buffer=1)),
                    ("sorted keys, defaults", plain, default),
                    ("hashed keys, mix 4, no buffer", hashed, ReaderConfig(workers=0, mix_shards=4, shuffle_buffer=1)),
                    (f"hashed keys, defaults (mix {default.mix_shards}, buffer {default.shuffle_buffer})", hashed,
                     default)]
        for name, shards, cfg in settings:
            rows.append((name, reader_batches(shards, cfg, args.batch_size, args.batches)))
    base = diversity(rows[0][1], sources)
    print(f"   {'reader':50s} {'two versions':>12s} {'concat mean':>11s} {'concat std':>10s} "
          f"{'all/none':>8s} {'rank overlap':>12s}")
    for name, ranks in rows:
        m = diversity(ranks, sources)
        print(f"   {name:50s} {m['two_versions']:11.1%}  {m['concat_mean']:10.1%} {m['concat_std']:10.3f} "
              f"{m['all_or_none']:8.1%} {m['rank_overlap']:11.1%}")
    final = diversity(rows[-1][1], sources)
    within = (final["two_versions"] <= 2 * max(base["two_versions"], 1e-9)
              and final["concat_std"] <= 2 * base["concat_std"] and final["all_or_none"] <= 2 * base["all_or_none"])
    print(f"   defaults vs true shuffle: two versions {final['two_versions'] / max(base['two_versions'], 1e-9):.2f}x, "
          f"concat std {final['concat_std'] / base['concat_std']:.2f}x, all/none "
          f"{final['all_or_none'] / max(base['all_or_none'], 1e-9):.2f}x (goal: within 2x) -> "
          f"{'MET' if within else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
