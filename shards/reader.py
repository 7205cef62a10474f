"""Training reader: streams encoded shards into batches, identically on every DDP rank.

Why not ``WebDataset(urls, resampled=True).with_epoch(n)`` as is: the trainer must resume *exactly*
(resuming at step k and training to m gives the losses of a straight run to m), so the reader's
position has to be a small piece of state that a checkpoint can hold. Each data-loader worker of
each rank therefore runs one deterministic stream:

* shards are drawn with replacement ("resampled"), the i-th draw chosen by a hash of
  (seed, rank, worker, i), so no rank or worker can run out of data, whatever the shard counts;
* ``mix_shards`` drawn shards are read at once and each next sample comes from one of them,
  again chosen by a hash, which interleaves shards without a shuffle buffer whose contents would
  have to be checkpointed;
* every sample carries the stream state after it (draw counter, open shards and positions), so
  the trainer checkpoints the state of the last batch it actually consumed; a resumed stream
  reopens its shards and skips to those positions.

Tar members are read with webdataset's own ``tar_file_iterator``/``group_by_keys`` and batches
built with ``webdataset.DataPipeline``/``batched``; ``.npy`` members are decoded with
``allow_pickle=False`` and only the members training needs are read (``audio.flac`` is skipped).
Sources: a local folder, an ``http(s)://`` URL (standard library, no shell) or any fsspec URL
(``s3://``, ``gs://``: needs ``s3fs``/``gcsfs``) of a folder holding ``index.json``, or an
explicit brace/``::`` list of shard URLs.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger(__name__)

TRAIN_MEMBERS = ("clip.npy", "text.npy", "latent.npy", "json")


class ShardSourceError(ValueError):
    """The shard source cannot be used (missing index, no shards of a split, unsafe names)."""


class SampleError(ValueError):
    """One sample cannot be used for training (missing or malformed member)."""


@dataclass(frozen=True)
class ReaderConfig:
    """How one rank streams its shards."""

    workers: int = field(default=2, metadata={"help": "data-loader worker processes per rank"})
    mix_shards: int = field(default=4, metadata={"help": "shards each worker reads at once, interleaved"})
    seed: int = field(default=0, metadata={"help": "data-order seed"})
    prefetch: int = field(default=2, metadata={"help": "batches prefetched per worker"})


@dataclass(frozen=True)
class Shard:
    url: str
    split: str
    count: int | None  # samples, when the index says


# ---------------------------------------------------------------------------------------------
# opening URLs and finding shards

def _is_url(source: str) -> bool:
    return "://" in source


def _local_path(url: str) -> str | None:
    """The file path of a local shard (plain path or ``file://``), None for remote URLs."""
    scheme = urlparse(url).scheme if _is_url(url) else ""
    if scheme == "file":
        return urlparse(url).path
    return url if scheme == "" else None


def open_url(url: str):
    """A binary file object for a local path, an http(s) URL or any fsspec URL."""
    local = _local_path(url)
    if local is not None:
        return open(local, "rb")
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=120)  # noqa: S310 - scheme checked above
    try:
        import fsspec
        return fsspec.open(url, "rb").open()
    except ImportError as e:  # e.g. s3fs or gcsfs not installed
        raise ShardSourceError(f"cannot open {url}: {e} (install the fsspec backend for {scheme}://)") from e


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
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise ShardSourceError(f"cannot read {location}: {e}") from e
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


# ---------------------------------------------------------------------------------------------
# decoding

@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse an ``.npy`` header once: every sample of a shard repeats the same few headers, and
    NumPy parses each one with ``ast.literal_eval`` (a quarter of the reader's time uncached)."""
    buf = io.BytesIO(prefix)
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    return shape, fortran, dtype, buf.tell()


def load_npy(data: bytes, name: str) -> np.ndarray:
    """Decode one ``.npy`` member without copying its payload; object (pickled) arrays are refused.

    The header is parsed with NumPy's own reader and the array is a read-only view of the member's
    bytes: the copy ``np.load`` makes per member is a large part of a reader's decode time.
    """
    try:
        if len(data) < 12:
            raise ValueError(f"{len(data)} bytes is too short for an .npy file")
        major = data[6]
        end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else 12 + int.from_bytes(data[8:12], "little")
        shape, fortran, dtype, offset = _npy_header(bytes(data[:end]))
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape, order="F" if fortran else "C")
    except ValueError as e:  # bad magic, bad header, truncated payload or a pickled object array
        raise SampleError(f"{name}: {e}") from e


