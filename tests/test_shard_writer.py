"""Deterministic tar bytes, atomic writes, the shard layout, its resume records and sample fingerprints."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from core.atomic import temp_path
from core.fingerprint import fingerprint
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tar_writer import hand_written  # noqa: E402

from shards.shard_writer import (SampleCache, ShardAssembler, ShardError, npy_bytes, read_tar_samples, shard_name,
                                 shard_order, write_index, write_tar)


def _sample(i: int) -> dict[str, bytes]:
    rng = np.random.default_rng(i)
    return {"audio.flac": bytes(rng.integers(0, 255, 300, dtype=np.uint8)), "json": b'{"i": %d}' % i,
            "latent.npy": npy_bytes(rng.standard_normal((2, 8, 4, 2)).astype(np.float16)),
            "clip.npy": npy_bytes(rng.standard_normal((3, 4)).astype(np.float16))}


def _fps(keys, version: str = "v1") -> dict[str, str]:
    return {k: fingerprint({"key": k, "recipe": version}) for k in keys}


def test_tar_bytes_are_deterministic_with_fixed_metadata(tmp_path):
    samples = [(f"k{i}", _sample(i)) for i in range(3)]
    n1, size1, sha1 = write_tar(tmp_path / "a.tar", samples)
    n2, size2, sha2 = write_tar(tmp_path / "b.tar", [(k, dict(reversed(m.items()))) for k, m in samples])
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()  # member order never depends on the dict's order
    hand_written(tmp_path / "ref.tar", samples)  # the plain-tarfile reference (bench/tar_writer.py)
    assert data == (tmp_path / "ref.tar").read_bytes()  # webdataset.TarWriter gives the reference bytes
    (tmp_path / "ref.tar").unlink()
    assert (n1, size1, sha1) == (3, len(data), hashlib.sha256(data).hexdigest()) == (n2, size2, sha2)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["k0.audio.flac", "k0.clip.npy", "k0.json", "k0.latent.npy"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    back = list(read_tar_samples(tmp_path / "a.tar"))
    assert [k for k, _ in back] == ["k0", "k1", "k2"] and back[1][1] == samples[1][1]
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("key,member", [("a.b", "json"), ("a/b", "json"), ("", "json"), ("ok", "pyd"),
                                        ("ok", "x.pth"), ("ok", "pickle"), ("ok", "../json"), ("ok", "_meta")])
def test_unsafe_keys_and_pickle_members_are_refused(tmp_path, key, member):
    with pytest.raises(ShardError):
        write_tar(tmp_path / "x.tar", [(key, {member: b"data"})])
    assert not list(tmp_path.iterdir())  # no shard, no partial file


def test_interrupted_write_leaves_nothing(tmp_path):
    def samples():
        yield "k0", _sample(0)
        raise KeyboardInterrupt  # a kill in the middle of a shard

    with pytest.raises(KeyboardInterrupt):
        write_tar(tmp_path / "train-000000.tar", samples())
    assert not list(tmp_path.iterdir())


def _blocked_writer(path, release: threading.Event, started: threading.Event, errors: list):
    """A writer of ``path`` that stops in the middle of its tar until ``release`` is set."""
    def samples():
        yield "k1", _sample(1)
        started.set()
        release.wait(30)
        yield "k2", _sample(2)

    def run():
        try:
            write_tar(path, samples())
        except Exception as e:  # noqa: BLE001 - the test reports what the writer hit
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    return thread


def test_two_writers_of_one_file_keep_their_own_temporary_files(tmp_path):
    path = tmp_path / "train-000000.tar"
    release, started, errors = threading.Event(), threading.Event(), []
    thread = _blocked_writer(path, release, started, errors)
    write_tar(path, [("k0", _sample(0))])  # a second writer of the same file finishes first
    release.set()
    thread.join(30)
    assert errors == []
    assert [k for k, _ in read_tar_samples(path)] == ["k1", "k2"]  # the last complete write wins, whole
    assert not list(tmp_path.glob(".*"))


def test_cleanup_removes_only_what_dead_writers_left(tmp_path):
    cache = SampleCache(tmp_path)
    target = cache.samples / "k1.x.tar"
    release, started, errors = threading.Event(), threading.Event(), []
    thread = _blocked_writer(target, release, started, errors)  # a live writer, mid-file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = temp_path(cache.samples / "k9.x.tar").name.replace(f".{os.getpid()}.", f".{dead.stdout.strip()}.")
    (cache.samples / orphan).write_bytes(b"half a sample")
    assert SampleCache(tmp_path).clean_partials() == 1  # what a second run does when it starts
    release.set()
    thread.join(30)
    assert errors == [] and target.is_file()
    assert not list(cache.samples.glob(".*"))


def _settle(cache: SampleCache, keys, fps, failed=()):
    for k in keys:
        if k in failed:
            cache.put_failure(k, fps[k], "decode_error: broken", {"split": "train"})
        else:
            cache.put(k, fps[k], _sample(int(k[1:])))


def test_layout_hashed_order_full_shards_and_failures_skipped(tmp_path):
    keys = [f"k{i:02d}" for i in range(10)]
    order = sorted(keys, key=shard_order)
    assert order != sorted(keys)  # hashed, not alphabetical
    fps = _fps(keys + ["k90"])
    asm = ShardAssembler(tmp_path, {"train": list(reversed(keys)), "test": ["k90"]}, 3, fps)
    _settle(asm.cache, order[:4], fps, failed={order[1]})
    assert asm.advance() == ["train-000000.tar"]  # order 0, 2, 3; order[4] not settled yet
    assert not asm.cache.sample_path(order[0], fps[order[0]]).exists()  # dropped once in a shard
    _settle(asm.cache, order[4:] + ["k90"], fps, failed={order[5], order[9]})
    assert asm.advance(final=True) == ["test-000000.tar", "train-000001.tar", "train-000002.tar"]
    got = {s.name: [k for k, _ in read_tar_samples(tmp_path / s.name)] for s in asm.index()}
    assert got == {"test-000000.tar": ["k90"], "train-000000.tar": [order[0], order[2], order[3]],
                   "train-000001.tar": [order[4], order[6], order[7]], "train-000002.tar": [order[8]]}
    for s in asm.index():
        data = (tmp_path / s.name).read_bytes()
        assert (s.bytes, s.sha256, s.count) == (len(data), hashlib.sha256(data).hexdigest(), len(got[s.name]))
    assert sorted(f["key"] for f in asm.failures()) == sorted([order[1], order[5], order[9]])
    write_index(tmp_path, asm.index())
    assert (tmp_path / "index.json").is_file()


def test_augmented_variants_and_concats_are_spread_over_the_split():
    """The default plan's keys: variants sit beside their source and concats sort first in key order."""
    clips = [f"vggsound-id{i:04d}-000030" for i in range(400)]
    keys = clips + [f"{c}-ts080" for c in clips] + [f"{c}-ts125" for c in clips]
    keys += [f"cat-{a}-{b}" for a, b in zip(clips, clips[1:] + clips[:1])]
    order = sorted(keys, key=shard_order)
    source = {k: k.removesuffix("-ts080").removesuffix("-ts125") for k in keys if not k.startswith("cat-")}
    neighbours = sum(source.get(a, a) == source.get(b, b) for a, b in zip(order, order[1:]))
    assert neighbours < 10  # sorted order: 800 neighbouring pairs of one clip's versions
    concat_share = [sum(k.startswith("cat-") for k in order[i:i + 100]) / 100 for i in range(0, len(order), 100)]
    assert 0.1 < min(concat_share) and max(concat_share) < 0.4  # a quarter everywhere, not a block


