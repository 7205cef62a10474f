"""Training across machines: two ``torchrun`` node agents (``--nnodes 2``, c10d rendezvous on
127.0.0.1, gloo) streaming shards from an S3 server on loopback, killed and resumed.

The reference is a single-node two-rank run on the same shards from local disk: two nodes of
one rank each, reading from object storage, killed mid-run and resumed, must log exactly its
losses (ranks, data order and checkpoints do not depend on where the processes run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import LOOPBACK, environ, free_port, kill_tree  # noqa: E402
from shards_fixture import write_shards  # noqa: E402

from core import storage  # noqa: E402
from train.config import TINY_UNET_CONFIG  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
BUCKET = "s3://v2a-train"


def _train_args(shards: str, out: Path, max_steps: int, workers: int = 1) -> list[str]:
    return ["-m", "train", "--shards", shards, "--out", str(out), "--unet-config", TINY_UNET_CONFIG,
            "--batch-size", "4", "--max-steps", str(max_steps), "--ckpt-every", "2", "--log-every", "1",
            "--lr", "1e-3", "--warmup-steps", "3", "--val-every", "3", "--val-samples", "8",
            "--workers", str(workers), "--mix-shards", "2", "--condition", "video+text", "--seed", "5"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _rows(run: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.fixture(scope="module")
def s3_shards(s3_service, tmp_path_factory):
    """Four uneven train shards and a test shard, on disk and uploaded to the S3 server (index last)."""
    tmp = tmp_path_factory.mktemp("mn")
    local = write_shards(tmp / "data", {"train": [1, 2, 3, 6], "test": [3]})
    with environ(s3_service.env):
        fs, _ = storage.filesystem(BUCKET)
        fs.mkdir(BUCKET.removeprefix("s3://"))
        names = sorted(p.name for p in local.iterdir() if p.name != "index.json") + ["index.json"]
        for name in names:
            storage.put_file(local / name, f"{BUCKET}/shards/{name}")
        yield {"local": local, "url": f"{BUCKET}/shards", "tmp": tmp}


def _nodes(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Two node agents, one rank each, meeting at a c10d rendezvous hosted by the first."""
    port, job = free_port(), uuid.uuid4().hex[:8]
    procs = []
    for node in range(2):
        cmd = TORCHRUN + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                          "--rdzv_endpoint", f"{LOOPBACK}:{port}", "--rdzv_id", job,
                          "--rdzv_conf", f"is_host={int(node == 0)}", "--local_addr", LOOPBACK, *args]
        log_path = logs / f"node{node}-{job}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log_path
        procs.append(proc)
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _kill(procs)
    output = "".join(p.log_path.read_text() for p in procs)
    assert all(p.returncode == 0 for p in procs), output[-6000:]
    return output


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each agent and everything it started (its ranks, data-loader workers): a crash."""
    for proc in procs:
        kill_tree(proc.pid)
        proc.wait()


@pytest.fixture(scope="module")
def reference(s3_shards) -> Path:
    """Two ranks on one node, shards from local disk, read in the ranks themselves (no loader worker:
    the same single stream per rank as one worker process reads, so the same batches)."""
    run = s3_shards["tmp"] / "reference"
    done = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node", "2",
                                      *_train_args(str(s3_shards["local"]), run, STEPS, workers=0)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return run


def test_two_nodes_stream_s3_shards_killed_and_resumed(s3_shards, reference, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    first = _nodes(_train_args(s3_shards["url"], run, 1000), logs)  # open-ended: killed below
    try:
        deadline = time.monotonic() + 400
        while not list((run / "checkpoints").glob("step-*")):
            assert all(p.poll() is None for p in first), "a node exited before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        _kill(first)
    killed_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert killed_at < STEPS, "the killed run got too far to test resuming"

    output = _wait_all(_nodes(_train_args(s3_shards["url"], run, STEPS), logs))
    assert f"resuming at step {killed_at}" in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from"] == killed_at
    assert summary["steps_per_rank"] == [STEPS - killed_at] * 2
    a, b = _rows(reference), _rows(run)
    assert sorted(b) == sorted(a)
    for step in range(1, STEPS + 1):  # the same training, step for step, as one node reading local disk
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-7), step
    assert b[STEPS]["val_loss"] == pytest.approx(a[STEPS]["val_loss"], rel=1e-5)
