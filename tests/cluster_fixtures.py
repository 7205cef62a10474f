"""Real services on loopback for the cluster tests: free ports, owned process groups, bounded waits.

Every service is started in its own session (process group), so stopping it kills exactly the
processes this test started (``os.killpg`` on that group), never others' by name.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def environ(values: dict) -> Iterator[None]:
    """Set environment variables for the duration (child processes inherit them), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
