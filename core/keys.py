"""Sample keys: deterministic, unique, and safe as WebDataset keys and file names.

WebDataset splits a member name at the first dot, and a key becomes part of file paths, so keys
contain only ``[A-Za-z0-9_-]``: no dots, no path separators, nothing a shell would interpret.
"""
from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize(part: str) -> str:
    """Replace every character outside ``[A-Za-z0-9_-]`` with ``_`` (never empty)."""
    return _UNSAFE.sub("_", str(part)) or "_"


def make_key(*parts: object) -> str:
    return "-".join(sanitize(str(p)) for p in parts)


def is_safe(key: str) -> bool:
    return bool(key) and not _UNSAFE.search(key)


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of the parts, the same in every process, machine and Python run (unlike
    ``hash()``): shard order, data-stream draws and per-sample seeds are built on it."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
