"""Real services on loopback for the cluster tests: free ports, owned process groups, bounded waits.

Every service is started in its own session (process group), so stopping it kills exactly the
processes this test started (``os.killpg`` on that group), never others' by name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from pipeline.runners.local import environ  # noqa: F401  (tests set S3 variables with it)

LOOPBACK = "127.0.0.1"
# manifest items of the generated sample the cluster runs clean: its first broken rows (a missing
# file, a bad start time, an empty file) and five clips; enough for a node to be lost mid-run
SAMPLE_LIMIT = 8


def sample_clean_args(root: Path, out: Path, *extra: str) -> list[str]:
    """``pipeline.clean`` on the sample's first items, batch 1, CLAP off: every runner, the same rows."""
    return ["--dataset", "vggsound", "--root", str(root), "--out", str(out), "--clap-model", "none",
            "--batch-size", "1", "--limit", str(SAMPLE_LIMIT), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: {_tail(log)}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout:.0f}s: {_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start a service in a new session, output to ``log``."""
    out = open(log, "ab")
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    finally:
        out.close()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the service's process group, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            return
        time.sleep(0.5)
        if not _group_alive(proc.pid):
            return


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its ranks in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child] + descendants(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, leaves first: a crash, no chance to clean up."""
    for p in reversed([pid] + descendants(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class S3Server:
    """moto's S3 server on loopback: ``env`` holds the standard AWS variables that point every client at
    it; its request log (one line per request, written by the server) counts what clients sent."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.log = tmp / "moto.log"
        self.proc = start([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)], self.log)
        self.env = {"AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def puts(self, url: str) -> int:
        """PUT requests the server has answered for objects below ``s3://bucket/prefix`` so far."""
        path = "/" + url.removeprefix("s3://")
        return sum(f'"PUT {path}' in line for line in self.log.read_text(errors="replace").splitlines())


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[S3Server]:
    """A running S3 server, stopped (its process group) when the block ends."""
    server = S3Server(tmp)
    try:
        wait_for_port(server.port, 60, server.proc, server.log)
        yield server
    finally:
        stop(server.proc)


RAY_LOOPBACK = Path(__file__).with_name("ray_loopback.py")
_RAY_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
                   "--dashboard-agent-listen-port", "--metrics-export-port", "--runtime-env-agent-port")


class RayCluster:
    """A head and worker nodes started with ``ray start --block``, each its own raylet and process group.

    Every port is picked free on loopback (several clusters may run on this machine at once), the
    temp dir is private, nodes run without this checkout on their path (the driver ships the code
    through its runtime env) and token authentication is on, with a token made for this cluster.
    """

    def __init__(self, tmp: Path):
        import secrets

        self.tmp = tmp
        # Ray's socket paths must stay under 107 bytes: a short private folder, removed by close()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="v2a-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.cpus = 0
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        OMP_NUM_THREADS="1")

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        ports = [str(a) for flag in _RAY_PORT_FLAGS for a in (flag, free_port())]
        cmd = [sys.executable, str(RAY_LOOPBACK), "ray", "start", "--block", "--node-ip-address", LOOPBACK,
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *ports, *args]
        node_dir = self.tmp / name
        node_dir.mkdir(exist_ok=True)
        proc = start(cmd, self.tmp / f"{name}.log", env=self.env, cwd=node_dir)
        self.nodes[name] = proc
        return proc

    def start_head(self, timeout: float = 120) -> None:
        """The head runs the GCS and no work (``--num-cpus 0``), as on a real cluster."""
        proc = self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0",
                                    "--include-dashboard", "false", "--ray-client-server-port", str(free_port())])
        wait_for_port(self.port, timeout, proc, self.tmp / "head.log")

    def add_workers(self, names: list[str], cpus: int = 1, tries: int = 2) -> None:
        """Start worker nodes together and wait until their CPUs count in the cluster. ``ray start``
        gives a raylet 30 s to register, which a loaded machine can miss: a node that gives up is
        started again (``tries`` times)."""
        expected = self.cpus + cpus * len(names)
        procs = {name: self._start(name, ["--address", self.address, "--num-cpus", str(cpus)]) for name in names}
        for attempt in range(tries):
            exited = self.wait_for_cpus(expected, procs=procs)
            if not exited:
                self.cpus = expected
                return
            for name in exited:  # the node gave up registering: start it again
                self.stop_node(name)
                if attempt < tries - 1:
                    procs[name] = self._start(name, ["--address", self.address, "--num-cpus", str(cpus)])
        raise RuntimeError(f"worker nodes {exited} exited before they registered: {_tail(self.tmp / f'{exited[0]}.log')}")

    def wait_for_cpus(self, cpus: int, timeout: float = 180, procs: dict[str, subprocess.Popen] | None = None
                      ) -> list[str]:
        """Until the cluster reports ``cpus`` CPUs; returns the names of ``procs`` (nodes) that exited first.

        One probe driver joins the cluster and polls its resources (a new driver per poll would pay
        Ray's start-up each time)."""
        procs = procs or {}
        probe = ("import sys, time, ray\n"
                 "ray.init(address=%r, log_to_driver=False)\n"
                 "deadline = time.monotonic() + %r\n"
                 "while int(ray.cluster_resources().get('CPU', 0)) != %d:\n"
                 "    if time.monotonic() > deadline:\n"
                 "        sys.exit('CPUs: %%s' %% ray.cluster_resources().get('CPU', 0))\n"
                 "    time.sleep(0.2)\n") % (self.address, timeout, cpus)
        log = self.tmp / "probe.log"
        driver = start([sys.executable, str(RAY_LOOPBACK), "-c", probe], log, env=self.env, cwd=self.tmp)
        deadline = time.monotonic() + timeout + 60
        try:
            while driver.poll() is None:
                exited = [name for name, proc in procs.items() if proc.poll() is not None]
                if exited:
                    return exited
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster never reached {cpus} CPUs: {_tail(log)}")
                time.sleep(0.2)
        finally:
            stop(driver)
        if driver.returncode != 0:
            raise TimeoutError(f"cluster never reached {cpus} CPUs: {_tail(log)}")
        return []

    def stop_node(self, name: str, grace: float = 10.0) -> None:
        stop(self.nodes.pop(name), grace)

    def close(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last; nothing left to save
            self.stop_node(name, grace=2.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
