"""Publish a finished local shard folder to object storage (``s3://``, ``gs://``, ...).

Shards are assembled in a local staging folder (atomic renames, resumable cache) and uploaded
when the run is complete: every shard, then ``failed.json`` and ``card.json``, and ``index.json``
last, so a reader that finds the index always finds every shard it lists. An object upload is
all or nothing, so a killed upload leaves whole shards and no index; rerunning the command
uploads again. A destination whose ``index.json`` lists a different shard set is refused rather
than mixed with this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from core import storage
from shards.shard_writer import ShardError, ShardInfo

INDEX = "index.json"
SIDECARS = ("failed.json", "card.json")


@dataclass(frozen=True)
class Published:
    url: str
    uploaded: int  # shards sent by this call
    unchanged: bool  # the destination already held exactly this shard set


def check_destination(url: str) -> None:
    """Fail before any work when the store cannot be reached (endpoint, credentials, backend)."""
    try:
        storage.read_bytes(storage.join(url, INDEX))
    except storage.backend_errors() as e:
        raise storage.StorageError(f"cannot reach {url}: {e}") from e


def publish(local_dir: str | Path, url: str, shards: list[ShardInfo]) -> Published:
    """Upload the shards listed in ``local_dir/index.json``, its sidecars, then the index."""
    local_dir = Path(local_dir)
    ours = (local_dir / INDEX).read_bytes()
    done = 0
    try:
        theirs = storage.read_bytes(storage.join(url, INDEX))
        if theirs is not None and theirs != ours:
            raise ShardError(f"{url} already holds a different shard set (its {INDEX} differs from "
                             f"{local_dir / INDEX}); publish into a new --out URL or delete the old one first")
        unchanged = theirs is not None
        if not unchanged:
            for shard in tqdm(shards, desc="upload", unit="shard", dynamic_ncols=True):
                _upload(local_dir / shard.name, storage.join(url, shard.name), shard.bytes)
                done += 1
        for name in SIDECARS:
            if (local_dir / name).is_file():
                _upload(local_dir / name, storage.join(url, name), (local_dir / name).stat().st_size)
        _upload(local_dir / INDEX, storage.join(url, INDEX), len(ours))
    except storage.backend_errors() as e:
        raise storage.StorageError(f"publishing to {url} failed after {done} of {len(shards)} shard(s): {e}; "
                                   f"rerun the command to upload again") from e
    return Published(url, done, unchanged)


def _upload(local: Path, url: str, expected: int) -> None:
    storage.put_file(local, url)
    got = storage.size(url)
    if got != expected:
        raise ShardError(f"{url} holds {got} bytes after upload, expected {expected}")
