"""Where training samples come from: URLs, the shard index, and one shard's samples.

A source is a local folder, an ``http(s)://`` URL or any other fsspec URL (``s3://``, ``gs://``:
needs ``s3fs``/``gcsfs``) of a folder holding ``index.json``, or an explicit brace/``::`` list of
shard URLs. Local files are opened directly (random access: members training does not need are
skipped by a seek); every URL goes through ``fsspec.open`` and is read as a stream.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import tarfile
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Container, Iterator
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from shards.config import flow_member, vision_member

log = logging.getLogger(__name__)

TRAIN_MEMBERS = ("clip.npy", "vision-clip.npy", "text.npy", "latent.npy", "json")  # a CLIP-conditioned run's


def train_members(vision: str = "clip", need_flow: bool = False, need_video: bool = True) -> tuple[str, ...]:
    """The members a run conditioned on ``vision`` (and its flow) reads; old shards' clip.npy is CLIP's.
    Without video (audio pre-training, text-only conditions) no vision or flow member is read."""
    if not need_video:
        return ("text.npy", "latent.npy", "json")
    if vision == "clip" and not need_flow:
        return TRAIN_MEMBERS
    old = ("clip.npy",) if vision == "clip" else ()
    return (*old, vision_member(vision), *((flow_member(vision),) if need_flow else ()), "text.npy", "latent.npy",
            "json")
HTTP_TIMEOUT_S = 120  # per socket read; a stalled server fails the shard instead of hanging a rank


class ShardSourceError(ValueError):
    """The shard source cannot be used (missing index, no shards of a split, unsafe names)."""


@dataclass(frozen=True)
class Shard:
    url: str
    split: str
    count: int | None  # samples, when the index says
    # relative chance of being drawn by a training stream (mixtures of shard sets; 1.0 otherwise)
    weight: float = 1.0


_MIX_PART = re.compile(r"^(?P<source>.+):(?P<weight>[0-9]*\.?[0-9]+)$")


def parse_mixture(spec: str) -> list[tuple[str, float]] | None:
    """``A:0.7,B:0.3`` -> [(A, 0.7), (B, 0.3)]; None when ``spec`` is one source (no weights)."""
    parts = spec.split(",")
    matches = [_MIX_PART.match(p.strip()) for p in parts]
    if not all(matches):
        if any(matches) and len(parts) > 1:
            raise ShardSourceError(f"--shards {spec!r}: every part of a mixture is SOURCE:WEIGHT")
        return None
    mixture = [(m["source"], float(m["weight"])) for m in matches]
    if any(w <= 0 for _, w in mixture):
        raise ShardSourceError(f"--shards {spec!r}: mixture weights must be > 0")
    if len({s for s, _ in mixture}) != len(mixture):
        raise ShardSourceError(f"--shards {spec!r}: a shard set is named twice")
    return mixture


def weighted_shards(shards: list[Shard], weight: float) -> list[Shard]:
    """A set's shards with draw weights that give the set ``weight`` of the samples in the long run.

    A stream reads a drawn shard to its end before the next draw, so a shard's share of samples is
    its draw chance times its sample count: drawing each shard with ``weight / samples of its set``
    makes the set's share exactly ``weight / sum of weights`` (in expectation; docs/study.md).
    Without counts (an explicit URL list), every shard counts as one sample.
    """
    total = sum((s.count or 1) for s in shards)
    return [replace(s, weight=weight / total) for s in shards]


def _is_url(source: str) -> bool:
    return "://" in source


def local_path(url: str) -> str | None:
    """The file path of a local shard (plain path or ``file://``), None for remote URLs."""
    scheme = urlparse(url).scheme if _is_url(url) else ""
    if scheme == "file":
        return urlparse(url).path
    return url if scheme == "" else None


def open_url(url: str):
    """A binary file object for a local path or any fsspec URL (http(s) streamed, no range requests)."""
    local = local_path(url)
    if local is not None:
        return open(local, "rb")
    import fsspec

    scheme = urlparse(url).scheme
    options = {}
    if scheme in ("http", "https"):
        import aiohttp

        options = {"block_size": 0, "client_kwargs": {
            "timeout": aiohttp.ClientTimeout(sock_connect=HTTP_TIMEOUT_S, sock_read=HTTP_TIMEOUT_S)}}
    try:
        return fsspec.open(url, "rb", **options).open()
    except ImportError as e:  # e.g. s3fs or gcsfs not installed
        raise ShardSourceError(f"cannot open {url}: {e} (install the fsspec backend for {scheme}://)") from e
    except ValueError as e:  # fsspec: "Protocol not known"
        raise ShardSourceError(f"cannot open {url}: {e}") from e


def _join(base: str, name: str) -> str:
    if _is_url(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def _read_json(location: str) -> dict | None:
    """A JSON document, or None when it does not exist."""
    if not _is_url(location) and not os.path.exists(location):
        return None
    try:
        with open_url(location) as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardSourceError(f"cannot read {location}: {e}") from e


def _split_of(name: str) -> str:
    return posixpath.basename(name).split("-", 1)[0]


def _safe_name(name: str, index: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tar"):
        raise ShardSourceError(f"{index}: unsafe or invalid shard name {name!r}")
    return name


def find_shards(source: str) -> tuple[list[Shard], dict | None]:
    """All shards of a source (with their split and sample count) and the dataset card, if any.

    ``source`` is a folder (``OUT`` or ``OUT/shards``) or URL of one holding ``index.json``; or an
    explicit list of shard URLs (brace notation, ``::`` separated), whose split is read from the
    file name (``train-000000.tar``).
    """
    if "{" in source or "::" in source or source.endswith(".tar"):
        urls = expand_urls(source)
        return [Shard(u, _split_of(u), None) for u in urls], None
    for base in (source, _join(source, "shards")):
        index_loc = _join(base, "index.json")
        index = _read_json(index_loc)
        if index is None:
            continue
        if not isinstance(index.get("shards"), list):
            raise ShardSourceError(f"{index_loc}: no 'shards' list")
        shards = []
        for entry in index["shards"]:
            name = _safe_name(str(entry.get("name", "")), index_loc)
            shards.append(Shard(_join(base, name), str(entry.get("split") or _split_of(name)),
                                int(entry["count"]) if entry.get("count") is not None else None))
        card = _read_json(_join(base, "card.json"))
        return shards, card
    raise ShardSourceError(f"no index.json in {source} or {_join(source, 'shards')}")


def split_shards(shards: list[Shard], split: str) -> list[Shard]:
    """The usable shards of one split; empty shards are left out (they could never yield)."""
    chosen = [s for s in shards if s.split == split]
    empty = [s.url for s in chosen if s.count == 0]
    if empty:
        log.warning("skipping %d empty %s shard(s): %s", len(empty), split, ", ".join(empty[:3]))
    return [s for s in chosen if s.count != 0]


@functools.lru_cache(maxsize=64)
def _local_index(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]:
    """Per sample of a local shard: its key and (member, data offset, size) of every member.

    Built once per file version with tarfile and webdataset's grouping (headers only, no data
    read); afterwards a sample is a few ``pread`` calls and skipping to any position is free,
    which the stream's hashed start offsets and a resumed shuffle buffer rely on. A damaged shard
    keeps the samples before the damage.
    """
    found = []
    with tarfile.open(path, mode="r:") as tar:
        files = ({"fname": info.name, "data": (info.offset_data, info.size), "__url__": path}
                 for info in tar if info.isfile())
        try:
            for sample in group_by_keys(files):
                found.append((sample["__key__"], tuple((k, *v) for k, v in sample.items() if not k.startswith("__"))))
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("shard %s is damaged after sample %d (%s)", path, len(found), e)
    complete = 0  # tarfile stops quietly at a truncated header; a cut payload is caught here
    while complete < len(found) and all(offset + n <= size for _, offset, n in found[complete][1]):
        complete += 1
    if complete < len(found):
        log.warning("shard %s is damaged after sample %d (truncated): reading the %d sample(s) before it",
                    path, complete, complete)
    return tuple(found[:complete])


def shard_samples(url: str, members: tuple[str, ...] = TRAIN_MEMBERS,
                  select: Container[int] | None = None, stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """``(position, sample)`` for the samples of one shard, in file order, as dicts of raw member bytes.

    Only ``members`` are read, and only for positions in ``select`` (all when None); reading ends
    before position ``stop``. A local shard is read through its cached member index (unread
    members and samples cost nothing); a URL is a stream, so skipping still downloads.
    """
    local = local_path(url)
    if local is not None:
        yield from _local_samples(local, url, set(members), select, stop)
        return

    def wanted(fname: str) -> bool:
        base = posixpath.basename(fname)
        return "." in base and base.split(".", 1)[1] in members

    with open_url(url) as f:
        files = ({**d, "__url__": url} for d in tar_file_iterator(f, select_files=wanted))
        for pos, sample in enumerate(group_by_keys(files)):
            if stop is not None and pos >= stop:
                return
            if select is None or pos in select:
                yield pos, sample


def _local_samples(path: str, url: str, members: set[str], select: Container[int] | None,
                   stop: int | None) -> Iterator[tuple[int, dict]]:
    st = os.stat(path)
    index = _local_index(path, st.st_mtime_ns, st.st_size)
    end = len(index) if stop is None else min(stop, len(index))
    first = select.start if isinstance(select, range) else 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for pos in range(max(0, first), end):
            if select is not None and pos not in select:
                continue
            key, parts = index[pos]
            sample = {"__key__": key, "__url__": url}
            for member, offset, size in parts:
                if member in members:
                    data = os.pread(fd, size, offset)
                    if len(data) != size:
                        raise EOFError(f"{path}: {key}.{member} is truncated ({len(data)} of {size} bytes)")
                    sample[member] = data
            if len(sample) > 2:
                yield pos, sample
    finally:
        os.close(fd)
