"""Publish a finished local shard folder to object storage (``s3://``, ``gs://``, ...).

Shards are assembled in a local staging folder (atomic renames, resumable cache) and uploaded
when the run is complete: every shard, then ``failed.json`` and ``card.json``, and ``index.json``
last, so a reader that finds the index always finds every shard it lists. An object upload is
all or nothing, so a killed upload leaves whole shards and no index; rerunning the command
sends only the shards the store does not already hold with the same size and content hash
(the sha256 of ``index.json``, recorded with each object at upload: ``core.storage.put_file``).
A destination whose ``index.json`` lists a different shard set is refused rather than mixed
with this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from core import storage
from core.models import file_sha256
from shards.shard_writer import ShardError, ShardInfo

INDEX = "index.json"
SIDECARS = ("failed.json", "card.json")


@dataclass(frozen=True)
class Published:
    url: str
    uploaded: int  # shards sent by this call
    kept: int  # shards the destination already held with the same size and sha256 (a resumed upload)
    unchanged: bool  # the destination already held exactly this shard set, index included


def check_destination(url: str) -> None:
    """Fail before any work when the store cannot be reached (endpoint, credentials, backend)."""
    try:
        storage.read_bytes(storage.join(url, INDEX))
    except storage.backend_errors() as e:
        raise storage.StorageError(f"cannot reach {url}: {e}") from e


def publish(local_dir: str | Path, url: str, shards: list[ShardInfo]) -> Published:
    """Upload the shards listed in ``local_dir/index.json`` that ``url`` lacks, its sidecars, then the index."""
    local_dir = Path(local_dir)
    ours = (local_dir / INDEX).read_bytes()
    sent = kept = 0
    try:
        theirs = storage.read_bytes(storage.join(url, INDEX))
        if theirs is not None and theirs != ours:
            raise ShardError(f"{url} already holds a different shard set (its {INDEX} differs from "
                             f"{local_dir / INDEX}); publish into a new --out URL or delete the old one first")
        unchanged = theirs is not None
        if not unchanged:
            for shard in tqdm(shards, desc="upload", unit="shard", dynamic_ncols=True):
                target = storage.join(url, shard.name)
                if storage.stored_object(target) == (shard.bytes, shard.sha256):
                    kept += 1  # sent whole by an earlier, interrupted publish
                    continue
                _upload_shard(local_dir / shard.name, target, shard)
                sent += 1
        for name in SIDECARS:
            if (local_dir / name).is_file():
                _upload(local_dir / name, storage.join(url, name), (local_dir / name).stat().st_size)
        _upload(local_dir / INDEX, storage.join(url, INDEX), len(ours))
    except storage.backend_errors() as e:
        raise storage.StorageError(f"publishing to {url} failed after {sent + kept} of {len(shards)} shard(s): "
                                   f"{e}; rerun the command to send the rest") from e
    return Published(url, sent, kept, unchanged)


def _upload_shard(local: Path, url: str, shard: ShardInfo) -> None:
    """Send a shard labelled with its sha256, after checking the staged file still has it."""
    digest = file_sha256(local)
    if digest != shard.sha256:
        raise ShardError(f"{local} changed since it was written (sha256 {digest}, {INDEX} says "
                         f"{shard.sha256}); delete it and rerun the command to encode it again")
    _upload(local, url, shard.bytes, digest)


def _upload(local: Path, url: str, expected: int, sha256: str | None = None) -> None:
    storage.put_file(local, url, sha256)
    got = storage.size(url)
    if got != expected:
        raise ShardError(f"{url} holds {got} bytes after upload, expected {expected}")
