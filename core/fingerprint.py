"""Settings fingerprints: a short, stable digest of what produced a result.

A fingerprint is the sha256 of the value's canonical JSON (sorted keys, no whitespace, UTF-8, no
NaN), so it is the same on every machine, Python version and dict order. Results stored with their
fingerprint can be reused only by a run whose fingerprint is equal: anything else is recomputed
or refused, never silently mixed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, is_dataclass
from typing import Any


class FingerprintError(TypeError):
    """A value that has no canonical JSON form (NaN, an object, a non-string dict key)."""


def _canonical(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _canonical(asdict(value))
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise FingerprintError(f"dict keys must be strings: {sorted(map(repr, value))[:3]}")
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise FingerprintError(f"{value!r} has no canonical JSON form; use None for a missing number")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise FingerprintError(f"cannot fingerprint a {type(value).__name__}: convert it to JSON types first")


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that its fingerprint is taken of."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def fingerprint(value: Any) -> str:
    """sha256 (hex) of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