def _all_finite(array: np.ndarray) -> bool:
    """One reduction instead of a boolean array: a NaN or inf anywhere makes the sum non-finite,
    and float16/float32 values cannot overflow a float64 sum."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf is the NaN this looks for
        return bool(np.isfinite(array.sum(dtype=np.float64)))


def decode_sample(sample: dict, need_text: bool = False, latent_shape: tuple[int, ...] | None = None) -> dict:
    """Raw tar members -> arrays for training. Raises ``SampleError`` for an unusable sample."""
    key = sample.get("__key__", "?")
    for member in ("clip.npy", "latent.npy") + (("text.npy",) if need_text else ()):
        if member not in sample:
            raise SampleError(f"{key}: missing {member}")
    clip = load_npy(sample["clip.npy"], f"{key}.clip.npy")
    latent = load_npy(sample["latent.npy"], f"{key}.latent.npy")
    if clip.ndim != 2 or clip.shape[0] == 0:
        raise SampleError(f"{key}: clip.npy has shape {clip.shape}, expected [T, D] with T > 0")
    if latent.ndim != 4 or latent.shape[0] != 2:
        raise SampleError(f"{key}: latent.npy has shape {latent.shape}, expected [2, C, H, W] (mean, std)")
    if latent_shape is not None and tuple(latent.shape) != tuple(latent_shape):
        raise SampleError(f"{key}: latent.npy has shape {latent.shape}, this run trains on {tuple(latent_shape)}")
    if not (_all_finite(clip) and _all_finite(latent)):
        raise SampleError(f"{key}: non-finite values in clip.npy or latent.npy")
    out = {"key": key, "clip": clip, "latent": latent, "text": None}
    if "text.npy" in sample:
        text = load_npy(sample["text.npy"], f"{key}.text.npy")
        if text.ndim != 1 or text.shape[0] != clip.shape[1]:
            raise SampleError(f"{key}: text.npy has shape {text.shape}, expected [{clip.shape[1]}]")
        out["text"] = text
    if "json" in sample:
        try:
            out["meta"] = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError(f"{key}: bad json member: {e}") from e
    for k in ("__state__", "__worker__"):
        if k in sample:
            out[k] = sample[k]
    return out


def collate(samples: list[dict]) -> dict:
    """Stack a batch; CLIP tokens are padded to the longest and ``clip_mask`` marks real frames."""
    if len({s["clip"].shape[1] for s in samples}) != 1:
        raise SampleError("CLIP embedding widths differ inside one batch")
    lengths = [s["clip"].shape[0] for s in samples]
    t_max, dim = max(lengths), samples[0]["clip"].shape[1]
    clip = np.zeros((len(samples), t_max, dim), np.float16)
    mask = np.zeros((len(samples), t_max), bool)
    for i, s in enumerate(samples):
        clip[i, : lengths[i]] = s["clip"]
        mask[i, : lengths[i]] = True
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "clip": torch.from_numpy(clip),
        "clip_mask": torch.from_numpy(mask),
        "latent": torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float16, copy=False)),
    }
    if all(s["text"] is not None for s in samples):
        batch["text"] = torch.from_numpy(np.stack([s["text"] for s in samples]).astype(np.float16, copy=False))
    if "__state__" in samples[-1]:
        batch["__state__"] = samples[-1]["__state__"]
        batch["__worker__"] = samples[-1]["__worker__"]
    return batch


def _skip_bad_sample(exn: Exception) -> bool:
    """webdataset handler: unusable samples are logged and skipped; anything else is raised."""
    if isinstance(exn, SampleError):
        log.warning("skipping sample: %s", exn)
        return True
    raise exn


# ---------------------------------------------------------------------------------------------
# the deterministic resampled stream

def stable_hash(*parts: object) -> int:
    """A 64-bit hash of the parts that is the same in every process and Python run (unlike hash())."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_samples(url: str, members: tuple[str, ...] = TRAIN_MEMBERS) -> Iterator[dict]:
    """Samples of one shard as dicts of raw member bytes (only ``members`` are read)."""
    def wanted(fname: str) -> bool:
        base = posixpath.basename(fname)
        return "." in base and base.split(".", 1)[1] in members

    local = _local_path(url)
    if local is not None:  # seekable: members training does not need are skipped, not read
        with tarfile.open(local, mode="r:") as tar:
            files = ({"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                     for info in tar if info.isfile() and wanted(info.name))
            yield from group_by_keys(files)
        return
    with open_url(url) as f:
        files = ({**d, "__url__": url} for d in tar_file_iterator(f, select_files=wanted))
        yield from group_by_keys(files)


class ResampledMixSource(IterableDataset):
    """Infinite stream of raw samples for one (rank, worker), each tagged with the state after it."""

    def __init__(self, urls: list[str], rank: int, seed: int, mix_shards: int,
                 resume: dict[int, dict] | None = None, members: tuple[str, ...] = TRAIN_MEMBERS,
                 max_failed_draws: int = 50):
        super().__init__()
        if not urls:
            raise ShardSourceError("no shards to read")
        self.urls = list(urls)
        self.rank = rank
        self.seed = seed
        self.mix = max(1, mix_shards)
        self.resume = resume or {}
        self.members = members
        self.max_failed_draws = max_failed_draws

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        stream = (self.seed, self.rank, worker, num_workers)
        state = self.resume.get(worker) or {"draws": 0, "emitted": 0, "slots": []}
        draws, emitted = int(state["draws"]), int(state["emitted"])
        slots: list[list[int]] = [list(s) for s in state["slots"]]  # [shard index, positions read]
        iters: list[Iterator[dict] | None] = [None] * len(slots)
        failed = 0

        def draw() -> list[int]:
            nonlocal draws
            index = stable_hash(*stream, "shard", draws) % len(self.urls)
            draws += 1
            return [index, 0]

        while len(slots) < self.mix:
            slots.append(draw())
            iters.append(None)
        while True:
            i = stable_hash(*stream, "pick", emitted) % self.mix
            if iters[i] is None:
                iters[i] = self._open(slots[i])
            sample = next(iters[i], None)
            if sample is None:  # shard exhausted (or unreadable): draw another into this slot
                failed = failed + 1 if slots[i][1] == 0 else 0
                if failed > self.max_failed_draws:
                    raise ShardSourceError(f"{failed} shard draws in a row gave no samples "
                                           f"(last: {self.urls[slots[i][0]]})")
                slots[i], iters[i] = draw(), None
                continue
            failed = 0
            slots[i][1] += 1
            emitted += 1
            sample["__state__"] = {"draws": draws, "emitted": emitted, "slots": [list(s) for s in slots]}
            sample["__worker__"] = worker
            yield sample

    def _open(self, slot: list[int]) -> Iterator[dict]:
        url, skip = self.urls[slot[0]], slot[1]

        def samples() -> Iterator[dict]:
            try:
                for n, sample in enumerate(shard_samples(url, self.members)):
                    if n >= skip:
                        yield sample
            except (OSError, ValueError, EOFError, tarfile.TarError) as e:
                log.warning("shard %s unreadable after sample %d: %s", url, skip, e)

        return samples()


def _stream_pipeline(source: ResampledMixSource, batch_size: int, need_text: bool,
                     latent_shape: tuple[int, ...] | None) -> wds.DataPipeline:
    return wds.DataPipeline(
        source,
        wds.map(functools.partial(decode_sample, need_text=need_text, latent_shape=latent_shape),
                handler=_skip_bad_sample),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )


class TrainLoader:
    """Endless, resumable batches for one rank; every rank gets as many batches as it asks for.

    Batch ``g`` of a rank comes from worker ``g % workers`` (the DataLoader's in-order round
    robin); after a resume the loader restarts at worker 0, so batches are re-ordered here to keep
    the exact sequence of an uninterrupted run. ``state_dict()`` describes the batches *consumed*,
    not the ones prefetched.
    """

    def __init__(self, shards: list[Shard], batch_size: int, rank: int, world_size: int,
                 cfg: ReaderConfig = ReaderConfig(), need_text: bool = False,
                 latent_shape: tuple[int, ...] | None = None, state: dict | None = None,
                 pin_memory: bool = False):
        self.urls = [s.url for s in shards]
        if not self.urls:
            raise ShardSourceError("no training shards")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.cfg, self.need_text, self.latent_shape, self.pin_memory = cfg, need_text, latent_shape, pin_memory
        self.workers = max(0, cfg.workers)
        self.streams = max(1, self.workers)
        self.counts = [0] * self.streams
        self.states: dict[int, dict] = {}
        self.reseed = 0
        if state is not None:
            self._restore(state)
        if len(self.urls) < world_size * self.streams and rank == 0:
            log.warning("only %d training shard(s) for %d rank(s) x %d worker(s): streams share shards "
                        "(resampled, so nobody runs dry, but write at least %d shards for better mixing)",
                        len(self.urls), world_size, self.streams, world_size * self.streams)

    def _fingerprint(self) -> str:
        return hashlib.sha256("\n".join(posixpath.basename(u) for u in self.urls).encode()).hexdigest()[:16]

    def _restore(self, state: dict) -> None:
        same = (state.get("streams") == self.streams and state.get("shards") == self._fingerprint()
                and state.get("seed") == self.cfg.seed and state.get("batch_size") == self.batch_size)
        if not same:
            log.warning("data stream cannot be resumed exactly (shards, workers, seed or batch size changed); "
                        "starting fresh streams")
            self.reseed = int(state.get("batches", 0))
            return
        self.counts = [int(c) for c in state["counts"]]
        self.states = {int(k): v for k, v in state["states"].items()}

    def state_dict(self) -> dict:
        return {"streams": self.streams, "shards": self._fingerprint(), "seed": self.cfg.seed,
                "batch_size": self.batch_size, "counts": list(self.counts),
                "batches": sum(self.counts), "states": {str(k): v for k, v in self.states.items()}}

    @property
    def batches(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[dict]:
        seed = self.cfg.seed + 1_000_003 * self.reseed
        source = ResampledMixSource(self.urls, self.rank, seed, self.cfg.mix_shards, resume=self.states)
        pipeline = _stream_pipeline(source, self.batch_size, self.need_text, self.latent_shape)
        loader = DataLoader(pipeline, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.cfg.prefetch if self.workers else None,
                            persistent_workers=False)
        pending: dict[int, dict] = {}
        start = [c for c in self.counts]
        received = [0] * self.streams
        for batch in loader:
            w = batch.pop("__worker__")
            index = (start[w] + received[w]) * self.streams + w
            received[w] += 1
            pending[index] = batch
            while self._next_index() in pending:
                nxt = self._next_index()
                out = pending.pop(nxt)
                wk = nxt % self.streams
                self.states[wk] = out.pop("__state__")
                self.counts[wk] += 1
                yield out

    def _next_index(self) -> int:
        """Global index of the next batch to hand out: counts are always a round-robin prefix."""
        return sum(self.counts)


def validation_batches(shards: list[Shard], batch_size: int, rank: int, n_batches: int, seed: int,
                       need_text: bool = False, latent_shape: tuple[int, ...] | None = None,
                       mix_shards: int = 4) -> list[dict]:
    """A fixed set of ``n_batches`` batches per rank (same samples at every validation)."""
    source = ResampledMixSource([s.url for s in shards], rank, stable_hash("val", seed) % (2**31), mix_shards)
    out = []
    for batch in _stream_pipeline(source, batch_size, need_text, latent_shape):
        batch.pop("__state__", None)
        batch.pop("__worker__", None)
        out.append(batch)
        if len(out) >= n_batches:
            break
    return out
