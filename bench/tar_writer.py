"""Shard tar writer: ``webdataset.TarWriter`` (what ``shards.shard_writer.write_tar`` uses) against the
hand-written ``tarfile`` writer the project used before, in the same run.

Prints whether the two give the same bytes for the same samples (fixed metadata: mtime 0, uid/gid
0, no owner names, mode 0644, members by name) and the time of each, as a ratio to the hand-written
one. Samples have the real member sizes (20x768 CLIP tokens, 768 text, 2x8x256x16 latent, 10 s of
16 kHz FLAC-sized audio). The tar is written to a temporary folder, each writer ``--repeats`` times.

    python bench/tar_writer.py [--samples 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards.shard_writer import _HashingFile, npy_bytes, write_tar  # noqa: E402


def _samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    return [(f"vggsound-{i:011d}-000030", {
        "json": b'{"key": %d}' % i,
        "clip.npy": npy_bytes(rng.standard_normal((20, 768)).astype(np.float16)),
        "text.npy": npy_bytes(rng.standard_normal(768).astype(np.float16)),
        "latent.npy": npy_bytes(rng.standard_normal((2, 8, 256, 16)).astype(np.float16)),
        "audio.flac": rng.integers(0, 255, 180_000, dtype=np.uint8).tobytes()}) for i in range(n)]


def hand_written(path: Path, samples) -> str:
    """The previous writer: plain tarfile, fixed TarInfo metadata, members by name, sha256, fsync."""
    with open(path, "wb") as raw:
        hashed = _HashingFile(raw)
        with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in samples:
                for member, data in sorted(members.items()):
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
    return hashed.sha.hexdigest()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    samples = _samples(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = Path(tmp) / "hand.tar", Path(tmp) / "wds.tar"
        t_ref = _best(lambda: hand_written(ref, samples), args.repeats)
        t_wds = _best(lambda: write_tar(ours, samples), args.repeats)
        same = ref.read_bytes() == ours.read_bytes()
        size = ref.stat().st_size
        digest = hashlib.sha256(ours.read_bytes()).hexdigest()[:16]
    print(f"tar writer bench: {args.samples} samples, {size / 1e6:.1f} MB per tar, best of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  identical bytes: {same} (sha256 {digest}...)")
    print(f"  hand-written tarfile   {t_ref:7.3f} s   1.00x")
    print(f"  webdataset.TarWriter   {t_wds:7.3f} s   {t_wds / t_ref:.2f}x  (write_tar: + atomic rename, dir fsync)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
