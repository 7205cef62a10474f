"""Settings fingerprints: which settings produced a stored result, so a rerun never mixes two kinds.

A stage that journals results stores ``fingerprint(settings)`` with every row, and the settings
themselves once (:class:`SettingsRegistry`). A rerun compares fingerprints before any work: rows
made with other settings are either refused (with :func:`describe_differences` naming each
setting that changed) or recomputed on request. Only settings that change a stored value belong
in the fingerprint: thresholds applied later to stored scores do not.

API (shared by ``pipeline.clean`` and ``pipeline.encode``)::

    fp = fingerprint({"av_align": asdict(cfg), ...})       # 16 hex digits, stable across runs
    registry = SettingsRegistry(folder / "settings.json")  # fingerprint -> settings, kept on disk
    registry.record(settings)                              # returns fp; written atomically
    registry.get(fp)                                       # the settings, or None if unknown
    differences(old, new)                                  # ["av_align.mode: 'fast' -> 'reference'", ...]
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

from core.atomic import atomic_write_text

FINGERPRINT_CHARS = 16


def canonical(value: Any) -> Any:
    """Plain JSON values: dataclasses to dicts, tuples to lists, floats checked finite, keys as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/inf; a repr keeps them distinct and deterministic
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"setting of type {type(value).__name__} cannot be fingerprinted")


def canonical_json(settings: Mapping[str, Any]) -> str:
    return json.dumps(canonical(settings), sort_keys=True, separators=(",", ":"))


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of ``settings`` (same settings, same fingerprint, on every machine)."""
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


_UNSET = object()


def _show(value: Any) -> str:
    return "(not set)" if value is _UNSET else repr(value)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs, as ``name: old -> new`` (dotted names for nested settings)."""
    a, b = _flatten(canonical(old)), _flatten(canonical(new))
    return [f"{name}: {_show(a.get(name, _UNSET))} -> {_show(b.get(name, _UNSET))}"
            for name in sorted(set(a) | set(b)) if a.get(name, _UNSET) != b.get(name, _UNSET)]


class SettingsRegistry:
    """Every settings set a folder's results were made with, by fingerprint (a small JSON file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # the fingerprints in the rows still decide; only the description is lost
        return data if isinstance(data, dict) else {}

    def get(self, fp: str) -> dict[str, Any] | None:
        return self._load().get(fp)

    def record(self, settings: Mapping[str, Any]) -> str:
        fp = fingerprint(settings)
        known = self._load()
        if fp not in known:
            known[fp] = canonical(settings)
            atomic_write_text(self.path, json.dumps(known, indent=1, sort_keys=True) + "\n")
        return fp
