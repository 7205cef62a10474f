"""Training reader: endless, resumable batches for one DDP rank, and a fixed validation set.

Why not ``WebDataset(urls, resampled=True).with_epoch(n)`` as is: the trainer resumes *exactly*
(resuming at step k and training to m gives the losses of a straight run to m), so each worker
runs the deterministic stream of ``shards.stream`` whose position a checkpoint can hold. Batches
are built with ``webdataset.DataPipeline``/``batched``; ``.npy`` members are decoded without
pickle (``shards.npy``) and only the members training needs are read (``audio.flac`` is skipped).
Where samples come from (folders, URLs, the index): ``shards.sources``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import posixpath
import tarfile
from typing import Iterator

import webdataset as wds
from torch.utils.data import DataLoader

from core.keys import stable_hash
from shards.batch import collate, decode_sample, skip_bad_sample
from shards.config import ReaderConfig
from shards.npy import SampleError
from shards.sources import Shard, ShardSourceError, shard_samples, train_members
from shards.stream import ResampledMixSource

log = logging.getLogger(__name__)


def _stream_pipeline(source: ResampledMixSource, batch_size: int, need_text: bool,
                     latent_shape: tuple[int, ...] | None, vision: str = "clip",
                     need_flow: bool = False, need_video: bool = True) -> wds.DataPipeline:
    return wds.DataPipeline(
        source,
        wds.map(functools.partial(decode_sample, need_text=need_text, latent_shape=latent_shape, vision=vision,
                                  need_flow=need_flow, need_video=need_video),
                handler=skip_bad_sample),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate for ready batches (its default walks every nested list and dict)."""
    return batch


class TrainLoader:
    """Endless, resumable batches for one rank; every rank gets as many batches as it asks for.

    Batch ``g`` of a rank comes from worker ``g % workers`` (the DataLoader's in-order round
    robin); after a resume the loader restarts at worker 0, so batches are re-ordered here to keep
    the exact sequence of an uninterrupted run. ``state_dict()`` describes the batches *consumed*,
    not the ones prefetched. A ``state`` that does not fit (other shards, workers, seed, batch size
    or mixing) cannot be continued exactly: the loader then starts streams that no earlier run
    used, keyed by ``generation`` (the trainer passes the step it resumes at), so nothing is replayed.
    """

    def __init__(self, shards: list[Shard], batch_size: int, rank: int, world_size: int,
                 cfg: ReaderConfig = ReaderConfig(), need_text: bool = False,
                 latent_shape: tuple[int, ...] | None = None, state: dict | None = None,
                 pin_memory: bool = False, generation: int = 0, vision: str = "clip", need_flow: bool = False,
                 need_video: bool = True):
        self.shards = list(shards)
        self.vision, self.need_flow = vision, need_flow  # which vision member (and its flow) batches carry
        if not self.shards:
            raise ShardSourceError("no training shards")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.cfg, self.need_text, self.latent_shape, self.pin_memory = cfg, need_text, latent_shape, pin_memory
        self.need_video = need_video
        self.workers = max(0, cfg.workers)
        self.streams = max(1, self.workers)
        self.counts = [0] * self.streams
        self.states: dict[int, dict] = {}
        self.generation = generation
        if state is not None:
            self._restore(state)
        if len(self.shards) < world_size * self.streams and rank == 0:
            log.warning("only %d training shard(s) for %d rank(s) x %d worker(s): streams share shards "
                        "(resampled, so nobody runs dry, but write at least %d shards for better mixing)",
                        len(self.shards), world_size, self.streams, world_size * self.streams)

    def _fingerprint(self) -> str:
        names = "\n".join(posixpath.basename(s.url) + (f" {s.weight!r}" if s.weight != 1.0 else "")
                          for s in self.shards)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def _layout(self) -> dict:
        return {"streams": self.streams, "shards": self._fingerprint(), "seed": self.cfg.seed,
                "batch_size": self.batch_size, "mix_shards": self.cfg.mix_shards,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def _restore(self, state: dict) -> None:
        layout = self._layout()
        changed = sorted(k for k, v in layout.items() if state.get(k) != v)
        if changed:
            log.warning("data stream cannot be resumed exactly (%s changed): starting new streams (generation %d)",
                        ", ".join(changed), self.generation)
            return
        self.generation = int(state.get("generation", 0))
        self.counts = [int(c) for c in state["counts"]]
        self.states = {int(k): v for k, v in state["states"].items()}

    def state_dict(self) -> dict:
        return {**self._layout(), "generation": self.generation, "counts": list(self.counts),
                "batches": sum(self.counts), "states": {str(k): v for k, v in self.states.items()}}

    @property
    def batches(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[dict]:
        seed = stable_hash("stream", self.cfg.seed, self.generation) if self.generation else self.cfg.seed
        # without video (audio pre-training, text-only conditions) no vision member is even read
        members = train_members(self.vision, self.need_flow, self.need_video)
        source = ResampledMixSource(self.shards, self.rank, seed, self.cfg.mix_shards, self.cfg.shuffle_buffer,
                                    resume=self.states, members=members)
        pipeline = _stream_pipeline(source, self.batch_size, self.need_text, self.latent_shape, self.vision,
                                    self.need_flow, self.need_video)
        loader = DataLoader(pipeline, batch_size=None, collate_fn=_as_is, num_workers=self.workers,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.cfg.prefetch if self.workers else None,
                            persistent_workers=False)
        pending: dict[int, dict] = {}
        start = list(self.counts)
        received = [0] * self.streams
        for batch in loader:
            w = batch.pop("__worker__")
            pending[(start[w] + received[w]) * self.streams + w] = batch
            received[w] += 1
            while self.batches in pending:  # counts are always a round-robin prefix
                nxt = self.batches
                out = pending.pop(nxt)
                self.states[nxt % self.streams] = out.pop("__state__")
                self.counts[nxt % self.streams] += 1
                yield out


def validation_samples(shards: list[Shard], limit: int, need_text: bool = False,
                       latent_shape: tuple[int, ...] | None = None, vision: str = "clip",
                       need_flow: bool = False, need_video: bool = True) -> list[dict]:
    """The first ``limit`` usable samples of ``shards`` in index and file order (all when ``limit``
    is 0): a fixed list, read once, never resampled. Unusable samples are logged and skipped."""
    out: list[dict] = []
    for shard in shards:
        try:
            for _, raw in shard_samples(shard.url, train_members(vision, need_flow, need_video)):
                try:
                    out.append(decode_sample(raw, need_text, latent_shape, vision, need_flow, need_video))
                except SampleError as e:
                    log.warning("validation: skipping sample: %s", e)
                if limit and len(out) >= limit:
                    return out
        except (OSError, ValueError, EOFError, tarfile.TarError) as e:
            log.warning("validation: shard %s unreadable after %d sample(s): %s", shard.url, len(out), e)
    return out
