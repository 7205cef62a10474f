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


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[dict]:
    """moto's S3 server on loopback; yields the standard AWS variables that point every client at it."""
    port = free_port()
    log = tmp / "moto.log"
    proc = start([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)], log)
    try:
        wait_for_port(port, 60, proc, log)
        yield {"AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        stop(proc)


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

    def add_worker(self, name: str, cpus: int = 1, tries: int = 2) -> None:
        """Start a worker node and wait until its CPUs count in the cluster (one node at a time:
        ``ray start`` gives a raylet 30 s to register, which a loaded machine can miss)."""
        expected = self.cpus + cpus
        for attempt in range(tries):
            proc = self._start(name, ["--address", self.address, "--num-cpus", str(cpus)])
            try:
                self.wait_for_cpus(expected, proc=proc)
                self.cpus = expected
                return
            except RuntimeError:  # the node gave up registering: start it again
                self.stop_node(name)
                if attempt == tries - 1:
                    raise

    def wait_for_cpus(self, cpus: int, timeout: float = 180, proc: subprocess.Popen | None = None) -> None:
        """Until the cluster reports ``cpus`` CPUs; RuntimeError when ``proc`` (a node) exits first."""
        deadline = time.monotonic() + timeout
        probe = ("import ray; ray.init(address=%r, log_to_driver=False); "
                 "print(int(ray.cluster_resources().get('CPU', 0)))" % self.address)
        last = ""
        while time.monotonic() < deadline:
            done = subprocess.run([sys.executable, str(RAY_LOOPBACK), "-c", probe], env=self.env, cwd=self.tmp,
                                  capture_output=True, text=True, timeout=120)
            last = done.stdout.strip().splitlines()[-1:] or [done.stderr[-500:]]
            if done.returncode == 0 and last == [str(cpus)]:
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"node exited with {proc.returncode} before it registered")
            time.sleep(2)
        raise TimeoutError(f"cluster never reached {cpus} CPUs (last: {last})")

    def stop_node(self, name: str) -> None:
        stop(self.nodes.pop(name))

    def close(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last
            self.stop_node(name)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