def test_resume_skips_finished_shards_and_rewrites_damaged_ones(tmp_path):
    keys = [f"k{i:02d}" for i in range(5)]
    fps = _fps(keys)
    asm = ShardAssembler(tmp_path, {"train": keys}, 2, fps)
    _settle(asm.cache, keys, fps)
    asm.advance(final=True)
    first = (tmp_path / "train-000000.tar").stat()
    again = ShardAssembler(tmp_path, {"train": keys}, 2, fps)
    assert again.pending_keys() == set()
    assert again.advance(final=True) == [] and len(again.skipped) == 3
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    (tmp_path / "train-000002.tar").write_bytes(b"truncated")  # a damaged shard is written again
    damaged = ShardAssembler(tmp_path, {"train": keys}, 2, fps)
    last = sorted(keys, key=shard_order)[-1]
    assert damaged.pending_keys() == {last}  # its sample was dropped after the shard was written


def _shards(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _fresh(tmp_path, name, keys, fps, size, failed=()):
    asm = ShardAssembler(tmp_path / name, {"train": keys}, size, fps)
    _settle(asm.cache, keys, fps, failed)
    asm.advance(final=True)
    return _shards(tmp_path / name)


def _sample_v2(i: int) -> dict[str, bytes]:
    return {**_sample(i), "json": b'{"i": %d, "recipe": 2}' % i}


def test_a_changed_sample_is_encoded_again_and_nothing_stale_is_reused(tmp_path):
    """Same key, new recipe (``X-ts125`` with a new offset): only that sample is encoded again, its
    shard is rewritten, and the folder ends byte-identical to a fresh run of the new plan."""
    keys = [f"k{i:02d}" for i in range(7)]
    mid = sorted(keys, key=shard_order)[4]  # in the middle shard
    old = _fps(keys)
    out = tmp_path / "out"
    asm = ShardAssembler(out, {"train": keys}, 3, old)
    _settle(asm.cache, keys, old)
    asm.advance(final=True)

    new = {**old, mid: fingerprint({"key": mid, "recipe": "v2"})}
    again = ShardAssembler(out, {"train": keys}, 3, new)
    again.advance()
    assert again.pending_keys() == {mid}  # its neighbours come back from the old shard, not re-encoded
    assert again.cache.status(mid, old[mid]) is None and again.cache.status(mid, new[mid]) is None
    again.cache.put(mid, new[mid], _sample_v2(int(mid[1:])))
    again.advance(final=True)
    assert again.skipped == ["train-000000.tar", "train-000002.tar"] and again.written == ["train-000001.tar"]
    expected = ShardAssembler(tmp_path / "fresh", {"train": keys}, 3, new)
    _settle(expected.cache, [k for k in keys if k != mid], new)
    expected.cache.put(mid, new[mid], _sample_v2(int(mid[1:])))
    expected.advance(final=True)
    assert _shards(out) == _shards(tmp_path / "fresh")


def test_a_sample_that_now_fails_moves_the_later_shards(tmp_path):
    keys = [f"k{i:02d}" for i in range(8)]
    old = _fps(keys)
    out = tmp_path / "out"
    asm = ShardAssembler(out, {"train": keys}, 3, old)
    _settle(asm.cache, keys, old)
    asm.advance(final=True)
    assert sorted(_shards(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]

    new = {**old, "k01": fingerprint({"key": "k01", "recipe": "v2"})}  # its source file is now broken
    again = ShardAssembler(out, {"train": keys}, 3, new)
    again.advance()
    assert again.pending_keys() == {"k01"}
    again.cache.put_failure("k01", new["k01"], "decode_error: broken")
    again.advance(final=True)
    assert _shards(out) == _fresh(tmp_path, "fresh", keys, new, 3, failed={"k01"})
    assert [s.name for s in again.index()] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [f["key"] for f in again.failures()] == ["k01"]


def test_a_changed_key_set_is_reassembled_without_reencoding(tmp_path):
    keys = [f"k{i:02d}" for i in range(5)]
    fps = _fps(keys + ["k015"])
    out = tmp_path / "out"
    asm = ShardAssembler(out, {"train": keys}, 2, fps)
    _settle(asm.cache, keys, fps)
    asm.advance(final=True)
    changed = ShardAssembler(out, {"train": keys[:-1] + ["k015"]}, 2, fps)  # k015 in, k04 out
    changed.advance()
    assert changed.pending_keys() == {"k015"}
    changed.cache.put("k015", fps["k015"], _sample(15))
    changed.advance(final=True)
    assert _shards(out) == _fresh(tmp_path, "fresh", keys[:-1] + ["k015"], fps, 2)


def test_fewer_keys_leave_no_shard_of_the_longer_run_in_the_index(tmp_path):
    keys = [f"k{i:02d}" for i in range(4)]
    fps = _fps(keys)
    out = tmp_path / "out"
    asm = ShardAssembler(out, {"train": keys}, 2, fps)
    _settle(asm.cache, keys, fps)
    asm.advance(final=True)
    first = sorted(keys, key=shard_order)[:2]  # the keys of train-000000.tar
    fewer = ShardAssembler(out, {"train": first}, 2, fps)
    assert fewer.advance(final=True) == [] and fewer.skipped == ["train-000000.tar"]
    assert [s.name for s in fewer.index()] == ["train-000000.tar"]  # not train-000001.tar with other keys
    assert _shards(out) == _fresh(tmp_path, "fresh", first, fps, 2)


def test_cache_entries_of_other_fingerprints_are_not_taken(tmp_path):
    cache = SampleCache(tmp_path)
    a, b = fingerprint({"v": "a"}), fingerprint({"v": "b"})
    cache.put("k1", a, _sample(1))
    cache.put_failure("k2", a, "decode_error: x")
    assert (cache.status("k1", a), cache.status("k1", b), cache.status("k2", a), cache.status("k2", b)) == (
        "ok", None, "failed", None)
    assert cache.drop_stale({"k1": b, "k2": a}) == 1 and cache.status("k2", a) == "failed"
    with pytest.raises(ShardError, match="fingerprint"):
        cache([{"key": "k3", "status": "ok", "json": b"{}"}])  # a work row must say what made it


def test_final_advance_refuses_unsettled_keys(tmp_path):
    fps = _fps(["a", "b"])
    asm = ShardAssembler(tmp_path, {"train": ["a", "b"]}, 5, fps)
    asm.cache.put("a", fps["a"], _sample(1))
    assert asm.advance() == []
    with pytest.raises(ShardError, match="never encoded"):
        asm.advance(final=True)
    assert shard_name("my-split", 3) == "my_split-000003.tar"


def test_a_retried_failure_that_now_passes_rewrites_its_shard_and_the_later_ones(tmp_path):
    """A crash or unexpected error is dropped at the start of a rerun: its shard waits for the retry,
    is kept untouched when the sample fails again, and is rewritten (with every later shard, which
    move by one sample) when it is encoded now: the folder then equals a run where it never failed."""
    keys = [f"k{i:02d}" for i in range(8)]
    fps = _fps(keys)
    early, late = sorted(keys, key=shard_order)[1], sorted(keys, key=shard_order)[7]
    out = tmp_path / "out"
    asm = ShardAssembler(out, {"train": keys}, 3, fps)
    _settle(asm.cache, [k for k in keys if k not in (early, late)], fps)
    asm.cache.put_failure(early, fps[early], "worker_crashed: worker process 1 killed by SIGKILL")
    asm.cache.put_failure(late, fps[late], "decode_error: broken file")  # bad input: never retried
    asm.advance(final=True)
    first = _shards(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    again = ShardAssembler(out, {"train": keys}, 3, fps, SampleCache(out))
    assert again.cache.drop_failures(("worker_crashed", "stage_error")) == [early]
    again = ShardAssembler(out, {"train": keys}, 3, fps, again.cache)
    assert again.advance() == [] and again.pending_keys() == {early}  # its shard waits for the retry
    again.cache.put_failure(early, fps[early], "stage_error: encode: RuntimeError: CUDA error")
    again.advance(final=True)  # failed again: nothing is rewritten
    assert _shards(out) == first and {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps

    third = ShardAssembler(out, {"train": keys}, 3, fps, SampleCache(out))
    assert third.cache.drop_failures(("worker_crashed", "stage_error")) == [early]
    third = ShardAssembler(out, {"train": keys}, 3, fps, third.cache)
    third.advance()
    third.cache.put(early, fps[early], _sample(int(early[1:])))
    third.advance(final=True)
    assert _shards(out) == _fresh(tmp_path, "fresh", keys, fps, 3, failed={late})
    held = [k for name in _shards(out) for k, _ in read_tar_samples(out / name)]
    assert sorted(held) == sorted(k for k in keys if k != late)  # every sample exactly once
    assert [f["key"] for f in third.failures()] == [late]
    assert third.restored == ["train-000000.tar", "train-000001.tar"]  # the retried sample's and the next
    assert third.written == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
