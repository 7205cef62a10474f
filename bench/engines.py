"""Benchmark: the clean stage on the local pool, Ray Data and Apache Beam, on the same input, in one run.

Input: the generated sample dataset (its broken files included) plus ``--clips`` rows that point
at the real VGGSound clips in ``tests/data/vggsound`` (10 s, 360p H.264), so the CPU-bound work
(decode + AV-Align) is what a real run does per clip. Every engine gets the same manifest rows and
the same stages (``build_clean_stages``), through the same runner entry point the CLI uses, and
must journal the same rows (checked at the end).

Printed: wall time and clips/s per engine started cold (pool, Ray or Beam workers started by the
runner, as ``python -m pipeline.clean`` does), engine overhead as a ratio to local; a real
multi-node Ray cluster (a head and two one-CPU worker nodes started with ``ray start`` on
loopback, the code shipped through the runtime env, as ``--ray-address`` does) against the same
local run; Ray on an
already running 2-CPU Ray with 1 and with 2 workers (scaling ratio; goal >= 1.7x on 2 cores),
and the same stages in 1 and 2 plain processes without any engine (what the machine allows at
that moment: on a shared machine other users' load caps every ratio), alternated so that a change
in the machine's load hits both alike, best of ``--repeat`` each.

    .venv/bin/python bench/engines.py [--clips 64] [--batch-size 8] [--repeat 2] [--no-cluster | --cluster-only]

``--cluster-only`` runs just the local pool and the multi-node cluster (the cluster ratio alone).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pandas.testing import assert_frame_equal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.clean_stages import CleanStageConfig, build_clean_stages  # noqa: E402
from core.config import DecodeLimits  # noqa: E402
from pipeline.ledger import Ledger  # noqa: E402
from pipeline.manifest import vggsound_rows  # noqa: E402
from pipeline.runners import RunnerOptions, get_runner, run_chain, set_up  # noqa: E402
from pipeline.sample import generate  # noqa: E402
from core.stage import is_pending  # noqa: E402

WORKERS = 2
REAL = ROOT / "tests" / "data" / "vggsound"


def build_input(folder: Path, clips: int) -> list[dict]:
    """The sample dataset plus ``clips`` extra rows that point at the real VGGSound clips."""
    root = folder / "vggsound"
    generate(root, kind="vggsound", seed=0)
    real = [line.split(",") for line in (REAL / "vggsound.csv").read_text().splitlines()]
    lines = (root / "vggsound.csv").read_text().splitlines()
    for i in range(clips):
        youtube_id, start, label, _ = real[i % len(real)]
        yid = f"bench{i:06d}"
        name = f"{int(start):06d}.mp4"
        os.symlink(REAL / "video" / f"{youtube_id}_{name}", root / "video" / f"{yid}_{name}")
        lines.append(f'{yid},{start},"{label}",train')
    (root / "vggsound.csv").write_text("\n".join(lines) + "\n")
    rows = vggsound_rows(root / "vggsound.csv", root / "video")
    return [r for r in rows if is_pending(r)]  # what pipeline.clean hands to a runner


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (Linux /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def own_cpu_seconds() -> float:
    """CPU seconds used so far by this process and everything it started (alive or reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parent[pid], ticks[pid] = int(fields[1]), sum(int(x) for x in fields[11:15])
    me, mine, total = os.getpid(), {os.getpid()}, 0.0
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    for pid in mine - {me}:
        total += ticks.get(pid, 0) / tick
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class Timing:
    seconds: float  # wall
    journal: pd.DataFrame  # the rows the run journaled
    machine_busy: float  # 0..1, every user of the machine
    own_cores: float  # CPU seconds of this process tree per wall second


def timed_run(rows: list[dict], options: RunnerOptions, out: Path, batch_size: int,
              limits: DecodeLimits = DecodeLimits()) -> Timing:
    ledger = Ledger(out)
    config = CleanStageConfig(batch_size=batch_size, limits=limits)
    busy0, total0 = cpu_ticks()
    cpu0 = own_cpu_seconds()
    t0 = time.perf_counter()
    get_runner(options.runner)([dict(r) for r in rows], build_clean_stages, config, ledger.append,
                               batch_size=batch_size, options=options)
    seconds = time.perf_counter() - t0
    busy1, total1 = cpu_ticks()
    cores = (own_cpu_seconds() - cpu0) / seconds
    journal = ledger.read_journal().sort_values("key").reset_index(drop=True)
    if len(journal) != len(rows):
        raise RuntimeError(f"{options.runner}: {len(journal)} ledger rows for {len(rows)} inputs")
    return Timing(seconds, journal, (busy1 - busy0) / max(1, total1 - total0), cores)


def _bare_worker(rows: list[dict], batch_size: int, limits: DecodeLimits, barrier, results) -> None:
    stages = build_clean_stages(CleanStageConfig(batch_size=batch_size, limits=limits))
    set_up(stages, threads=1)  # one core per worker, as Ray grants each task (num_cpus=1)
    run_chain(stages, [dict(rows[0])])  # imports and JIT warm-up, not timed
    barrier.wait(timeout=600)
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        run_chain(stages, [dict(r) for r in rows[i:i + batch_size]])
    results.put(time.perf_counter() - t0)


def bare_seconds(rows: list[dict], workers: int, batch_size: int, limits: DecodeLimits) -> float:
    """The stages alone in ``workers`` plain processes started together: what the machine allows now."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(rows[i::workers], batch_size, limits, barrier, results))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    seconds = max(results.get(timeout=1200) for _ in procs)
    for proc in procs:
        proc.join()
    return seconds


def _cluster_child(rows: list[dict], batch_size: int, limits: DecodeLimits, tmp: Path, results) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from cluster_fixtures import RayCluster

    cluster = RayCluster(tmp)
    os.environ.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # before Ray is imported
    import ray_loopback  # noqa: F401  (keeps this driver's Ray on 127.0.0.1, as the nodes are)

    try:
        cluster.start_head()
        cluster.add_workers(["worker1", "worker2"])
        options = RunnerOptions(runner="ray", workers=WORKERS, ray_address=cluster.address)
        results.put(timed_run(rows, options, tmp / "out", batch_size, limits))
    finally:
        cluster.close()


def cluster_run(rows: list[dict], batch_size: int, limits: DecodeLimits, tmp: Path) -> Timing:
    """The clean stages on a head and two one-CPU worker nodes (``ray start``, loopback), joined by
    address as ``--ray-address`` does; the nodes are started before the clock and stopped after.
    The driver is a fresh process: Ray caches its auth token per process, and this one already
    talked to a local Ray of its own."""
    tmp.mkdir()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_cluster_child, args=(rows, batch_size, limits, tmp, results))
    proc.start()
    try:
        while True:
            try:
                return results.get(timeout=5)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the cluster run exited with {proc.exitcode} before reporting") from None
    finally:
        proc.join(timeout=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64, help="rows of real clips on top of the sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2, help="scaling runs per worker count (best is kept)")
    cluster_flags = p.add_mutually_exclusive_group()
    cluster_flags.add_argument("--no-cluster", action="store_true", help="skip the multi-node Ray cluster run")
    cluster_flags.add_argument("--cluster-only", action="store_true",
                               help="only the local pool and the multi-node Ray cluster, on the same input")
    p.add_argument("--decode-threads", type=int, default=DecodeLimits().decode_threads,
                   help="FFmpeg threads per decode (0: the worker's share of the cores, as in the CLI)")
    return p.parse_args(argv)


def warm_ray_seconds(rows: list, args: argparse.Namespace, limits: DecodeLimits, tmp: Path, record) -> dict[int, float]:
    """Best time per worker count with Ray already running and the stages set up (1 and 2 workers ABBA)."""
    import ray

    print("warm (Ray already running, stages set up in a warm-up run; 1 and 2 workers alternated ABBA):")
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    try:
        timed_run(rows[: 2 * WORKERS * args.batch_size], RunnerOptions(runner="ray", workers=WORKERS),
                  tmp / "warmup-ray", args.batch_size, limits)
        times: dict[int, list[float]] = {1: [], WORKERS: []}
        for i in range(args.repeat):
            for w in ((1, WORKERS) if i % 2 == 0 else (WORKERS, 1)):
                times[w].append(record(f"ray warm [{i}]", w, RunnerOptions(runner="ray", workers=w)))
        return {w: min(t) for w, t in times.items()}
    finally:
        ray.shutdown()


def plain_process_seconds(rows: list, args: argparse.Namespace, limits: DecodeLimits) -> dict[int, float]:
    """Best time per worker count for the stages in plain processes, no engine (ABBA)."""
    n = len(rows)
    print("no engine (the stages in plain processes started together, warm; alternated ABBA):")
    bare: dict[int, list[float]] = {1: [], WORKERS: []}
    for i in range(args.repeat):
        for w in ((1, WORKERS) if i % 2 == 0 else (WORKERS, 1)):
            bare[w].append(bare_seconds(rows, w, args.batch_size, limits))
            print(f"  {f'plain processes [{i}]':<30} workers {w} {bare[w][-1]:6.1f} s "
                  f"{n / bare[w][-1]:6.2f} clips/s", flush=True)
    return {w: min(t) for w, t in bare.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = DecodeLimits(decode_threads=args.decode_threads)

    import ray

    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        tmp = Path(tmp)
        rows = build_input(tmp, args.clips)
        n = len(rows)
        print(f"input: {n} clips for the runners (sample incl. broken files + {args.clips} real clips), "
              f"batch {args.batch_size}, decode threads {args.decode_threads or 'one per worker core'}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        journals: dict[str, pd.DataFrame] = {}

        def record(name: str, workers: int, options: RunnerOptions) -> float:
            # a Ray the runner starts is gone, workers and all, before their CPU time can be read
            counted = options.runner != "ray" or ray.is_initialized()
            t = timed_run(rows, options, tmp / f"out-{len(journals)}", args.batch_size, limits)
            seconds, journals[name] = t.seconds, t.journal
            cores = f"{t.own_cores:4.2f}" if counted else " n/a"
            print(f"  {name:<30} workers {workers} {seconds:6.1f} s {n / seconds:6.2f} clips/s   used "
                  f"{cores} cores; machine {100 * t.machine_busy:3.0f}% busy (all users)", flush=True)
            return seconds

        print("cold (engine started by the runner, as the CLI does):")
        local = record("local process pool", WORKERS, RunnerOptions(runner="local", workers=WORKERS))
        if not args.cluster_only:
            ray_cold = record("ray (starts local Ray)", WORKERS, RunnerOptions(runner="ray", workers=WORKERS))
            beam = record("beam (FnApiRunner, processes)", WORKERS, RunnerOptions(runner="beam", workers=WORKERS))
        cluster = None
        if not args.no_cluster:
            print("multi-node (a Ray cluster of separate raylets, started once):", flush=True)
            t = cluster_run(rows, args.batch_size, limits, tmp / "cluster")
            cluster, journals["ray cluster (head + 2 nodes)"] = t.seconds, t.journal
            print(f"  {'ray cluster (head + 2 nodes)':<30} workers {WORKERS} {t.seconds:6.1f} s "
                  f"{n / t.seconds:6.2f} clips/s   machine {100 * t.machine_busy:3.0f}% busy (all users)", flush=True)
        if args.cluster_only:
            return report(journals, n, local, cluster=cluster)
        ray_w = warm_ray_seconds(rows, args, limits, tmp, record)
        bare_w = plain_process_seconds(rows, args, limits)
        return report(journals, n, local, cluster=cluster, ray_cold=ray_cold, beam=beam, ray_w=ray_w,
                      bare_w=bare_w)


def report(journals: dict[str, pd.DataFrame], n: int, local: float, cluster: float | None = None,
           ray_cold: float | None = None, beam: float | None = None, ray_w: dict[int, float] | None = None,
           bare_w: dict[int, float] | None = None) -> int:
    """Print the ratios to the local run of what was measured; 1 when a run journaled other rows."""
    reference = journals["local process pool"]
    agree = []
    for name, journal in journals.items():
        try:
            assert_frame_equal(journal, reference)
            agree.append(name)
        except AssertionError as e:
            print(f"  LEDGER MISMATCH {name}: {str(e).splitlines()[0]}")

    print("\n== engines on the clean stage (same input, same run)")
    print(f"   local {local:.1f} s ({n / local:.2f} clips/s) = 1.00x")
    if ray_cold is not None and ray_w is not None:
        print(f"   ray   {ray_cold:.1f} s ({n / ray_cold:.2f} clips/s): overhead {ray_cold / local:.2f}x local "
              f"(incl. starting Ray); warm 2 workers {ray_w[WORKERS] / local:.2f}x local")
    if beam is not None:
        print(f"   beam  {beam:.1f} s ({n / beam:.2f} clips/s): overhead {beam / local:.2f}x local")
    if cluster is not None:
        print(f"   ray cluster, 2 worker nodes of 1 CPU (--ray-address, code shipped): {cluster:.1f} s "
              f"({n / cluster:.2f} clips/s) = {cluster / local:.2f}x local (nodes already running)")
    if ray_w is not None and bare_w is not None:
        print(f"   ray scaling 1 -> {WORKERS} workers: {ray_w[1] / ray_w[WORKERS]:.2f}x (goal >= 1.7x); "
              f"the same stages in plain processes, no engine: {bare_w[1] / bare_w[WORKERS]:.2f}x")
    print(f"   ledgers identical to local: {len(agree)}/{len(journals)} runs")
    print(f"   load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machines distort ratios)")
    return 0 if len(agree) == len(journals) else 1

if __name__ == "__main__":
    sys.exit(main())
