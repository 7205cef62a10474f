"""Training reader: stock webdataset compatibility, safe decoding, URLs, exact resume, DDP."""
from __future__ import annotations

import functools
import http.server
import io
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards.reader import ReaderConfig, TrainLoader, validation_samples
from shards.sources import ShardSourceError, find_shards, split_shards
from shards_fixture import CLIP_DIM, TINY_LATENT, make_sample, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), {"train": [1, 2, 7], "test": [3]},
                        frames=(20, 17, 22), with_audio=True)


def _take(loader: TrainLoader, n: int) -> list[list[str]]:
    it = iter(loader)
    return [next(it)["keys"] for _ in range(n)]


def test_stock_webdataset_reads_the_shards(shards):
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 10
    s = samples[0]
    assert s["clip.npy"].dtype == np.float16 and s["clip.npy"].shape[1] == CLIP_DIM
    assert s["latent.npy"].shape == (2, *TINY_LATENT) and s["text.npy"].shape == (CLIP_DIM,)
    assert s["json"]["caption"] and "." not in s["__key__"]


def test_find_shards_from_run_folder_shards_folder_and_brace_list(shards):
    from_out, card = find_shards(str(shards.parent))
    from_dir, _ = find_shards(str(shards))
    assert from_out == from_dir and card["latent_shape"] == [2, *TINY_LATENT]
    assert [s.count for s in split_shards(from_dir, "train")] == [1, 2, 7]
    listed, no_card = find_shards(str(shards / "train-{000000..000002}.tar"))
    assert [s.url for s in listed] == [s.url for s in split_shards(from_dir, "train")] and no_card is None
    keys = sum(_take(TrainLoader(listed, 3, 0, 1, ReaderConfig(workers=0, mix_shards=2, shuffle_buffer=4)), 4), [])
    assert len(keys) == 12 and set(keys) <= {f"fixture-train-{i:05d}" for i in range(10)}  # no counts: offset 0
    with pytest.raises(ShardSourceError, match="no index.json"):
        find_shards(str(shards / "nowhere"))


def test_unsafe_index_names_are_refused(tmp_path):
    (tmp_path / "index.json").write_text('{"shards": [{"name": "../../etc/passwd.tar", "split": "train"}]}')
    with pytest.raises(ShardSourceError, match="unsafe"):
        find_shards(str(tmp_path))


def test_clip_tokens_are_padded_with_a_mask(shards):
    train = split_shards(find_shards(str(shards))[0], "train")
    batch = next(iter(TrainLoader(train, 6, 0, 1, ReaderConfig(workers=0, mix_shards=2))))
    lengths = batch["clip_mask"].sum(1)
    assert batch["clip"].shape == (6, int(lengths.max()), CLIP_DIM) and len(set(lengths.tolist())) > 1
    for i, n in enumerate(lengths.tolist()):
        assert batch["clip"][i, n:].abs().sum() == 0 and batch["clip"][i, :n].abs().sum() > 0
    assert batch["latent"].shape == (6, 2, *TINY_LATENT) and batch["text"].shape == (6, CLIP_DIM)
    assert "audio" not in batch  # audio.flac is not even read for training


