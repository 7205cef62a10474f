"""Atomic, durable file writes: the one way every output of the project reaches disk.

A file is written under a temporary name in its own folder, flushed and fsynced, renamed into
place, and the folder is fsynced so the rename survives a power loss. A reader therefore sees
either the old file or the complete new one, never a torn write.

Temporary names are unique per write and name their writer (host and PID), so two processes
writing one file never touch each other's temporary files, and a cleanup after a crash removes
only what a dead writer left (``is_abandoned``).
"""
from __future__ import annotations

import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, IO, Iterator

TEMP_SUFFIX = ".tmp"
# a writer still alive after this long is not writing one file: its temporary file is abandoned
ABANDONED_AFTER_S = 6 * 3600.0
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9-]")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{32}\.tmp$")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    return _HOST_UNSAFE.sub("-", socket.gethostname())[:64] or "host"


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path`` (same filesystem, so rename is atomic), unique per
    write: ``.{name}.{host}.{pid}.{random}.tmp``."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_abandoned(path: str | Path, max_age_s: float = ABANDONED_AFTER_S) -> bool:
    """Whether ``path`` is a temporary file of ``temp_path`` whose writer cannot finish it: a dead PID
    on this host, or (other hosts, unknown names) untouched for ``max_age_s``."""
    path = Path(path)
    m = _TEMP_NAME.match(path.name)
    if m and m["host"] == _host():
        return not _pid_alive(int(m["pid"]))
    try:
        return time.time() - path.stat().st_mtime > max_age_s
    except FileNotFoundError:  # its writer renamed or removed it meanwhile
        return False


def remove_abandoned(folder: str | Path, max_age_s: float = ABANDONED_AFTER_S) -> int:
    """Remove the abandoned temporary files in ``folder`` (not below it); returns how many."""
    n = 0
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if is_abandoned(p, max_age_s):
            p.unlink(missing_ok=True)
            n += 1
    return n


@contextmanager
def _replacing(tmp: Path, path: Path, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Rename ``tmp`` to ``path`` (then fsync the folder) if the block succeeds; else remove ``tmp``."""
    try:
        yield tmp
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None],
                 before_rename: Callable[[], None] | None = None) -> Path:
    """Call ``write(file)`` on a temporary file, then fsync and rename it to ``path``.

    ``before_rename()`` runs once the temporary file is complete and durable, just before it takes
    its name (e.g. to record what is about to appear); if it raises, nothing is renamed.
    """
    path = Path(path)
    with _replacing(temp_path(path), path, before_rename) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path for a writer that opens files by name (FFmpeg, soundfile); on success
    fsync it and rename it to ``path``. The name is ``temp_path``'s (ends in ``.tmp``), so a folder
    scan for media never takes a half-written file for a clip: tell the writer the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(temp_path(path), path) as tmp:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_table(table, path: str | Path) -> Path:
    """A pyarrow table as Parquet (imported lazily: core stays light for the media helpers)."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda f: pq.write_table(table, f))
