"""``.npy`` members as read-only arrays: no copy, no pickle, cached headers, cheap finiteness.

Every sample of a shard repeats the same few ``.npy`` headers, which NumPy parses with
``ast.literal_eval``; they are parsed once and cached. Payloads are used in place
(``np.frombuffer``), since the copy ``np.load`` makes is a large part of a reader's time.
"""
from __future__ import annotations

import functools
import io
import math

import numpy as np


class SampleError(ValueError):
    """One sample cannot be used for training (missing or malformed member)."""


@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    buf = io.BytesIO(prefix)
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    return shape, fortran, dtype, buf.tell()


def load_npy(data: bytes, name: str) -> np.ndarray:
    """Decode one ``.npy`` member without copying its payload; object (pickled) arrays are refused."""
    try:
        if len(data) < 12:
            raise ValueError(f"{len(data)} bytes is too short for an .npy file")
        major = data[6]
        end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else 12 + int.from_bytes(data[8:12], "little")
        shape, fortran, dtype, offset = _npy_header(bytes(data[:end]))
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        count = math.prod(shape)
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape, order="F" if fortran else "C")
    except ValueError as e:  # bad magic, bad header, truncated payload or a pickled object array
        raise SampleError(f"{name}: {e}") from e


# IEEE 754 layouts: (unsigned view, mask without the sign bit, smallest exponent-all-ones pattern)
_FLOAT_BITS = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
               np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
               np.dtype(np.float64): (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def all_finite(array: np.ndarray) -> bool:
    """No NaN and no inf, checked on the bit patterns: a value is non-finite exactly when its
    exponent bits are all ones. NumPy 2.x has no SIMD path for float16 arithmetic, so
    ``isfinite`` or a float sum costs ~200 us per latent; the integer max costs ~7 us."""
    bits = _FLOAT_BITS.get(array.dtype) if array.dtype.isnative else None
    if bits is None:
        return bool(np.isfinite(array).all()) if array.dtype.kind in "fc" else True
    if array.size == 0:
        return True
    utype, mask, exponent = bits
    flat = array.ravel(order="K")  # a view of any contiguous array
    return int((flat.view(utype) & utype(mask)).max()) < exponent
