"""Beam's portable runner end to end: a job service and an SDK worker pool, each its own process.

``pipeline.clean --runner beam --beam-runner PortableRunner`` submits the job to Beam's job
service (``local_job_service_main``), which runs it on SDK workers that an external worker pool
(``worker_pool_main``, ``environment_type=EXTERNAL``) starts as separate processes: the path a
Flink or Spark job server takes. The manifest is staged in ``temp_location`` and the workers
journal the rows; the ledger must equal the local runner's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pandas.testing import assert_frame_equal

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import free_port, sample_clean_args, start, stop, wait_for_port  # noqa: E402

from pipeline.ledger import read_ledger  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def beam_services(tmp_path_factory):
    """The job service and the worker pool; the workers get the code as a worker image would have it."""
    tmp = tmp_path_factory.mktemp("beam-services")
    # the pool starts SDK workers as `python -c ...` from PATH: this interpreter, as in a worker image
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": path}
    job_port, pool_port = free_port(), free_port()
    pool = start([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                  "--service_port", str(pool_port)], tmp / "pool.log", env=env, cwd=tmp)
    job = start([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                 "--port", str(job_port), "--staging_dir", str(tmp / "staging")], tmp / "job.log", env=env, cwd=tmp)
    try:
        wait_for_port(pool_port, 120, pool, tmp / "pool.log")
        wait_for_port(job_port, 120, job, tmp / "job.log")
        yield {"job": f"localhost:{job_port}", "pool": f"localhost:{pool_port}", "tmp": tmp}
    finally:
        stop(job)
        stop(pool)


def test_portable_runner_with_external_workers_gives_the_local_ledger(beam_services, sample_root,
                                                                     sample_clean_local, tmp_path):
    temp_location = tmp_path / "beam-temp"
    temp_location.mkdir()
    options = ",".join([f"job_endpoint={beam_services['job']}", "environment_type=EXTERNAL",
                        f"environment_config={beam_services['pool']}", f"temp_location={temp_location}",
                        "sdk_worker_parallelism=1"])
    done = subprocess.run([sys.executable, "-m", "pipeline.clean",
                           *sample_clean_args(sample_root, tmp_path / "beam", "--runner", "beam",
                                              "--beam-runner", "PortableRunner", "--beam-option", options)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"rows staged in {temp_location}" in done.stderr
    assert not list(temp_location.glob("v2a-input-*.jsonl"))  # the staged manifest is removed afterwards
    ledger, meta = read_ledger(tmp_path / "beam" / "ledger.parquet")
    assert meta["runner"] == "beam"
    assert_frame_equal(ledger, sample_clean_local)
    pool_log = (beam_services["tmp"] / "pool.log").read_text(errors="replace")
    assert "Starting worker with command" in pool_log, pool_log[-2000:]  # SDK workers were the pool's processes
