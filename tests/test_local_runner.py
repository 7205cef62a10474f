"""The local runner with real worker processes: a worker killed mid-batch, a systematic bug, a broken
set-up, GPU and CPU shares. The stages below run in spawned workers (they import this module)."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.native_threads import available_cpus, cgroup_cpu_limit
from core.stage import OK, Resources, Row, Stage
from pipeline.ledger import Ledger
from pipeline.runners import FailureRateExceeded, RunnerOptions
from pipeline.runners.local import plan_workers, run

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class CrashConfig:
    kill_key: str = ""  # the worker processing this row is SIGKILLed (an OOM kill, a segfault)
    raise_all: bool = False  # every row raises: a bug, not a bad file
    setup_fails: bool = False
    gpus: float = 0.0


class CrashStage(Stage):
    name = "crashy"

    def __init__(self, config: CrashConfig):
        self.config = config
        self.resources = Resources(cpus=1.0, gpus=config.gpus, batch_size=3)

    def setup(self) -> None:
        if self.config.setup_fails:
            raise ImportError("the model library is not installed")

    def process_batch(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            if self.config.raise_all:
                raise KeyError("column 'video_path' is missing")
            if row["key"] == self.config.kill_key:
                os.kill(os.getpid(), signal.SIGKILL)
            row.update(status=OK, reason="", caption=str(os.getpid()))
        return rows


def build_crashy(config: CrashConfig) -> list[Stage]:
    return [CrashStage(config)]


def _rows(n: int) -> list[Row]:
    return [{"key": f"r{i:03d}", "source": "toy", "line": i + 1, "status": "", "reason": ""} for i in range(n)]


@pytest.mark.slow
def test_a_worker_killed_mid_batch_fails_only_its_rows_and_the_run_goes_on(tmp_path):
    ledger = Ledger(tmp_path)
    seen: list[Row] = []
    run(_rows(12), build_crashy, CrashConfig(kill_key="r004"), ledger.append, batch_size=3,
        options=RunnerOptions(workers=2), on_batch=seen.extend)
    journal = ledger.read_journal().set_index("key")
    assert sorted(journal.index) == [f"r{i:03d}" for i in range(12)]
    crashed = journal[journal["status"] == "failed"]
    assert sorted(crashed.index) == ["r003", "r004", "r005"]  # the batch the dead worker held
    assert crashed["reason"].str.startswith("worker_crashed: ").all()
    assert "SIGKILL" in crashed["reason"].iloc[0]
    assert (journal.drop(crashed.index)["status"] == OK).all()
    assert "r004" not in ledger.done_keys()  # retried on resume
    assert len(seen) == 12


def test_a_systematic_error_stops_the_run_early_with_its_traceback(tmp_path):
    ledger = Ledger(tmp_path)
    with pytest.raises(FailureRateExceeded) as info:
        run(_rows(300), build_crashy, CrashConfig(raise_all=True), ledger.append, batch_size=3,
            options=RunnerOptions(workers=2))
    message = str(info.value)
    assert "stage_error: crashy: KeyError" in message and "Traceback" in message
    assert "column 'video_path' is missing" in message and "process_batch" in message
    journal = ledger.read_journal()
    assert 33 <= len(journal) < 300  # stopped soon after half the first 64 rows failed; those are journaled
    assert (journal["reason"].str.startswith("stage_error")).all()


def test_breaker_can_be_disabled_and_counts_short_runs(tmp_path):
    ledger = Ledger(tmp_path)
    run(_rows(9), build_crashy, CrashConfig(raise_all=True), ledger.append, batch_size=3,
        options=RunnerOptions(workers=1, max_error_share=1.0))
    assert len(ledger.read_journal()) == 9
    with pytest.raises(FailureRateExceeded, match="of the first"):
        run(_rows(9), build_crashy, CrashConfig(raise_all=True), Ledger(tmp_path / "b").append, batch_size=3,
            options=RunnerOptions(workers=1))


def test_a_broken_set_up_stops_the_run_instead_of_respawning(tmp_path):
    with pytest.raises(RuntimeError, match="the model library is not installed"):
        run(_rows(6), build_crashy, CrashConfig(setup_fails=True), Ledger(tmp_path).append, batch_size=3,
            options=RunnerOptions(workers=2))


def test_gpu_stage_gets_one_worker_per_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    one = plan_workers(build_crashy(CrashConfig(gpus=1.0)), RunnerOptions(), n_batches=100)
    assert one == [{"CUDA_VISIBLE_DEVICES": d} for d in ("3", "5", "7")]
    half = plan_workers(build_crashy(CrashConfig(gpus=0.5)), RunnerOptions(), n_batches=100)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in half] == ["3", "3", "5", "5", "7", "7"]
    declared = plan_workers(build_crashy(CrashConfig(gpus=1.0)), RunnerOptions(workers=1), n_batches=100)
    assert declared == [{"CUDA_VISIBLE_DEVICES": "3"}]
    cpu = plan_workers(build_crashy(CrashConfig()), RunnerOptions(), n_batches=100)
    assert len(cpu) == available_cpus() and cpu[0] == {}


def test_cpu_count_honours_the_cgroup_quota(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5 and available_cpus(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None and available_cpus(v2) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == 1
    assert available_cpus(Path("/nonexistent")) == len(os.sched_getaffinity(0))
