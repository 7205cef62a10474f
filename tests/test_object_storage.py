"""Object storage end to end against a real S3 server on loopback (moto's server mode).

Clips are read from ``--root s3://...``, shards are published with ``pipeline.encode --out
s3://...`` (index uploaded last) and read back through fsspec as training reads them; every
result equals the one made from and to local disk. Endpoint and credentials reach s3fs only
through the standard AWS environment variables.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from pandas.testing import assert_frame_equal

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import environ, free_port  # noqa: E402
from model_fixtures_encoders import DATA, ledger_row, tiny_clip_dir, tiny_vae_dir, write_ledger  # noqa: E402,F401

from core import storage  # noqa: E402
from pipeline.ledger import read_ledger  # noqa: E402
from shards.shard_writer import shard_order  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CLIPS = {"0DCit2EBtjs": ("30", "playing acoustic guitar"), "-BAKe6QGTUk": ("30", "playing drum kit")}
MISSING = "zzzzzzzzzzz,10,dog barking,train"  # a CSV row whose clip was never uploaded
BUCKET = "s3://v2a-test"


def _csv() -> str:
    """The first clip, the row without a clip, the other clips (clean reads the first two rows)."""
    lines = [f"{yid},{start},{label},train" for yid, (start, label) in CLIPS.items()]
    return "\n".join([lines[0], MISSING, *lines[1:]]) + "\n"


@pytest.fixture(scope="module")
def s3(s3_service, tmp_path_factory):
    """The S3 server, a bucket holding a VGGSound root, and the same root on local disk."""
    tmp = tmp_path_factory.mktemp("s3")
    local = tmp / "vggsound"
    (local / "video").mkdir(parents=True)
    (local / "vggsound.csv").write_text(_csv())
    for yid, (start, _) in CLIPS.items():
        shutil.copy(DATA / "video" / f"{yid}_{int(start):06d}.mp4", local / "video")
    with environ(s3_service.env):
        fs, _ = storage.filesystem(BUCKET)
        fs.mkdir(BUCKET.removeprefix("s3://"))
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            storage.put_file(path, f"{BUCKET}/vggsound/{path.relative_to(local).as_posix()}")
        yield {"server": s3_service, "env": s3_service.env, "local": local, "root": f"{BUCKET}/vggsound",
               "tmp": tmp}


def _quiet(main, args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


def test_clean_reads_clips_from_an_s3_root_as_from_disk(s3, tmp_path):
    from pipeline.clean import main

    common = ["--dataset", "vggsound", "--clap-model", "none", "--workers", "1", "--batch-size", "2", "--limit", "2"]
    assert _quiet(main, common + ["--root", str(s3["local"]), "--out", str(tmp_path / "local")])[0] == 0
    code, output = _quiet(main, common + ["--root", s3["root"], "--out", str(tmp_path / "s3")])
    assert code == 0, output
    local, _ = read_ledger(tmp_path / "local" / "ledger.parquet")
    remote, meta = read_ledger(tmp_path / "s3" / "ledger.parquet")
    assert meta["root"] == s3["root"]
    assert remote["video_path"].str.startswith(f"{s3['root']}/video/").all()  # URLs stay URLs
    missing = remote.set_index("key").loc["vggsound-zzzzzzzzzzz-000010"]
    assert missing["status"] == "failed"
    assert missing["reason"] == f"missing_file: {s3['root']}/video/zzzzzzzzzzz_000010.mp4"
    assert (remote["status"] != "failed").sum() == 1  # the real clip was decoded from the bucket
    for frame, root in ((local, str(s3["local"])), (remote, s3["root"])):
        for col in ("video_path", "reason"):
            frame[col] = frame[col].str.replace(root, "ROOT", regex=False)
    assert_frame_equal(remote, local)  # the same scores from the same bytes


def _write_ledger(folder: Path, root: str, clips: dict = CLIPS) -> Path:
    rows = [ledger_row(f"vggsound-{yid}-{int(start):06d}", storage.join(root, "video", f"{yid}_{int(start):06d}.mp4"),
                       label=label) for yid, (start, label) in clips.items()]
    return write_ledger(folder, rows)


@pytest.fixture(scope="module")
def ledgers(s3):
    """One ledger whose clips are local files, one whose clips are the same files in the bucket."""
    return {"local": _write_ledger(s3["tmp"] / "ledger-local", str(s3["local"])),
            "s3": _write_ledger(s3["tmp"] / "ledger-s3", s3["root"])}


def _encode_args(ledger: Path, out: str, clip: Path, vae: Path, *extra: str) -> list[str]:
    return ["--ledger", str(ledger), "--out", out, "--clip-model", str(clip), "--vae", str(vae), "--device", "cpu",
            "--workers", "1", "--shard-size", "1", *extra]


@pytest.fixture(scope="module")
def published(s3, ledgers, tiny_clip_dir, tiny_vae_dir):
    """Shards encoded from local clips to disk, and from bucket clips to the bucket (uploads recorded)."""
    from pipeline.encode import main

    local_out = s3["tmp"] / "shards-local"
    assert _quiet(main, _encode_args(ledgers["local"], str(local_out), tiny_clip_dir, tiny_vae_dir))[0] == 0
    uploads: list[str] = []
    real_put = storage.put_file

    def recording_put(local, url, sha256=None):
        uploads.append(url)
        real_put(local, url, sha256)

    url = f"{BUCKET}/shards"
    staging = s3["tmp"] / "staging"
    storage.put_file = recording_put
    try:
        code, output = _quiet(main, _encode_args(ledgers["s3"], url, tiny_clip_dir, tiny_vae_dir,
                                                 "--staging", str(staging)))
    finally:
        storage.put_file = real_put
    assert code == 0, output
    return {"local": local_out, "url": url, "uploads": uploads, "output": output, "staging": staging}


def test_encode_publishes_the_same_bytes_to_s3_index_last(published):
    local, url = published["local"], published["url"]
    assert not Path("s3:").exists(), "a local folder named s3: was written"
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    assert [n for n in names if n.endswith(".tar")] == ["train-000000.tar", "train-000001.tar"]
    remote = sorted(storage.basename(u) for u in storage.list_files(url))
    assert remote == names
    for name in names:
        assert storage.read_bytes(storage.join(url, name)) == (local / name).read_bytes(), name
    index = json.loads((local / "index.json").read_text())["shards"]
    for shard in index:  # each shard carries the sha256 a resumed upload compares (S3 user metadata)
        assert storage.stored_object(storage.join(url, shard["name"])) == (shard["bytes"], shard["sha256"])
    uploads = [storage.basename(u) for u in published["uploads"]]
    assert uploads[-1] == "index.json" and uploads.count("index.json") == 1
    assert set(uploads[:2]) == {"train-000000.tar", "train-000001.tar"}  # every shard before any metadata
    assert f"published to {url}: 2 shard(s)" in published["output"]


def test_training_reader_streams_the_s3_shards_like_local_ones(published):
    from shards.batch import decode_sample
    from shards.sources import find_shards, shard_samples

    remote, card = find_shards(published["url"])
    local, local_card = find_shards(str(published["local"]))
    assert card == local_card and card["samples"] == len(CLIPS)
    assert [s.url for s in remote] == [f"{published['url']}/train-00000{i}.tar" for i in range(2)]
    for r, l in zip(remote, local):
        a, b = ([s for _, s in shard_samples(r.url)], [s for _, s in shard_samples(l.url)])
        assert [s["__key__"] for s in a] == [s["__key__"] for s in b] and len(a) == 1
        assert {k: v for k, v in a[0].items() if k != "__url__"} == {k: v for k, v in b[0].items() if k != "__url__"}
        assert decode_sample(a[0])["latent"].shape[0] == 2


def test_republish_is_idempotent_and_another_shard_set_is_refused(s3, ledgers, published, tiny_clip_dir,
                                                                   tiny_vae_dir, tmp_path):
    from pipeline.encode import main

    again = _encode_args(ledgers["s3"], published["url"], tiny_clip_dir, tiny_vae_dir,
                         "--staging", str(published["staging"]))
    code, output = _quiet(main, again)
    assert code == 0 and "already there, unchanged" in output
    # another shard set: the first clip alone, assembled from a copy of the staging (nothing to encode)
    staging = tmp_path / "staging"
    shutil.copytree(published["staging"], staging)
    first = min(CLIPS, key=lambda yid: shard_order(f"vggsound-{yid}-{int(CLIPS[yid][0]):06d}"))  # train-000000's
    one = _write_ledger(tmp_path / "ledger", s3["root"], {first: CLIPS[first]})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, output = _quiet(main, _encode_args(one, published["url"], tiny_clip_dir, tiny_vae_dir,
                                                 "--staging", str(staging)))
    assert code == 2 and "already holds a different shard set" in err.getvalue(), output
    assert "1 skipped (already finished)" in output  # refused without encoding anything
    index = json.loads(storage.read_bytes(f"{published['url']}/index.json"))
    assert len(index["shards"]) == 2  # the published set is untouched


def test_a_resumed_upload_sends_only_the_shards_the_store_lacks(s3, ledgers, published, tiny_clip_dir,
                                                                tiny_vae_dir):
    """The connection drops after both shards went up, before the index. The rerun sends again only a
    shard whose stored bytes differ (one overwritten meanwhile with other bytes of the same size),
    not the one already there whole; the server's own log counts the PUTs."""
    from pipeline.encode import main

    url, server, local = f"{BUCKET}/resumed", s3["server"], published["staging"]
    args = _encode_args(ledgers["s3"], url, tiny_clip_dir, tiny_vae_dir, "--staging", str(local))
    real_put = storage.put_file

    def dropping_put(path, target, sha256=None):
        if storage.basename(target) == "failed.json":
            raise ConnectionResetError(104, "Connection reset by peer")
        real_put(path, target, sha256)

    storage.put_file = dropping_put
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code, output = _quiet(main, args)
    finally:
        storage.put_file = real_put
    assert code == 2 and "rerun the command to send the rest" in err.getvalue(), output
    assert storage.read_bytes(f"{url}/index.json") is None  # no reader sees the half-published set
    first, second = (f"{url}/train-00000{i}.tar" for i in range(2))
    assert server.puts(first) == server.puts(second) == 1
    fs, _ = storage.filesystem(url)
    fs.pipe_file(second.removeprefix("s3://"), bytes(len(storage.read_bytes(second))))  # same size, other bytes
    assert server.puts(second) == 2

    code, output = _quiet(main, args)
    assert code == 0, output
    assert "published to s3://v2a-test/resumed: 1 shard(s) (1 already there" in output
    assert server.puts(first) == 1 and server.puts(second) == 3  # the whole shard was not sent again
    for name in ("train-000000.tar", "train-000001.tar", "index.json", "card.json", "failed.json"):
        assert storage.read_bytes(f"{url}/{name}") == (local / name).read_bytes(), name


def test_endpoint_comes_from_the_environment(s3, ledgers, tiny_clip_dir, tiny_vae_dir, tmp_path):
    """With the endpoint variable pointing at a closed port the command fails at once, clearly."""
    from pipeline.encode import main

    env = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    err = io.StringIO()
    with environ(env), contextlib.redirect_stderr(err):
        code, _ = _quiet(main, _encode_args(ledgers["local"], f"{BUCKET}/elsewhere", tiny_clip_dir, tiny_vae_dir,
                                            "--staging", str(tmp_path / "staging")))
    assert code == 2, err.getvalue()[-2000:]
    assert f"cannot reach {BUCKET}/elsewhere" in err.getvalue()
    assert not (tmp_path / "staging").exists()  # nothing was encoded for a destination it cannot reach
