"""Deterministic, atomic, resumable WebDataset shards (DESIGN.md section 3).

Bytes depend only on the samples: members are written in a fixed order with fixed metadata
(mtime 0, uid/gid 0, no user or group names, mode 0644), samples sorted by key. A shard is written
under a hidden temporary name and renamed when complete, so a reader never sees half a shard.

``ShardAssembler`` turns a per-sample cache (``.work/samples/{key}.tar``, written as samples are
encoded, in any order, by any worker) into ``{split}-{index:06d}.tar``: within a split, keys
are taken in sorted order and every shard holds the next ``shard_size`` encoded samples, so the
layout depends on the set of samples only, never on which worker finished first. A shard is
written as soon as every key up to its last sample is settled (encoded or failed); its record in
``.work/done/`` lets a resumed run skip it, and its cached samples are then deleted, so the cache
holds at most about one shard's worth of samples per split beyond what is still being encoded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

import numpy as np

from core.keys import is_safe
from core.atomic import atomic_write_text
from core.stage import OK
from shards.config import FORBIDDEN_EXTENSIONS, MEMBER_ORDER

WORK_DIR = ".work"
PARTIAL_SUFFIX = ".partial"
_SPLIT_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


class ShardError(Exception):
    """Shards that cannot be written as asked (unsafe names, a pickle member, a changed sample set)."""


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` bytes (format 1.0 header, no pickle): what ``np.load(..., allow_pickle=False)`` reads."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def split_file_name(split: str) -> str:
    """A split as it appears in shard names: no dashes (readers split names at the first one)."""
    name = _SPLIT_UNSAFE.sub("_", split or "")
    if not name:
        raise ShardError("empty split name")
    return name


def shard_name(split: str, index: int) -> str:
    return f"{split_file_name(split)}-{index:06d}.tar"


def check_member(key: str, member: str) -> None:
    if not is_safe(key):
        raise ShardError(f"unsafe sample key {key!r}: only [A-Za-z0-9_-] (WebDataset splits names at dots)")
    if not member or "/" in member or member.startswith("."):
        raise ShardError(f"{key}: bad member name {member!r}")
    if ("." + member).endswith(FORBIDDEN_EXTENSIONS) or member in ("pyd", "pickle", "pth"):
        raise ShardError(f"{key}: member {member!r} would be decoded with pickle; shards never hold pickles")


def members_of(row: Mapping) -> dict[str, bytes]:
    """The shard members an encoded row carries: its fields named like members (``clip.npy`` ...)."""
    return {m: row[m] for m in MEMBER_ORDER if row.get(m) is not None}


def ordered_members(members: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """Known members in ``MEMBER_ORDER``, any others after them by name."""
    rank = {m: i for i, m in enumerate(MEMBER_ORDER)}
    return sorted(members.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingFile:
    """Write-through file object that hashes and counts what passes (tarfile only writes forward)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


@dataclass(frozen=True)
class ShardInfo:
    """One entry of ``index.json``."""

    name: str
    split: str
    count: int
    bytes: int
    sha256: str


def write_tar(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]],
              before_rename: Callable[[int, int, str], None] | None = None) -> tuple[int, int, str]:
    """Write ``(key, {member: bytes})`` samples, in the given order, atomically to ``path``.

    Returns (samples, bytes, sha256). The temporary file is ``.{name}.partial`` in the same folder;
    ``before_rename(count, bytes, sha256)`` runs when it is complete, just before it takes its name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    count = 0
    try:
        with open(tmp, "wb") as raw:
            hashed = _HashingFile(raw)
            with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for key, members in samples:
                    for member, data in ordered_members(members):
                        check_member(key, member)
                        tar.addfile(_tarinfo(f"{key}.{member}", len(data)), io.BytesIO(data))
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        if before_rename is not None:
            before_rename(count, hashed.size, hashed.sha.hexdigest())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count, hashed.size, hashed.sha.hexdigest()


def read_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a tar this module wrote: (key, {member: bytes}), in file order."""
    with tarfile.open(path, mode="r:") as tar:
        key, members = None, {}
        for info in tar:
            if not info.isfile():
                continue
            k, _, member = info.name.partition(".")
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[member] = tar.extractfile(info).read()
        if key is not None:
            yield key, members


