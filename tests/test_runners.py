"""The local, Ray and Beam runners drive the same stages to the same ledger, bad inputs included.

Small test-only stages (below) prove the runner contract on every engine: failures stay in their
row, model stages are set up once per worker, rows cross process boundaries unchanged. Then
``pipeline.clean`` (AV-Align and a tiny CLAP) runs under each runner on the generated sample,
broken files included: the CLI is killed (SIGKILL, its whole process group) once it has journaled
a batch, then resumed; every runner must write the same ledger as an uninterrupted local run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal

from pipeline.ledger import Ledger, read_ledger
from pipeline.runners import RunnerOptions, get_runner
from pipeline.runners.beam import beam_flags
from core.stage import OK, Resources, Row, Stage, mark_failed

pytestmark = pytest.mark.timeout(300)

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
WORKERS = 2


# ---------------------------------------------------------------- test-only stages

@dataclass(frozen=True)
class ToyConfig:
    setup_dir: str  # the model stage leaves one file here per setup() call
    batch_size: int = 3
    explode_key: str = "r04"  # the CPU stage raises on this row (an error it did not expect)
    reject_key: str = "r07"  # the CPU stage records this row as failed itself


class SignalStage(Stage):
    """CPU stage: hands a variable-length array to the next stage in a transient field."""

    name = "toy_signal"
    reads = ("key", "line")
    writes = ("signal", "start_s")
    transient = ("signal",)

    def __init__(self, config: ToyConfig):
        self.config = config
        self.resources = Resources(cpus=1.0, batch_size=config.batch_size)

    def process_batch(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            if row["key"] == self.config.explode_key:
                raise ValueError(f"cannot read {row['key']}")
            if row["key"] == self.config.reject_key:
                mark_failed(row, "decode_error: toy file is broken")
                continue
            row["signal"] = np.arange(row["line"], dtype=np.float32)
            row.update(status=OK, reason="", start_s=0.5 * row["line"])
        return rows


class ToyModelStage(Stage):
    """Model stage: ``setup`` loads a 'model' and records the call; scores rows that carry a signal."""

    name = "toy_model"
    uses_model = True
    reads = ("signal",)
    writes = ("caption", "threads", "av_align", "video_peaks")

    def __init__(self, config: ToyConfig):
        self.config = config
        self.resources = Resources(cpus=1.0, batch_size=config.batch_size)
        self.weight = None

    def setup(self) -> None:
        Path(self.config.setup_dir, f"setup-{os.getpid()}-{uuid.uuid4().hex}").touch()
        self.weight = 0.5

    def process_batch(self, rows: list[Row]) -> list[Row]:
        import cv2
        from threadpoolctl import threadpool_info

        assert self.weight is not None, "process_batch before setup"
        pools = {"cv2": cv2.getNumThreads(), "blas": max(p["num_threads"] for p in threadpool_info())}
        for row in rows:
            row["caption"] = str(os.getpid())  # which worker process ran this row's batch
            row["threads"] = pools  # only for the test below: the ledger keeps its own columns
            signal = row.get("signal")  # left in the row: the runner drops transient fields
            if signal is not None:
                row["av_align"] = float(signal.sum()) * self.weight
                row["video_peaks"] = int(signal.size)
        return rows


def build_toy(config: ToyConfig) -> list[Stage]:
    return [SignalStage(config), ToyModelStage(config)]


def toy_rows(n: int = 14) -> list[Row]:
    return [{"key": f"r{i:02d}", "source": "toy", "label": f"label {i}", "line": i + 1, "duration_s": None,
             "status": "", "reason": ""} for i in range(n)]


# ---------------------------------------------------------------- engines

@pytest.fixture(scope="module")
def engines():
    """Small local Ray for the whole module (shut down at the end); workers can import this file."""
    import ray

    old = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(TESTS_DIR)] + ([old] if old else []))
    os.environ["PYTHONPATH"] = path  # Beam's SDK worker processes import the test stages from here
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def options_for(runner: str, tmp: Path) -> RunnerOptions:
    if runner == "beam-staged":  # rows read by the workers from temp_location, not embedded in the job
        return RunnerOptions(runner="beam", workers=WORKERS, beam_option=(f"temp_location={tmp}",))
    return RunnerOptions(runner=runner, workers=WORKERS)


@pytest.fixture(scope="module", params=["local", "ray", "beam", "beam-staged"])
def toy_run(request, engines, tmp_path_factory):
    """One run of the toy chain per runner; the sink is the real ledger journal."""
    tmp = tmp_path_factory.mktemp(f"toy-{request.param}")
    config = ToyConfig(setup_dir=str(tmp / "setups"))
    Path(config.setup_dir).mkdir()
    ledger = Ledger(tmp / "out")
    seen: list[Row] = []
    options = options_for(request.param, tmp)
    rows = toy_rows()
    get_runner(options.runner)(rows, build_toy, config, ledger.append, batch_size=config.batch_size,
                               options=options, on_batch=seen.extend)
    journal = ledger.read_journal().set_index("key")
    return {"runner": request.param, "rows": rows, "config": config, "journal": journal, "seen": seen,
            "setups": sorted(Path(config.setup_dir).iterdir())}


@pytest.mark.slow
def test_failure_in_one_row_keeps_its_neighbours(toy_run):
    journal, config = toy_run["journal"], toy_run["config"]
    assert sorted(journal.index) == [r["key"] for r in toy_run["rows"]], "a runner lost or duplicated rows"
    exploded = journal.loc[config.explode_key]
    assert exploded["status"] == "failed"
    assert exploded["reason"] == "stage_error: toy_signal: ValueError: cannot read r04"
    assert journal.loc[config.reject_key, "reason"] == "decode_error: toy file is broken"
    for key in ("r03", "r05"):  # the exploding row's batch-mates were scored, not dropped or failed
        line = int(journal.loc[key, "line"])
        assert journal.loc[key, "status"] == OK
        assert journal.loc[key, "av_align"] == pytest.approx(0.5 * sum(range(line)))
    assert (journal["status"] == OK).sum() == len(journal) - 2


@pytest.mark.slow
def test_rows_cross_engine_boundaries_unchanged(toy_run):
    """Arrays reach the next stage; None stays missing, ints stay ints; transient fields never leave."""
    journal = toy_run["journal"]
    ok = journal[journal["status"] == OK]
    assert (ok["video_peaks"] == ok["line"]).all()  # the array had `line` elements in the model stage
    assert (ok["start_s"] == 0.5 * ok["line"]).all()
    assert journal["duration_s"].isna().all()
    for row in toy_run["seen"]:  # what the driver got back, before the ledger's schema types it
        assert type(row["line"]) is int and row["duration_s"] is None
        assert "signal" not in row


@pytest.mark.slow
def test_model_stage_is_set_up_once_per_worker_not_per_batch(toy_run):
    batches = -(-len(toy_run["rows"]) // toy_run["config"].batch_size)
    setup_pids = [p.name.split("-")[1] for p in toy_run["setups"]]
    worked = set(toy_run["journal"]["caption"])  # processes that ran the model stage
    assert worked <= set(setup_pids), "a batch ran on a worker whose model was never set up"
    assert len(setup_pids) == len(set(setup_pids)), f"a worker set its model up more than once: {setup_pids}"
    assert 1 <= len(setup_pids) <= WORKERS < batches


@pytest.mark.slow
def test_workers_native_thread_pools_capped_to_their_share_of_cores(toy_run):
    """OpenBLAS and OpenCV threads beyond a worker's cores only slow its neighbours down."""
    from core.native_threads import available_cpus

    share = 1 if toy_run["runner"] == "ray" else max(1, available_cpus() // WORKERS)  # Ray: num_cpus=1
    for row in toy_run["seen"]:
        assert row["threads"] == {"cv2": share, "blas": share}, row["key"]


@pytest.mark.slow
def test_driver_sees_every_finished_batch(toy_run):
    """``on_batch`` (the CLI's progress bar) gets every row once, whichever engine ran it."""
    keys = sorted(r["key"] for r in toy_run["seen"])
    assert keys == [r["key"] for r in toy_run["rows"]]


def test_beam_options_pass_through_and_local_default_is_fn_api_runner():
    local = beam_flags(RunnerOptions(runner="beam", workers=3))
    assert "--direct_num_workers=3" in local and "--direct_running_mode=multi_processing" in local
    flink = beam_flags(RunnerOptions(runner="beam", beam_runner="FlinkRunner",
                                     beam_option=("flink_master=host:8081", "--parallelism=64", "save_main_session")))
    assert flink == ["--flink_master=host:8081", "--parallelism=64", "--save_main_session"]
    mine = beam_flags(RunnerOptions(runner="beam", beam_option=("direct_num_workers=1",)))
    assert mine.count("--direct_num_workers=1") == 1 and not any(f.startswith("--direct_num_workers=2") for f in mine)
    with pytest.raises(ValueError, match="key=value"):
        beam_flags(RunnerOptions(runner="beam", beam_option=("=x",)))


# ---------------------------------------------------------------- GPU pinning under Beam

@dataclass(frozen=True)
class GpuProbeConfig:
    gpus: float = 1.0
    batch_size: int = 1


class GpuProbeStage(Stage):
    """A "GPU" stage that records which process ran each row and which GPUs that process saw."""

    name = "gpu_probe"
    reads = ("key",)
    writes = ("caption", "label")

    def __init__(self, config: GpuProbeConfig):
        self.resources = Resources(cpus=1.0, gpus=config.gpus, batch_size=config.batch_size)

    def process_batch(self, rows: list[Row]) -> list[Row]:
        time.sleep(0.05)  # long enough for both SDK workers to get bundles
        for row in rows:
            row.update(status=OK, reason="", caption=str(os.getpid()),
                       label=os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        return rows


def build_gpu_probe(config: GpuProbeConfig) -> list[Stage]:
    return [GpuProbeStage(config)]


@pytest.mark.slow
def test_beam_workers_are_pinned_one_per_visible_gpu(tmp_path, monkeypatch):
    """Two (faked) visible GPUs: the local FnApiRunner starts two SDK worker processes and each
    pins itself in DoFn.setup to its own GPU, as the local runner's workers are."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # what visible_gpus() reads before asking torch
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the workers' slot folder, here and in the SDK workers
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ledger = Ledger(tmp_path / "out")
    get_runner("beam")(toy_rows(12), build_gpu_probe, GpuProbeConfig(), ledger.append, batch_size=1,
                       options=RunnerOptions(runner="beam"))
    journal = ledger.read_journal()
    assert len(journal) == 12 and (journal["status"] == OK).all()
    seen = journal.groupby("caption")["label"].unique()
    assert len(seen) == 2, f"expected two SDK worker processes (one per GPU), got {dict(seen)}"
    assert all(len(devices) == 1 for devices in seen), dict(seen)  # one GPU per process, for all its rows
    assert sorted(d[0] for d in seen) == ["3", "5"]
    assert not list(temp.glob("v2a-beam-gpus-*"))  # the slot folder is removed


def test_gpu_slots_are_distinct_per_live_process_and_freed_when_it_dies(tmp_path, monkeypatch):
    """Worker processes of one node (a remote runner's, pinning by their own CUDA_VISIBLE_DEVICES):
    two live ones get the two GPUs, a replacement for a dead one takes its slot."""
    from pipeline.runners.beam import GpuPinning, gpu_pinning
    from pipeline.runners.gpus import gpu_assignments

    hold = ("import sys; from pipeline.runners.beam import GpuPinning; "
            "print(GpuPinning('t', 1.0, (), ('driver-host', 1)).pin(), flush=True); sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "3,5"}
    workers = [subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env, text=True) for _ in range(2)]
    try:
        devices = [w.stdout.readline().strip() for w in workers]
        assert sorted(devices) == ["3", "5"]  # two live workers, two GPUs
        workers[0].kill()
        workers[0].wait()
        third = subprocess.run([sys.executable, "-c", hold], input="", capture_output=True, env=env, text=True)
        assert third.returncode == 0 and third.stdout.strip() == devices[0]  # the dead worker's slot is reused
        one = subprocess.run([sys.executable, "-c", hold], input="", capture_output=True, text=True,
                             env={**env, "CUDA_VISIBLE_DEVICES": "3"})
        assert one.stdout.strip() == "None"  # one GPU in its environment: nothing to spread over
    finally:
        workers[1].kill()
        workers[1].wait()
    assert gpu_assignments(0.5, ["0", "1"], 4) == ["0", "0", "1", "1"]
    assert gpu_assignments(2.0, ["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    import torch  # no CUDA_VISIBLE_DEVICES: visible_gpus() asks torch, faked here to count 3 GPUs

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    pinning, workers_default = gpu_pinning(build_gpu_probe(GpuProbeConfig()), RunnerOptions(runner="beam"))
    assert workers_default == 3 and pinning.assignments == ("0", "1", "2") and pinning.pin() is None  # not the driver
    assert gpu_pinning(build_gpu_probe(GpuProbeConfig(gpus=0.0)), RunnerOptions(runner="beam")) == (None, 0)
    remote, default = gpu_pinning(build_gpu_probe(GpuProbeConfig()),
                                  RunnerOptions(runner="beam", beam_runner="FlinkRunner"))
    assert isinstance(remote, GpuPinning) and remote.assignments == () and default == 0  # the workers decide


# ---------------------------------------------------------------- pipeline.clean under every runner

BROKEN_KINDS = {"missing_file", "malformed", "broken_empty", "broken_truncated", "broken_not_video", "no_audio",
                "no_video", "too_short", "duplicate"}


@pytest.fixture(scope="module")
def clean_input(sample_root, tmp_path_factory) -> Path:
    """The sample's CSV cut to every broken row, then the clips: the duplicate's original, one shifted and
    two aligned clips. The decodable clips come last, so a run killed after its first batch has work left."""
    manifest = json.loads((sample_root / "sample_manifest.json").read_text())
    lines = (sample_root / "vggsound.csv").read_text().splitlines()
    rows = manifest["rows"]
    assert len(rows) == len(lines)
    dup = next(r for r in rows if r["kind"] == "duplicate")
    shifted = next(r for r in rows if r["kind"] == "shifted")
    original = next(r for r in rows if r["kind"] != "duplicate"
                    and (r["youtube_id"], r["start_seconds"]) == (dup["youtube_id"], dup["start_seconds"]))
    aligned = [r for r in rows if r["kind"] == "aligned" and r is not original][:2]
    broken = [line for line, r in zip(lines, rows) if r["kind"] in BROKEN_KINDS]
    clips = [line for line, r in zip(lines, rows) if r is shifted or r is original or any(r is a for a in aligned)]
    path = tmp_path_factory.mktemp("clean_input") / "vggsound.csv"
    path.write_text("\n".join(broken + clips) + "\n")
    return path


@pytest.fixture(scope="module")
def clean_cmd(clean_input, sample_root, tiny_clap_dir):
    """``pipeline.clean`` arguments: the cut sample, scored by AV-Align and a tiny CLAP (a model stage)."""
    def args(out: Path, runner: str, *extra: str) -> list[str]:
        return ["--dataset", "vggsound", "--root", str(sample_root), "--csv", str(clean_input), "--out", str(out),
                "--runner", runner, "--batch-size", "2", "--clap-model", str(tiny_clap_dir), "--clap-device", "cpu",
                *extra]
    return args


def run_clean(args: list[str]) -> str:
    from pipeline.clean import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def reference(engines, clean_cmd, tmp_path_factory) -> pd.DataFrame:
    """An uninterrupted local run: the ledger every runner must reproduce."""
    out = tmp_path_factory.mktemp("clean-reference")
    run_clean(clean_cmd(out, "local", "--workers", "1"))
    ledger, meta = read_ledger(out / "ledger.parquet")
    assert meta["counts"]["failed"] >= len(BROKEN_KINDS) and meta["counts"]["ok"] >= 1
    assert meta["counts"]["filtered"] >= 1  # the shifted clip
    assert ledger["clap_score"].notna().sum() == meta["counts"]["ok"] + meta["counts"]["filtered"]
    return ledger


def run_clean_cli(args: list[str]) -> str:
    """``python -m pipeline.clean`` in a fresh process, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "pipeline.clean", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # a Ray job on a loaded 2-core machine can take minutes
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def kill_after_first_batch(args: list[str], out: Path) -> set[str]:
    """Start ``python -m pipeline.clean`` in its own process group and SIGKILL the group (driver and
    workers) as soon as a batch is journaled; returns the keys the journal holds then."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.clean", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "ledger.parts"
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline and not list(parts.glob("part-*.parquet")):
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before the kill"
    assert not (out / "ledger.parquet").exists(), "the killed run wrote its final ledger"
    return Ledger(out).done_keys()


# How each runner is killed and resumed. The killed run is always the CLI in a child process group.
# local: resumed in this process (its pool is covered above), so the clean stages warm up once.
# ray: both runs join this module's Ray with --ray-address, the resumed one as the CLI in a fresh
# process. beam: killed on Beam's in-process mode (given with --beam-option), resumed on the
# default FnApiRunner with worker processes.
RESUME = {
    "local": (["--workers", "1"], ["--workers", "1"]),
    "ray": (["--workers", str(WORKERS), "--ray-address", "{ray_address}"],
            ["--workers", str(WORKERS), "--ray-address", "{ray_address}"]),
    "beam": (["--beam-option", "direct_running_mode=in_memory,direct_num_workers=1"], ["--workers", str(WORKERS)]),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("runner", sorted(RESUME))
def test_clean_killed_and_resumed_matches_uninterrupted_local_run(runner, reference, clean_cmd, tmp_path):
    import ray

    first_args, second_args = ([a.format(ray_address=ray.get_runtime_context().gcs_address) for a in args]
                               for args in RESUME[runner])
    journaled = kill_after_first_batch(clean_cmd(tmp_path, runner, *first_args), tmp_path)
    assert 0 < len(journaled) < len(reference), "the kill left nothing to resume"
    run_second = run_clean_cli if runner == "ray" else run_clean
    second = run_second(clean_cmd(tmp_path, runner, *second_args))
    assert f"resuming: {len(journaled)} of {len(reference)} items already" in second
    assert f"clean summary: {len(reference)} items" in second

    parts = sorted((tmp_path / "ledger.parts").glob("part-*.parquet"))
    journal = pd.concat([pq.read_table(p).to_pandas() for p in parts])["key"]
    assert journal.is_unique, "the resumed run recomputed items that were already journaled"
    ledger, meta = read_ledger(tmp_path / "ledger.parquet")
    assert meta["runner"] == runner
    assert_frame_equal(ledger, reference)
    if runner == "ray":  # the CLI joined the cluster and left it running
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == WORKERS


def test_ray_blocks_are_a_few_per_worker_and_never_huge():
    from pipeline.runners.ray import BLOCKS_PER_WORKER, MAX_BATCHES_PER_BLOCK, _block_count

    assert _block_count(14, 3, parallelism=2) == 5  # fewer batches than slots: one block per batch
    assert _block_count(200_000, 8, parallelism=3200) == BLOCKS_PER_WORKER * 3200  # a 100-node cluster
    assert _block_count(1, 8, parallelism=64) == 1
    # one machine: 25,000 batches in blocks of at most MAX_BATCHES_PER_BLOCK, not 8 blocks of hours
    assert _block_count(200_000, 8, parallelism=2) == -(-25_000 // MAX_BATCHES_PER_BLOCK)
