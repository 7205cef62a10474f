"""Deterministic tar bytes, atomic writes, the shard layout and its resume records."""
from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest

from shards.shard_writer import (SampleCache, ShardAssembler, ShardError, npy_bytes, read_tar_samples, shard_name,
                                 write_index, write_tar)


def _sample(i: int) -> dict[str, bytes]:
    rng = np.random.default_rng(i)
    return {"audio.flac": bytes(rng.integers(0, 255, 300, dtype=np.uint8)), "json": b'{"i": %d}' % i,
            "latent.npy": npy_bytes(rng.standard_normal((2, 8, 4, 2)).astype(np.float16)),
            "clip.npy": npy_bytes(rng.standard_normal((3, 4)).astype(np.float16))}


def test_tar_bytes_are_deterministic_with_fixed_metadata(tmp_path):
    samples = [(f"k{i}", _sample(i)) for i in range(3)]
    n1, size1, sha1 = write_tar(tmp_path / "a.tar", samples)
    n2, size2, sha2 = write_tar(tmp_path / "b.tar", list(reversed(samples))[::-1])
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    assert (n1, size1, sha1) == (3, len(data), hashlib.sha256(data).hexdigest()) == (n2, size2, sha2)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["k0.json", "k0.clip.npy", "k0.latent.npy", "k0.audio.flac"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    back = list(read_tar_samples(tmp_path / "a.tar"))
    assert [k for k, _ in back] == ["k0", "k1", "k2"] and back[1][1] == samples[1][1]
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("key,member", [("a.b", "json"), ("a/b", "json"), ("", "json"), ("ok", "pyd"),
                                        ("ok", "x.pth"), ("ok", "pickle"), ("ok", "../json")])
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


def _settle(cache: SampleCache, keys, failed=()):
    for k in keys:
        if k in failed:
            cache.put_failure(k, "decode_error: broken", {"split": "train"})
        else:
            cache.put(k, _sample(int(k[1:])))


def test_layout_sorted_full_shards_and_failures_skipped(tmp_path):
    keys = [f"k{i:02d}" for i in range(10)]
    asm = ShardAssembler(tmp_path, {"train": list(reversed(keys)), "test": ["k90"]}, shard_size=3)
    _settle(asm.cache, keys[:4], failed={"k01"})
    assert asm.advance() == ["train-000000.tar"]  # k00 k02 k03; k04 not settled yet
    assert not asm.cache.sample_path("k00").exists()  # cached samples are dropped once in a shard
    _settle(asm.cache, keys[4:] + ["k90"], failed={"k05", "k09"})
    assert asm.advance(final=True) == ["test-000000.tar", "train-000001.tar", "train-000002.tar"]
    got = {s.name: [k for k, _ in read_tar_samples(tmp_path / s.name)] for s in asm.index()}
    assert got == {"test-000000.tar": ["k90"], "train-000000.tar": ["k00", "k02", "k03"],
                   "train-000001.tar": ["k04", "k06", "k07"], "train-000002.tar": ["k08"]}
    for s in asm.index():
        data = (tmp_path / s.name).read_bytes()
        assert (s.bytes, s.sha256, s.count) == (len(data), hashlib.sha256(data).hexdigest(), len(got[s.name]))
    write_index(tmp_path, asm.index())
    assert (tmp_path / "index.json").is_file()


def test_resume_skips_finished_shards_and_detects_changed_samples(tmp_path):
    keys = [f"k{i:02d}" for i in range(5)]
    asm = ShardAssembler(tmp_path, {"train": keys}, shard_size=2)
    _settle(asm.cache, keys)
    asm.advance(final=True)
    first = (tmp_path / "train-000000.tar").stat()
    again = ShardAssembler(tmp_path, {"train": keys}, shard_size=2)
    assert again.pending_keys() == set()
    assert again.advance(final=True) == [] and len(again.skipped) == 3
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    (tmp_path / "train-000002.tar").write_bytes(b"truncated")  # a damaged shard is written again
    damaged = ShardAssembler(tmp_path, {"train": keys}, shard_size=2)
    assert damaged.pending_keys() == {"k04"}  # its sample was dropped after the shard was written
    changed = ShardAssembler(tmp_path, {"train": keys + ["k015"]}, shard_size=2)  # lands in shard 1
    with pytest.raises(ShardError, match="different set of samples"):
        changed.advance()


def test_final_advance_refuses_unsettled_keys(tmp_path):
    asm = ShardAssembler(tmp_path, {"train": ["a", "b"]}, shard_size=5)
    asm.cache.put("a", _sample(1))
    assert asm.advance() == []
    with pytest.raises(ShardError, match="never encoded"):
        asm.advance(final=True)
    assert shard_name("my-split", 3) == "my_split-000003.tar"
