"""Deterministic, atomic, resumable WebDataset shards (docs/formats.md).

Tars are written by ``webdataset.TarWriter`` with fixed metadata (mtime 0, uid/gid 0, no user or
group names, mode 0644); it writes a sample's members sorted by name, samples come in a hashed
order of their keys, so the bytes depend only on the samples. A shard is written under a unique
hidden temporary name (``core.atomic``) and renamed when complete, so a reader never sees half a
shard.

``ShardAssembler`` turns a per-sample cache (``.work/samples/{key}.{fingerprint}.tar``, written as
samples are encoded, in any order, by any worker) into ``{split}-{index:06d}.tar``: within a split,
keys are taken in ``shard_order`` (a stable hash of the key, so augmented variants such as
``{key}-ts125`` and ``cat-...`` samples are spread over the split instead of sitting beside their
source or in a block) and every shard holds the next ``shard_size`` encoded samples, so the
layout depends on the set of samples only, never on which worker finished first. Every sample
is stored under the fingerprint of what made it (its ledger row or recipe and the encoder
settings); a cached sample or a finished shard is reused only while every fingerprint in it is
still the one the current run asks for. A shard is written as soon as every key up to its last
sample is settled (encoded or failed); its record in ``.work/done/`` lets a resumed run skip it,
and its cached samples are then deleted, so the cache holds at most about one shard's worth of
samples per split beyond what is still being encoded. A failure that a retry may not repeat is
dropped at the start of a rerun (``SampleCache.drop_failures``): the finished shard whose range
held it waits until the sample settles again, is kept as it is if it fails again, and is rewritten
(with every later shard of its split, which move by one sample) if it is encoded now, so the
folder ends exactly as a run in which it never failed.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

import numpy as np

from core.atomic import atomic_write, atomic_write_text, remove_abandoned
from core.keys import is_safe, stable_hash
from core.stage import OK
from shards.config import FORBIDDEN_EXTENSIONS, is_shard_member

log = logging.getLogger(__name__)

WORK_DIR = ".work"
FINGERPRINT = "sample_fingerprint"  # the row field that carries a work row's fingerprint to the sink
_FP = re.compile(r"[0-9a-f]{16,64}")  # core.fingerprint's hex digest, as it appears in cache file names
_SPLIT_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


class ShardError(Exception):
    """Shards that cannot be written as asked (unsafe names, a pickle member, a changed sample set)."""


def shard_order(key: str) -> tuple[int, str]:
    """Sort key of a sample within its split: a stable hash of its key (the key breaks ties)."""
    return stable_hash("shard-order", key), key


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
    if not member or "/" in member or member.startswith((".", "_")):  # TarWriter drops "_" members
        raise ShardError(f"{key}: bad member name {member!r}")
    if ("." + member).endswith(FORBIDDEN_EXTENSIONS) or member in ("pyd", "pickle", "pth"):
        raise ShardError(f"{key}: member {member!r} would be decoded with pickle; shards never hold pickles")


def members_of(row: Mapping) -> dict[str, bytes]:
    """The shard members an encoded row carries: its fields named like members (``vision-clip.npy`` ...),
    in name order (webdataset's TarWriter writes a sample's members sorted)."""
    return {m: row[m] for m in sorted(row) if is_shard_member(m) and row[m] is not None}


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

    Returns (samples, bytes, sha256). ``before_rename(count, bytes, sha256)`` runs when the
    temporary file is complete, just before it takes its name.
    """
    import webdataset as wds

    stats: dict = {}

    def write(raw: BinaryIO) -> None:
        hashed = _HashingFile(raw)
        count = 0
        with wds.TarWriter(hashed, user="", group="", mode=0o644, mtime=0, encoder=False,
                           format="PAX_FORMAT") as tar:
            for key, members in samples:
                for member in members:
                    check_member(key, member)
                tar.write({"__key__": key, **members})
                count += 1
        stats.update(count=count, size=hashed.size, sha=hashed.sha.hexdigest())

    def record() -> None:
        if before_rename is not None:
            before_rename(stats["count"], stats["size"], stats["sha"])

    atomic_write(path, write, before_rename=record)
    return stats["count"], stats["size"], stats["sha"]