def test_pickled_npy_is_refused_and_the_stream_goes_on(tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        bad = make_sample("evil", 0, rng)
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        bad["clip.npy"] = buf.getvalue()
        sink.write(bad)
        for i in range(3):
            sink.write(make_sample(f"good{i}", i % 2, rng))
    (folder / "index.json").write_text('{"shards": [{"name": "train-000000.tar", "split": "train", "count": 4}]}')
    train = split_shards(find_shards(str(tmp_path))[0], "train")
    with caplog.at_level(logging.WARNING):
        keys = _take(TrainLoader(train, 3, 0, 1, ReaderConfig(workers=0, mix_shards=1)), 2)
    assert "evil" not in sum(keys, []) and set(sum(keys, [])) == {"good0", "good1", "good2"}
    assert "evil.clip.npy" in caplog.text and "allow_pickle" in caplog.text


def test_resume_continues_the_exact_batch_sequence(shards):
    """7 batches consumed from 2 workers (4 + 3), so the resumed loader must re-order its workers."""
    train = split_shards(find_shards(str(shards))[0], "train")
    cfg = ReaderConfig(workers=2, mix_shards=2, seed=5)
    straight = _take(TrainLoader(train, 3, 1, 2, cfg), 12)
    first = TrainLoader(train, 3, 1, 2, cfg)
    head = _take(first, 7)
    state = first.state_dict()
    assert state["counts"] == [4, 3]
    tail = _take(TrainLoader(train, 3, 1, 2, cfg, state=state), 5)
    assert head + tail == straight
    other_rank = _take(TrainLoader(train, 3, 0, 2, cfg), 12)
    assert other_rank != straight  # ranks read different streams


def test_http_and_fsspec_urls_give_the_same_batches(shards):
    train_local = split_shards(find_shards(str(shards))[0], "train")
    cfg = ReaderConfig(workers=0, mix_shards=2)
    expected = _take(TrainLoader(train_local, 4, 0, 1, cfg), 4)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        found, card = find_shards(f"http://127.0.0.1:{server.server_port}/")
        assert card["vae_scaling_factor"] > 0
        train_http = split_shards(found, "train")
        assert train_http[0].url.startswith("http://")
        assert _take(TrainLoader(train_http, 4, 0, 1, cfg), 4) == expected
    finally:
        server.shutdown()

    # any other scheme goes through fsspec (s3://, gs://, ...); its local backend stands in here
    found, _ = find_shards(f"local://{shards}")
    assert found[0].url.startswith("local://")
    assert _take(TrainLoader(split_shards(found, "train"), 4, 0, 1, cfg), 4) == expected
    with pytest.raises(ShardSourceError, match="nosuch"):  # a scheme no fsspec backend knows
        find_shards("nosuch://bucket/shards")


def test_validation_set_is_the_first_test_samples_once_each(shards):
    test = split_shards(find_shards(str(shards))[0], "test")
    keys = [s["key"] for s in validation_samples(test, 0)]
    assert keys == ["fixture-test-00010", "fixture-test-00011", "fixture-test-00012"]  # file order, no repeats
    assert [s["key"] for s in validation_samples(test, 2)] == keys[:2]


def _ddp_worker(rank: int, world: int, port: int, shards: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    train = split_shards(find_shards(shards)[0], "train")
    loader = TrainLoader(train, 2, rank, world, ReaderConfig(workers=2, mix_shards=2))
    it = iter(loader)
    done = torch.zeros(1)
    for _ in range(steps):
        batch = next(it)
        # a collective per step, as DDP does: a rank that ran out of data would hang the other
        dist.all_reduce(torch.tensor([float(len(batch["keys"]))]))
        done += 1
    dist.all_reduce(done)
    Path(out, f"rank{rank}.txt").write_text(f"{loader.batches} {int(done.item())}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_run_equal_steps_with_uneven_shards(shards, tmp_path):
    """10 samples in shards of 1, 2 and 7 for 2 ranks x 2 workers; every rank still gets 25 batches."""
    import torch.multiprocessing as mp

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_worker, args=(2, port, str(shards), 25, str(tmp_path)), nprocs=2,
                             join=False, start_method="fork")
    for p in ctx.processes:
        p.join(timeout=120)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert all(p.exitcode == 0 for p in ctx.processes)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["25 50", "25 50"]


def test_npy_members_decode_like_numpy_and_refuse_pickles():
    """The reader's zero-copy .npy parser agrees with np.load on dtypes, shapes and orders."""
    from shards.npy import SampleError, all_finite, load_npy

    for array in (np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.asfortranarray(np.ones((3, 5), np.float32)),
                  np.zeros((0, 768), np.float16), np.array(7, np.int64)):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        out = load_npy(buf.getvalue(), "x.npy")
        assert out.dtype == array.dtype and out.shape == array.shape and np.array_equal(out, array)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="Object arrays"):
        load_npy(pickled.getvalue(), "evil.npy")
    with pytest.raises(SampleError):
        load_npy(b"\x93NUMPY", "short.npy")
    assert all_finite(np.ones(10, np.float16))
    assert not all_finite(np.array([1, np.nan], np.float16))
    assert not all_finite(np.array([np.inf, -np.inf], np.float16))


# ---------------------------------------------------------------------------------------------
# shuffling: hashed offsets, the shuffle buffer, fresh streams


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> Path:
    """Four train shards of 25 samples each (100 distinct keys)."""
    return write_shards(tmp_path_factory.mktemp("big"), {"train": [25, 25, 25, 25]})


def test_ranks_drawing_one_shard_start_at_different_offsets(tmp_path):
    one = write_shards(tmp_path, {"train": [40]})
    train = split_shards(find_shards(str(one))[0], "train")
    cfg = ReaderConfig(workers=0, mix_shards=1, shuffle_buffer=1)
    a, b = (sum(_take(TrainLoader(train, 4, rank, 2, cfg), 10), []) for rank in (0, 1))
    assert sorted(a) == sorted(b) == sorted(set(a))  # each rank reads the whole shard once, wrapping around
    assert a != b and a[0] != b[0]  # but not in lockstep
    assert a[:20] != sorted(a[:20])  # from a hashed position, not from the first sample


def test_shuffle_buffer_mixes_shards_within_a_batch(big_shards):
    train = split_shards(find_shards(str(big_shards))[0], "train")
    shard_of = {f"fixture-train-{i:05d}": i // 25 for i in range(100)}
    plain = _take(TrainLoader(train, 8, 0, 1, ReaderConfig(workers=0, mix_shards=1, shuffle_buffer=1)), 10)
    mixed = _take(TrainLoader(train, 8, 0, 1, ReaderConfig(workers=0, mix_shards=1, shuffle_buffer=64)), 10)
    assert all(len({shard_of[k] for k in b}) == 1 for b in plain[:2])  # one shard at a time without a buffer
    assert sum(len({shard_of[k] for k in b}) for b in mixed) / len(mixed) >= 2.0


def test_resume_restores_the_shuffle_buffer_exactly(big_shards, caplog):
    train = split_shards(find_shards(str(big_shards))[0], "train")
    cfg = ReaderConfig(workers=2, mix_shards=3, shuffle_buffer=16, seed=2)
    straight = _take(TrainLoader(train, 4, 0, 1, cfg), 14)
    first = TrainLoader(train, 4, 0, 1, cfg)
    head = _take(first, 9)
    state = first.state_dict()
    assert all(len(s["buffer"]) == 15 for s in state["states"].values())  # (shard, position) pairs only
    with caplog.at_level(logging.WARNING):
        tail = _take(TrainLoader(train, 4, 0, 1, cfg, state=state), 5)
    assert head + tail == straight and "could not be read back" not in caplog.text


def test_an_unusable_state_starts_new_streams_instead_of_replaying(big_shards, caplog):
    """What a resume on another number of ranks gets: streams no earlier run read (no replay of step 0..K)."""
    train = split_shards(find_shards(str(big_shards))[0], "train")
    cfg = ReaderConfig(workers=0, mix_shards=2, shuffle_buffer=8)
    old = [_take(TrainLoader(train, 4, r, 2, cfg), 6) for r in range(2)]
    state = TrainLoader(train, 4, 0, 2, cfg).state_dict()
    with caplog.at_level(logging.WARNING):
        fresh = TrainLoader(train, 4, 0, 1, ReaderConfig(workers=0, mix_shards=3, shuffle_buffer=8),
                            state=state, generation=6)
        new = _take(fresh, 6)
    assert "mix_shards changed" in caplog.text
    assert new not in old and new[0] not in (old[0][0], old[1][0])
    assert fresh.state_dict()["generation"] == 6
    again = TrainLoader(train, 4, 0, 1, ReaderConfig(workers=0, mix_shards=3, shuffle_buffer=8),
                        state=fresh.state_dict(), generation=99)
    assert again.generation == 6  # a fitting state keeps its generation: later resumes are exact again


def test_a_truncated_shard_gives_the_samples_before_the_damage(tmp_path, caplog):
    folder = write_shards(tmp_path, {"train": [6]})
    shard = folder / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 3 // 5])
    train = split_shards(find_shards(str(folder))[0], "train")
    with caplog.at_level(logging.WARNING):
        keys = sum(_take(TrainLoader(train, 2, 0, 1, ReaderConfig(workers=0, mix_shards=1, shuffle_buffer=1)), 6), [])
    assert set(keys) <= {f"fixture-train-{i:05d}" for i in range(4)} and len(set(keys)) >= 2
    assert "is damaged after sample" in caplog.text
