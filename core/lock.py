"""One lock per output folder, so two runs never write into the same ``--out`` at once.

The lock is a file ``FOLDER/.v2a.lock`` created exclusively (``O_CREAT | O_EXCL``, atomic on
local and NFSv3+ filesystems) holding the holder's host, PID, start time and command. A second run
refuses at once with a message that names the holder. A lock left by a process that no longer
exists on this host (a killed job) is taken over with a warning; a lock from another host is
never taken over automatically, since its process cannot be checked from here.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

LOCK_NAME = ".v2a.lock"


class FolderLocked(RuntimeError):
    """Another live run holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class FolderLock:
    """``with FolderLock(out): ...`` holds ``out`` for this process; released on exit."""

    def __init__(self, folder: str | Path, purpose: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        self._mine: dict | None = None
        self._created = False  # the folder did not exist: a run that wrote nothing leaves nothing behind

    def _create(self) -> bool:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": self.purpose}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        self._mine = record
        return True

    def acquire(self) -> "FolderLock":
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release, or a stale lock be removed, between our steps
            if self._create():
                return self
            holder = _read(self.path)
            if not holder:  # being written this instant, or unreadable: look again shortly
                time.sleep(0.05)
                if self.path.exists() and not _read(self.path):
                    raise FolderLocked(f"{self.folder} has an unreadable lock file {self.path}; if no run is "
                                       f"using this folder, delete that file and rerun")
                continue
            same_host = holder.get("host") == socket.gethostname()
            pid = holder.get("pid")
            if same_host and isinstance(pid, int) and not _alive(pid):
                warnings.warn(f"taking over the stale lock of {self.folder}: PID {pid} on this host "
                              f"({holder.get('command', '?')}, started {holder.get('started', '?')}) is gone",
                              RuntimeWarning, stacklevel=2)
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{pid}-{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                continue
            where = "this host" if same_host else f"host {holder.get('host')}"
            raise FolderLocked(
                f"{self.folder} is in use by PID {pid} on {where} since {holder.get('started', '?')} "
                f"({holder.get('command', '?')}); wait for it, use another output folder, or, if that run "
                f"is certainly gone, delete {self.path}")
        raise FolderLocked(f"could not take the lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        if self._mine is not None and _read(self.path) == self._mine:
            self.path.unlink(missing_ok=True)
            if self._created and not any(self.folder.iterdir()):
                self.folder.rmdir()
        self._mine = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
