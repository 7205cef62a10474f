"""One data-loader worker's endless, deterministic, resumable stream of raw samples.

The trainer must resume *exactly*, so a worker's position is a small piece of state a checkpoint
can hold, and every random choice is a hash of (seed, rank, worker, counter):

* shards are drawn with replacement ("resampled"), so no rank or worker can run out of data;
* each draw starts at a hashed offset into its shard and wraps around, so ranks that draw the
  same shard do not emit the same samples in lockstep;
* ``mix_shards`` drawn shards are read at once, each next sample taken from a hashed one of them;
* a shuffle buffer of ``buffer`` samples: each output is a hashed pick from it and its place is
  refilled from the shards. Its contents are checkpointed as (shard, position) pairs and read
  back on resume, so the buffer costs no replay.

Every sample carries the stream state after it; the loader keeps the state of the last batch
the trainer consumed.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import tarfile
from collections import defaultdict
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from core.keys import stable_hash
from shards.sources import TRAIN_MEMBERS, Shard, ShardSourceError, shard_samples

log = logging.getLogger(__name__)

_END = 2**62  # "to the end of the shard"


def _cumulative(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [x / total for x in itertools.accumulate(weights)]


class ResampledMixSource(IterableDataset):
    """Infinite stream of raw samples for one (rank, worker), each tagged with the state after it."""

    def __init__(self, shards: list[Shard], rank: int, seed: int, mix_shards: int, buffer: int = 0,
                 resume: dict[int, dict] | None = None, members: tuple[str, ...] = TRAIN_MEMBERS,
                 max_failed_draws: int = 50):
        super().__init__()
        if not shards:
            raise ShardSourceError("no shards to read")
        self.shards = list(shards)
        self.rank, self.seed = rank, seed
        self.mix, self.buffer = max(1, mix_shards), max(1, buffer)
        self.resume = resume or {}
        self.members = members
        self.max_failed_draws = max_failed_draws
        weights = [s.weight for s in self.shards]
        # a mixture draws shards by weight (cumulative table); equal weights keep the plain modulo draw
        self.cumulative = None if len(set(weights)) == 1 else _cumulative(weights)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _WorkerStream(self, (self.seed, self.rank, worker, num_workers), self.resume.get(worker)).run(worker)


class _WorkerStream:
    """The mutable state of one worker's stream; ``state()`` is what a checkpoint stores."""

    def __init__(self, src: ResampledMixSource, stream: tuple, state: dict | None):
        self.src, self.stream = src, stream
        state = state or {}
        self.draws = int(state.get("draws", 0))
        self.pulled = int(state.get("pulled", 0))
        self.emitted = int(state.get("emitted", 0))
        # a slot: [shard index, start offset, next position, wrapped (0/1)]
        self.slots: list[list[int]] = [list(s) for s in state.get("slots", [])]
        self.iters: list[Iterator | None] = [None] * len(self.slots)
        self.fresh = [False] * len(self.slots)
        self.ids: list[tuple[int, int]] = []
        self.items: list[dict] = []
        if state.get("buffer"):
            self._reread([tuple(x) for x in state["buffer"]])
        while len(self.slots) < src.mix:
            self.slots.append(self._draw())
            self.iters.append(None)
            self.fresh.append(True)

    def state(self) -> dict:
        return {"draws": self.draws, "pulled": self.pulled, "emitted": self.emitted,
                "slots": [list(s) for s in self.slots], "buffer": list(self.ids)}

    def _draw(self) -> list[int]:
        h = stable_hash(*self.stream, "shard", self.draws)
        index = h % len(self.src.shards) if self.src.cumulative is None else \
            min(bisect.bisect_right(self.src.cumulative, h / 2**64), len(self.src.shards) - 1)
        count = self.src.shards[index].count
        offset = stable_hash(*self.stream, "offset", self.draws) % count if count else 0
        self.draws += 1
        return [index, offset, offset, 0]

    def _open(self, slot: list[int]) -> Iterator[tuple[int, dict]]:
        index, offset, pos, wrapped = slot
        url = self.src.shards[index].url
        select, stop = (range(pos, offset), offset) if wrapped else (range(pos, _END), None)
        try:
            yield from shard_samples(url, self.src.members, select, stop)
        except (OSError, ValueError, EOFError, tarfile.TarError) as e:
            log.warning("shard %s unreadable at sample %d: %s", url, pos, e)

    def _pull(self) -> tuple[tuple[int, int], dict]:
        """The next raw sample from the mix of open shards, as ((shard, position), sample)."""
        failed = 0
        while True:
            i = stable_hash(*self.stream, "pick", self.pulled) % self.src.mix
            slot = self.slots[i]
            if self.iters[i] is None:
                self.iters[i] = self._open(slot)
            got = next(self.iters[i], None)
            if got is not None:
                self.pulled += 1
                self.fresh[i] = False
                slot[2] = got[0] + 1
                return (slot[0], got[0]), got[1]
            if not slot[3] and slot[1] > 0:  # end of the shard: wrap around to its first samples
                slot[2], slot[3], self.iters[i] = 0, 1, None
                continue
            failed = failed + 1 if self.fresh[i] else 0
            if failed > self.src.max_failed_draws:
                raise ShardSourceError(f"{failed} shard draws in a row gave no samples "
                                       f"(last: {self.src.shards[slot[0]].url})")
            self.slots[i], self.iters[i], self.fresh[i] = self._draw(), None, True

    def run(self, worker: int) -> Iterator[dict]:
        while True:
            while len(self.items) < self.src.buffer:
                ident, sample = self._pull()
                self.ids.append(ident)
                self.items.append(sample)
            j = stable_hash(*self.stream, "buffer", self.emitted) % len(self.items)
            sample = self.items[j]
            self.items[j], self.ids[j] = self.items[-1], self.ids[-1]
            self.items.pop()
            self.ids.pop()
            self.emitted += 1
            sample["__state__"] = self.state()
            sample["__worker__"] = worker
            yield sample

    def _reread(self, ids: list[tuple[int, int]]) -> None:
        """Read the checkpointed shuffle buffer back from its shards (each shard scanned once)."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for index, pos in ids:
            wanted[index].add(pos)
        found: dict[tuple[int, int], dict] = {}
        for index, positions in sorted(wanted.items()):
            url = self.src.shards[index].url
            try:
                for pos, sample in shard_samples(url, self.src.members, positions, max(positions) + 1):
                    found[(index, pos)] = sample
            except (OSError, ValueError, EOFError, tarfile.TarError) as e:
                log.warning("shard %s unreadable while restoring the shuffle buffer: %s", url, e)
        missing = [i for i in ids if i not in found]
        if missing:
            log.warning("%d shuffle-buffer sample(s) could not be read back (e.g. %s): the stream goes on "
                        "without them, so it is no longer exactly the uninterrupted one", len(missing),
                        self.src.shards[missing[0][0]].url)
        for ident in ids:
            if ident in found:
                self.ids.append(ident)
                self.items.append(dict(found[ident]))
