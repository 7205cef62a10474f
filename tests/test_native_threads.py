"""A worker's native thread pools (BLAS, OpenCV, FFmpeg, torch) stay within the cores it was given.

Runners call ``limit_native_threads`` in every worker (``tests/test_runners.py`` checks that on
each engine); these tests run it in a fresh interpreter, since the cap is process-wide.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cap_reaches_blas_opencv_and_ffmpeg_decoders():
    got = run_python(
        "import json, cv2, numpy; from threadpoolctl import threadpool_info\n"
        "from core.config import DecodeLimits\n"
        "from core.decode import video_threads\n"
        "from core.native_threads import limit_native_threads\n"
        "before = video_threads(DecodeLimits())\n"
        "limit_native_threads(1)\n"
        "print(json.dumps({'before': before, 'ffmpeg': video_threads(DecodeLimits()),\n"
        "  'explicit': video_threads(DecodeLimits(decode_threads=3)), 'cv2': cv2.getNumThreads(),\n"
        "  'blas': sorted({p['num_threads'] for p in threadpool_info()})}))")
    assert got["before"] == 0, "outside a runner FFmpeg chooses its own thread count"
    assert got["ffmpeg"] == 1 and got["cv2"] == 1 and got["blas"] == [1]
    assert got["explicit"] == 3, "--decode-threads overrides the worker's cap"


@pytest.mark.slow
def test_cap_reaches_torch_once_loaded_and_never_imports_it():
    got = run_python(
        "import json, sys; from core.native_threads import limit_native_threads\n"
        "limit_native_threads(1)\n"
        "imported = 'torch' in sys.modules\n"
        "import torch\n"
        "torch.set_num_threads(3)\n"
        "limit_native_threads(1)\n"
        "print(json.dumps({'imported': imported, 'torch': torch.get_num_threads()}))")
    assert got == {"imported": False, "torch": 1}