def read_tar_samples(source: str | Path | BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a tar this module wrote (a path or a binary file): (key, {member: bytes}), in file order."""
    opened = tarfile.open(fileobj=source, mode="r:") if hasattr(source, "read") else tarfile.open(source, mode="r:")
    with opened as tar:
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


def _fp(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FP.fullmatch(fingerprint):
        raise ShardError(f"bad sample fingerprint {fingerprint!r}: 16 to 64 hex digits are expected")
    return fingerprint


class SampleCache:
    """Per-sample results under ``OUT/shards/.work``: encoded samples and failure records, each
    stored under its key and fingerprint, so a sample made from other inputs is never taken for it.

    Instances are picklable (a path), so an engine can call them on its workers as the sink.
    """

    def __init__(self, shards_dir: str | Path):
        self.root = Path(shards_dir) / WORK_DIR
        self.samples = self.root / "samples"
        self.failed = self.root / "failed"
        for d in (self.samples, self.failed):
            d.mkdir(parents=True, exist_ok=True)

    def sample_path(self, key: str, fingerprint: str) -> Path:
        return self.samples / f"{key}.{_fp(fingerprint)}.tar"

    def failure_path(self, key: str, fingerprint: str) -> Path:
        return self.failed / f"{key}.{_fp(fingerprint)}.json"

    def put(self, key: str, fingerprint: str, members: Mapping[str, bytes]) -> None:
        write_tar(self.sample_path(key, fingerprint), [(key, members)])
        self.failure_path(key, fingerprint).unlink(missing_ok=True)

    def put_failure(self, key: str, fingerprint: str, reason: str, row: Mapping | None = None) -> None:
        if not is_safe(key):
            raise ShardError(f"unsafe sample key {key!r}")
        record = {"key": key, "reason": reason, "split": (row or {}).get("split", "")}
        atomic_write_text(self.failure_path(key, fingerprint), json.dumps(record, sort_keys=True) + "\n")

    def get(self, key: str, fingerprint: str) -> dict[str, bytes]:
        path = self.sample_path(key, fingerprint)
        for k, members in read_tar_samples(path):
            if k != key:
                raise ShardError(f"cache entry {path} holds {k!r}, not {key!r}")
            return members
        raise ShardError(f"cache entry {path} is empty")

    def status(self, key: str, fingerprint: str) -> str | None:
        """'ok', 'failed' or None (not settled with this fingerprint)."""
        if self.sample_path(key, fingerprint).is_file():
            return "ok"
        if self.failure_path(key, fingerprint).is_file():
            return "failed"
        return None

    def failure(self, key: str, fingerprint: str) -> dict:
        return json.loads(self.failure_path(key, fingerprint).read_text())

    def drop(self, key: str, fingerprint: str) -> None:
        self.sample_path(key, fingerprint).unlink(missing_ok=True)

    def clean_partials(self) -> int:
        """Remove temporary files that dead writers left behind (never a live writer's); returns how many."""
        return sum(remove_abandoned(folder) for folder in (self.root.parent, self.samples, self.failed,
                                                           self.root / "done") if folder.is_dir())

    def drop_failures(self, reasons: tuple[str, ...]) -> list[str]:
        """Delete the failure records whose reason starts with one of ``reasons`` (failures a retry
        may not repeat: a crashed worker, an unexpected error, a timeout); returns their keys, so
        the samples are encoded again and the shards whose range held them are rewritten."""
        dropped = []
        for p in sorted(self.failed.glob("*.json")):
            if p.name.startswith("."):
                continue
            try:
                reason = str(json.loads(p.read_text()).get("reason", ""))
            except (OSError, ValueError, AttributeError):  # unreadable: not a settled failure either
                reason = None
            if reason is None or reason.startswith(reasons):
                p.unlink(missing_ok=True)
                dropped.append(p.name.partition(".")[0])
        return dropped

    def drop_stale(self, fingerprints: Mapping[str, str]) -> int:
        """Delete cached samples and failures whose key or fingerprint the current run does not ask for."""
        wanted = {f"{k}.{_fp(fp)}" for k, fp in fingerprints.items()}
        n = 0
        for folder, suffix in ((self.samples, ".tar"), (self.failed, ".json")):
            for p in folder.glob(f"*{suffix}"):
                if not p.name.startswith(".") and p.name[: -len(suffix)] not in wanted:
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def __call__(self, rows: list[dict]) -> None:
        """Sink for runners: store each finished row from the encode stages under its fingerprint."""
        for row in rows:
            key, fp = row["key"], row.get(FINGERPRINT)
            if not fp:
                raise ShardError(f"{key}: work row without a {FINGERPRINT}")
            if row.get("status") == OK:
                self.put(key, fp, members_of(row))
            else:
                self.put_failure(key, fp, row.get("reason") or "failed: no reason given", row)


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class ShardAssembler:
    """Writes finished shards from the sample cache, in a layout fixed by the planned key set.

    A finished shard is kept only while its position, its keys and every sample's fingerprint are
    what the current run asks for. Otherwise it is taken apart: its samples whose fingerprints
    still match go back to the cache (nothing is encoded twice), the others are encoded again, and
    the shard and every later one that moved are written anew.
    """

    def __init__(self, shards_dir: str | Path, splits: Mapping[str, list[str]], shard_size: int,
                 fingerprints: Mapping[str, str], cache: SampleCache | None = None):
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
        self.keys = {split: sorted(keys, key=shard_order) for split, keys in splits.items()}
        for split, keys in self.keys.items():
            dup = [a for a, b in zip(keys, keys[1:]) if a == b]
            if dup:
                raise ShardError(f"duplicate sample keys in split {split!r}: {dup[:3]}")
            missing = [k for k in keys if k not in fingerprints]
            if missing:
                raise ShardError(f"no fingerprint for sample keys {missing[:3]}")
        self.fps = {k: fingerprints[k] for keys in self.keys.values() for k in keys}
        self._cursor = {split: (0, 0) for split in self.keys}  # (next key position, next shard index)
        self._in_shard = self._recorded_samples()  # key -> shard name, for samples a finished shard holds
        self.written: list[str] = []  # shards written by this process
        self.skipped: list[str] = []  # shards a previous run finished
        self.restored: list[str] = []  # finished shards taken apart because their samples changed

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

    def _recorded_samples(self) -> dict[str, str]:
        """Samples inside finished shards whose fingerprint is still the one asked for."""
        held = {}
        for rec_path in sorted(self.done_dir.glob("*.tar.json")):
            rec = self._finished(rec_path.name[: -len(".json")])
            for key, fp in ((rec or {}).get("fingerprints") or {}).items():
                if self.fps.get(key) == fp:
                    held[key] = rec["name"]
        return held

    def _verdict(self, rec: dict, split: str, pos: int) -> str:
        """'valid' (keep the finished shard), 'invalid' (take it apart) or 'wait': a key of its range
        that failed when it was written is being encoded again (a retried failure) and has not settled;
        if it fails again the shard stays as it is, if it is encoded now the shard is rewritten with it."""
        keys = self.keys[split]
        end = rec["end"]
        if rec["start"] != pos or end > len(keys) or rec["keys_sha256"] != _keys_digest(keys[pos:end]):
            return "invalid"
        recorded = rec.get("fingerprints") or {}
        if not (len(recorded) == rec["count"] and all(self.fps.get(k) == fp for k, fp in recorded.items())
                and rec.get("fingerprints_sha256") == _fps_digest(keys[pos:end], self.fps)):
            return "invalid"
        failed = [self.cache.status(k, self.fps[k]) for k in keys[pos:end] if k not in recorded]
        if "ok" in failed:
            return "invalid"
        return "wait" if None in failed else "valid"

    def _take_apart(self, name: str) -> None:
        """Put the still-wanted samples of a finished shard back into the cache; remove the shard."""
        rec = self._finished(name)
        if rec is None:
            return
        shard = self.dir / name
        data = shard.read_bytes()
        if hashlib.sha256(data).hexdigest() == rec["sha256"]:  # a damaged shard restores nothing
            for key, members in read_tar_samples(io.BytesIO(data)):
                fp = self.fps.get(key)
                if fp is not None and (rec.get("fingerprints") or {}).get(key) == fp:
                    self.cache.put(key, fp, members)
        shard.unlink(missing_ok=True)  # first: a record without its shard is dropped on the next run
        self._record_path(name).unlink(missing_ok=True)
        self._in_shard = {k: n for k, n in self._in_shard.items() if n != name}
        self.restored.append(name)
        log.warning("%s holds samples made from other inputs or sits at another position: taken apart, "
                    "its still-valid samples are reused", shard)

    def _status(self, key: str) -> str | None:
        status = self.cache.status(key, self.fps[key])
        if status is None and key in self._in_shard:  # a shard that has to move holds it
            self._take_apart(self._in_shard[key])
            status = self.cache.status(key, self.fps[key])
        return status

    def advance(self, final: bool = False) -> list[str]:
        """Write every shard whose samples are all settled; with ``final`` every key must be settled."""
        new = []
        for split in sorted(self.keys):
            new += self._advance_split(split, final)
        if final:
            self._drop_unlisted()
        return new

    def _advance_split(self, split: str, final: bool) -> list[str]:
        keys = self.keys[split]
        pos, index = self._cursor[split]
        new = []
        while pos < len(keys):
            name = shard_name(split, index)
            rec = self._finished(name)
            verdict = self._verdict(rec, split, pos) if rec is not None else "invalid"
            if verdict == "wait":
                if final:
                    raise ShardError(f"a retried sample of {name} was never encoded; rerun to resume")
                break
            if verdict == "valid":
                if name not in self.skipped:
                    self.skipped.append(name)
                    for k in keys[pos:rec["end"]]:  # left behind when a run died between shard and cleanup
                        self.cache.drop(k, self.fps[k])
                pos, index = rec["end"], index + 1
                continue
            if rec is not None:
                self._take_apart(name)
            chosen, end = [], pos
            while end < len(keys) and len(chosen) < self.shard_size:
                status = self._status(keys[end])
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
            self._write_shard(split, name, pos, end, chosen)
            new.append(name)
            pos, index = end, index + 1
        self._cursor[split] = (pos, index)
        return new

    def _write_shard(self, split: str, name: str, start: int, end: int, chosen: list[str]) -> None:
        keys = self.keys[split]

        def record(count: int, size: int, sha: str) -> None:
            # the record exists before the shard takes its name: a shard on disk is always a finished one
            rec = {"name": name, "split": split, "count": count, "bytes": size, "sha256": sha,
                   "start": start, "end": end, "keys_sha256": _keys_digest(keys[start:end]),
                   "fingerprints_sha256": _fps_digest(keys[start:end], self.fps),
                   "fingerprints": {k: self.fps[k] for k in chosen},
                   "first_key": chosen[0], "last_key": chosen[-1]}
            atomic_write_text(self._record_path(name), json.dumps(rec, sort_keys=True) + "\n")

        write_tar(self.dir / name, ((k, self.cache.get(k, self.fps[k])) for k in chosen), before_rename=record)
        for k in chosen:
            self.cache.drop(k, self.fps[k])
        self._in_shard = {k: n for k, n in self._in_shard.items() if n != name}
        self._in_shard.update((k, name) for k in chosen)  # settled: inside this finished shard now
        self.written.append(name)

    def _drop_unlisted(self) -> None:
        """After the last shard: finished shards of an older layout that the index no longer lists go."""
        listed = {s.name for s in self.index()}
        for rec_path in sorted(self.done_dir.glob("*.tar.json")):
            name = rec_path.name[: -len(".json")]
            if name not in listed and (self.dir / name).is_file():
                log.warning("removing %s: a finished shard of an older layout", self.dir / name)
                (self.dir / name).unlink()
            if name not in listed:
                rec_path.unlink(missing_ok=True)

    def pending_keys(self) -> set[str]:
        """Keys to encode: not settled in the cache and not inside a finished shard, with their fingerprint."""
        return {k for k, fp in self.fps.items() if k not in self._in_shard and self.cache.status(k, fp) is None}

    def failures(self) -> list[dict]:
        """The failure record of every key that failed with its current fingerprint."""
        return [self.cache.failure(k, fp) for k, fp in sorted(self.fps.items()) if self.cache.status(k, fp) == "failed"]

    def index(self) -> list[ShardInfo]:
        """Every finished shard of the current layout, split by split, in order: a shard left by an
        earlier run over more keys (past this split's last key) is not listed, so it is never published."""
        out = []
        for split in sorted(self.keys):
            index, pos = 0, 0
            while ((rec := self._finished(shard_name(split, index))) is not None
                   and self._verdict(rec, split, pos) == "valid"):
                out.append(ShardInfo(rec["name"], rec["split"], rec["count"], rec["bytes"], rec["sha256"]))
                index, pos = index + 1, rec["end"]
        return out

    def stale_shards(self) -> list[Path]:
        """Shard files in the folder that the current index does not list (from an older layout)."""
        listed = {s.name for s in self.index()}
        return sorted(p for p in self.dir.glob("*.tar") if p.name not in listed)


def _fps_digest(keys: list[str], fps: Mapping[str, str]) -> str:
    """Digest of every key of a shard's range with its fingerprint (failed keys too: a fixed input may pass)."""
    return hashlib.sha256("\n".join(f"{k} {fps[k]}" for k in keys).encode()).hexdigest()


def write_index(shards_dir: str | Path, shards: list[ShardInfo]) -> Path:
    path = Path(shards_dir) / "index.json"
    atomic_write_text(path, json.dumps({"shards": [asdict(s) for s in shards]}, indent=1) + "\n")
    return path
