"""The code version recorded in every output (run.json, plan metadata, dataset card)."""
from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        v = version("v2a-datapipe")
    except PackageNotFoundError:  # a source tree that was never installed
        v = "unknown"
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
            v = f"{v}+git.{sha}"
        except (OSError, subprocess.SubprocessError):
            pass
    return v
