"""The one cleaner from pandas/NumPy values to plain JSON: numbers, strings, lists, dicts, null.

Rows come out of pandas with NumPy scalars and NaN standing for "missing"; strict JSON has
neither. ``json_safe`` maps NumPy scalars to Python numbers, arrays and tuples to lists, and
missing values (None, NaN, pandas NA/NaT, and, unless ``keep_nan``, infinities) to None.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

_MISSING_TYPES = ("NAType", "NaTType")  # pandas.NA, pandas.NaT (pandas is not imported here)


def json_safe(value: Any, keep_nan: bool = False) -> Any:
    """``value`` with every nested number a Python int/float and every missing value None.

    ``keep_nan=True`` leaves non-finite floats as they are (for Python's own ``json``, which
    round-trips NaN, where a reader must see exactly the float it was given).
    """
    if value is None or type(value).__name__ in _MISSING_TYPES:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if keep_nan or math.isfinite(v) else None
    if isinstance(value, dict):
        return {k: json_safe(v, keep_nan) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v, keep_nan) for v in value]
    if isinstance(value, np.generic):  # np.str_, np.bytes_
        return value.item()
    return value
