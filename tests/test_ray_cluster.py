"""A real multi-node Ray cluster on loopback: a head and two worker nodes started with ``ray start``.

Each node is its own raylet with its own CPU; none has this checkout on its path, so the stages
run only because the driver ships the code through its runtime env (``--ray-address``).
``pipeline.encode`` on the cluster writes the very shards a local run writes; ``pipeline.clean``
loses a worker node mid-run and still ends (or, rerun, resumes) with the local runner's ledger.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import RAY_LOOPBACK, RayCluster, sample_clean_args  # noqa: E402
from model_fixtures_encoders import assert_same_samples, tiny_clip_dir, tiny_vae_dir  # noqa: E402,F401

from pipeline.ledger import Ledger, read_ledger  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("core", "pipeline", "filters", "augment", "shards")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_cluster = RayCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        ray_cluster.start_head()
        ray_cluster.add_workers(["worker1", "worker2"])
        yield ray_cluster
    finally:
        ray_cluster.close()


def _driver_env(cluster: RayCluster) -> dict:
    """Only the driver has the checkout on its path. It runs outside the checkout: Ray adds the
    driver's working directory to every worker's path, which on one machine would let the nodes
    import the checkout directly (on a real cluster that path does not exist on the nodes)."""
    return {**cluster.env, "PYTHONPATH": str(REPO)}


def _driver(cluster: RayCluster, module: str, args: list[str]) -> subprocess.Popen:
    """A CLI joining the cluster, as a user runs it."""
    log = open(cluster.tmp / f"driver-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, str(RAY_LOOPBACK), "-m", module, *args], cwd=cluster.tmp,
                            env=_driver_env(cluster), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.log.seek(0)
    output = proc.log.read()
    proc.log.close()
    return code, output


def test_code_reaches_the_nodes_through_the_runtime_env(cluster):
    probe = f"""
import json, ray
from pipeline.runners import RunnerOptions
from pipeline.runners.ray import _connect
_connect(RunnerOptions(runner="ray", ray_address={cluster.address!r}))

@ray.remote(num_cpus=1)
def where():
    import importlib
    return {{name: importlib.import_module(name).__file__ for name in {SHIPPED!r}}}

print("FILES=" + json.dumps(ray.get(where.remote())))
"""
    done = subprocess.run([sys.executable, str(RAY_LOOPBACK), "-c", probe], cwd=cluster.tmp,
                          env=_driver_env(cluster), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.split("FILES=", 1)[1].splitlines()[0])
    for name in SHIPPED:  # unpacked by Ray on the node, not imported from a checkout or an install
        assert "runtime_resources" in files[name] and str(REPO) not in files[name], files


def _encode_args(ledger: Path, out: Path, clip: Path, vae: Path, *extra: str) -> list[str]:
    return ["--ledger", str(ledger), "--out", str(out), "--clip-model", str(clip), "--vae", str(vae),
            "--device", "cpu", "--shard-size", "1", "--batch-size", "1", *extra]


def test_encode_on_the_cluster_writes_the_local_runs_shards(cluster, sample_clean_local, tiny_clip_dir,
                                                            tiny_vae_dir, tmp_path):
    """Model stages run as actor pools on both nodes. Float kernels depend on the thread count (a
    latent may move by one float16 step), so the local reference runs two workers: one thread each
    on a 2-core machine, as each one-CPU node grants; there the shards are the same bytes."""
    from core.native_threads import machine_share
    from pipeline.encode import main

    ok = sample_clean_local[sample_clean_local["status"] == "ok"].head(2)
    assert len(ok) == 2
    ledger_path = Ledger(tmp_path / "ledger").write_final(ok, {"dataset": "vggsound"})
    local = tmp_path / "shards-local"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(_encode_args(ledger_path, local, tiny_clip_dir, tiny_vae_dir, "--workers", "2")) == 0
    remote = tmp_path / "shards-ray"
    code, output = _finish(_driver(cluster, "pipeline.encode", _encode_args(
        ledger_path, remote, tiny_clip_dir, tiny_vae_dir, "--runner", "ray", "--ray-address", cluster.address)))
    assert code == 0, output[-4000:]
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    assert "train-000001.tar" in names and names == sorted(p.name for p in remote.iterdir() if p.is_file())
    for name in sorted(n for n in names if n.endswith(".tar")):
        assert_same_samples(remote / name, local / name)
    if machine_share(2) == 1:  # the same threads per worker as the nodes: the same bytes
        for name in names:
            assert (remote / name).read_bytes() == (local / name).read_bytes(), name


def test_clean_on_the_cluster_survives_losing_a_worker_node(cluster, sample_root, sample_clean_local, tmp_path):
    out = tmp_path / "out"
    args = sample_clean_args(sample_root, out, "--runner", "ray", "--ray-address", cluster.address)
    first = _driver(cluster, "pipeline.clean", args)
    deadline = time.monotonic() + 300
    # the broken rows' part, then the first clip back from the cluster: the others are in flight
    while len(list((out / "ledger.parts").glob("part-*.parquet"))) < 2 and first.poll() is None:
        assert time.monotonic() < deadline, "the cluster run journaled nothing"
        time.sleep(0.1)
    assert first.poll() is None, "the run finished before a node could be stopped"
    cluster.stop_node("worker2")  # its raylet and every worker process on it, mid-run
    code, output = _finish(first)
    if code != 0:  # Ray gave up on the lost node's tasks: a rerun on what is left resumes
        code, output = _finish(_driver(cluster, "pipeline.clean", args))
        assert "resuming:" in output
    assert code == 0, output[-4000:]
    ledger, meta = read_ledger(out / "ledger.parquet")
    assert meta["runner"] == "ray"
    assert_frame_equal(ledger, sample_clean_local)
    journaled = pd.concat([pd.read_parquet(p) for p in (out / "ledger.parts").glob("part-*.parquet")])
    assert set(journaled["key"]) == set(sample_clean_local["key"])