class SampleCache:
    """Per-sample results under ``OUT/shards/.work``: encoded samples and failure records.

    Instances are picklable (a path), so an engine can call them on its workers as the sink.
    """

    def __init__(self, shards_dir: str | Path):
        self.root = Path(shards_dir) / WORK_DIR
        self.samples = self.root / "samples"
        self.failed = self.root / "failed"
        for d in (self.samples, self.failed):
            d.mkdir(parents=True, exist_ok=True)

    def sample_path(self, key: str) -> Path:
        return self.samples / f"{key}.tar"

    def failure_path(self, key: str) -> Path:
        return self.failed / f"{key}.json"

    def put(self, key: str, members: Mapping[str, bytes]) -> None:
        write_tar(self.sample_path(key), [(key, members)])
        self.failure_path(key).unlink(missing_ok=True)

    def put_failure(self, key: str, reason: str, row: Mapping | None = None) -> None:
        if not is_safe(key):
            raise ShardError(f"unsafe sample key {key!r}")
        record = {"key": key, "reason": reason, "split": (row or {}).get("split", "")}
        atomic_write_text(self.failure_path(key), json.dumps(record, sort_keys=True) + "\n")

    def get(self, key: str) -> dict[str, bytes]:
        for k, members in read_tar_samples(self.sample_path(key)):
            if k != key:
                raise ShardError(f"cache entry {self.sample_path(key)} holds {k!r}, not {key!r}")
            return members
        raise ShardError(f"cache entry {self.sample_path(key)} is empty")

    def status(self, key: str) -> str | None:
        """'ok', 'failed' or None (not settled yet)."""
        if self.sample_path(key).is_file():
            return "ok"
        if self.failure_path(key).is_file():
            return "failed"
        return None

    def failure(self, key: str) -> dict:
        return json.loads(self.failure_path(key).read_text())

    def drop(self, key: str) -> None:
        self.sample_path(key).unlink(missing_ok=True)

    def clean_partials(self) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        n = 0
        for folder in (self.root.parent, self.samples, self.failed, self.root / "done"):
            if folder.is_dir():
                for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
                    p.unlink()
                    n += 1
                for p in folder.glob(".*.tmp"):
                    p.unlink()
                    n += 1
        return n

    def __call__(self, rows: list[dict]) -> None:
        """Sink for runners: store each finished row from the encode stages."""
        for row in rows:
            key = row["key"]
            if row.get("status") == OK:
                self.put(key, members_of(row))
            else:
                self.put_failure(key, row.get("reason") or "failed: no reason given", row)


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class ShardAssembler:
    """Writes finished shards from the sample cache, in a layout fixed by the planned key set."""

    def __init__(self, shards_dir: str | Path, splits: Mapping[str, list[str]], shard_size: int,
                 cache: SampleCache | None = None):
        if shard_size < 1:
            raise ShardError("shard_size must be at least 1")
        self.dir = Path(shards_dir)
        self.cache = cache or SampleCache(self.dir)
        self.done_dir = self.cache.root / "done"
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        names = {}
        for split in splits:
            fname = split_file_name(split)
            if fname in names:
                raise ShardError(f"splits {names[fname]!r} and {split!r} map to the same shard name prefix")
            names[fname] = split
        self.keys = {split: sorted(keys) for split, keys in splits.items()}
        for split, keys in self.keys.items():
            dup = [a for a, b in zip(keys, keys[1:]) if a == b]
            if dup:
                raise ShardError(f"duplicate sample keys in split {split!r}: {dup[:3]}")
        self._cursor = {split: (0, 0) for split in self.keys}  # (next key position, next shard index)
        self.written: list[str] = []  # shards written by this process
        self.skipped: list[str] = []  # shards a previous run finished

    def _record_path(self, name: str) -> Path:
        return self.done_dir / f"{name}.json"

    def _finished(self, name: str) -> dict | None:
        rec_path = self._record_path(name)
        if not rec_path.is_file():
            return None
        rec = json.loads(rec_path.read_text())
        shard = self.dir / name
        if not shard.is_file() or shard.stat().st_size != rec["bytes"]:
            rec_path.unlink()  # the shard was removed or damaged: write it again
            return None
        return rec

    def settled(self, key: str) -> bool:
        return self.cache.status(key) is not None

    def advance(self, final: bool = False) -> list[str]:
        """Write every shard whose samples are all settled; with ``final`` every key must be settled."""
        new = []
        for split in sorted(self.keys):
            new += self._advance_split(split, final)
        return new

    def _advance_split(self, split: str, final: bool) -> list[str]:
        keys = self.keys[split]
        pos, index = self._cursor[split]
        new = []
        while pos < len(keys):
            name = shard_name(split, index)
            rec = self._finished(name)
            if rec is not None:
                end = rec["end"]
                if rec["start"] != pos or end > len(keys) or rec["keys_sha256"] != _keys_digest(keys[pos:end]):
                    raise ShardError(f"{self.dir / name} was written from a different set of samples; "
                                     f"encode into a new --out folder (or delete the old shards)")
                if name not in self.skipped:
                    self.skipped.append(name)
                    for k in keys[pos:end]:  # left behind when a run died between shard and cleanup
                        self.cache.drop(k)
                pos, index = end, index + 1
                continue
            chosen, end = [], pos
            while end < len(keys) and len(chosen) < self.shard_size:
                status = self.cache.status(keys[end])
                if status is None:
                    break
                if status == "ok":
                    chosen.append(keys[end])
                end += 1
            complete = len(chosen) == self.shard_size or end == len(keys)
            if not complete:
                if final:
                    raise ShardError(f"{keys[end]} of split {split!r} was never encoded; rerun to resume")
                break
            if not chosen:  # only failures remain in this split
                pos = end
                break

            def record(count: int, size: int, sha: str, name=name, start=pos, end=end, chosen=chosen) -> None:
                # the record exists before the shard takes its name: a shard on disk is always a finished one
                rec = {"name": name, "split": split, "count": count, "bytes": size, "sha256": sha,
                       "start": start, "end": end, "keys_sha256": _keys_digest(keys[start:end]),
                       "first_key": chosen[0], "last_key": chosen[-1]}
                atomic_write_text(self._record_path(name), json.dumps(rec, sort_keys=True) + "\n")

            write_tar(self.dir / name, ((k, self.cache.get(k)) for k in chosen), before_rename=record)
            for k in chosen:
                self.cache.drop(k)
            self.written.append(name)
            new.append(name)
            pos, index = end, index + 1
        self._cursor[split] = (pos, index)
        return new

    def pending_keys(self) -> set[str]:
        """Keys not yet inside a finished shard and not settled in the cache."""
        out = set()
        for split, keys in self.keys.items():
            covered = self._covered_by_records(split)
            for i, k in enumerate(keys):
                if i in covered or self.settled(k):
                    continue
                out.add(k)
        return out

    def _covered_by_records(self, split: str) -> set[int]:
        """Key positions inside shards a previous run finished."""
        covered: set[int] = set()
        index = 0
        keys = self.keys[split]
        pos = 0
        while True:
            rec = self._finished(shard_name(split, index))
            if rec is None or rec["start"] != pos or rec["keys_sha256"] != _keys_digest(keys[pos:rec["end"]]):
                return covered
            covered.update(range(rec["start"], rec["end"]))
            pos = rec["end"]
            index += 1

    def index(self) -> list[ShardInfo]:
        """Every finished shard, split by split, in order."""
        out = []
        for split in sorted(self.keys):
            index = 0
            while (rec := self._finished(shard_name(split, index))) is not None:
                out.append(ShardInfo(rec["name"], rec["split"], rec["count"], rec["bytes"], rec["sha256"]))
                index += 1
        return out

    def stale_shards(self) -> list[Path]:
        """Shard files in the folder that the current index does not list (from an older layout)."""
        listed = {s.name for s in self.index()}
        return sorted(p for p in self.dir.glob("*.tar") if p.name not in listed)


def write_index(shards_dir: str | Path, shards: list[ShardInfo]) -> Path:
    path = Path(shards_dir) / "index.json"
    atomic_write_text(path, json.dumps({"shards": [asdict(s) for s in shards]}, indent=1) + "\n")
    return path
