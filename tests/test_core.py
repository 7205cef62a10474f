"""The core layer's shared helpers: the muxer, the device resolver, the JSON cleaner."""
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from core.decode import DecodeRequest, decode, probe
from core.device import DeviceUnavailable, resolve_device, torch_device, wants_gpu
from core.jsonsafe import json_safe
from core.mux import AudioTrack, VideoCopy, VideoTrack, mux


def _frames(n: int, rate: int, size=(64, 48)):
    w, h = size
    for i in range(n):
        yield np.full((h, w, 3), 20 * (i % 10), np.uint8), Fraction(i, rate)


def _clicks(sr: int, seconds: float, times: list[float], channels: int = 1) -> np.ndarray:
    pcm = np.zeros((channels, int(sr * seconds)), np.float32)
    for t in times:
        pcm[:, int(round(t * sr)):int(round(t * sr)) + 32] = 0.7
    return pcm


@pytest.mark.parametrize("suffix,codec,fmt", [(".mp4", "flac", "s16"), (".mov", "alac", "s16p"),
                                               (".mkv", "pcm_s16le", "s16")])
def test_mux_lossless_audio_lands_sample_exactly_beside_the_picture(tmp_path, suffix, codec, fmt):
    sr, times = 16000, [0.5, 1.25, 2.0]
    out = mux(tmp_path / f"a{suffix}", VideoTrack(frames=_frames(75, 25), size=(64, 48)),
              AudioTrack(pcm=_clicks(sr, 3.0, times), sample_rate=sr, codec=codec, sample_format=fmt))
    clip = decode(out, DecodeRequest(audio_rates=(sr,), rgb_fps=25.0))
    assert clip.rgb.shape == (75, 48, 64, 3)
    assert [int(np.argmax(clip.rgb_times >= t - 1e-6)) for t in (0.0, 1.0)] == [0, 25]
    audio = clip.audio[sr]
    onsets = np.flatnonzero((np.abs(audio[1:]) > 0.3) & (np.abs(audio[:-1]) <= 0.3)) + 1
    assert list(onsets) == [int(round(t * sr)) for t in times]  # lossless and unshifted: exact samples
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_mux_keeps_an_audio_start_offset_and_native_channels(tmp_path):
    sr = 48000
    out = mux(tmp_path / "s.mp4", VideoTrack(frames=_frames(50, 25), size=(64, 48)),
              AudioTrack(pcm=_clicks(sr, 1.5, [0.5], channels=2), sample_rate=sr, codec="flac", sample_format="s16",
                         start_pts=sr // 4), options={"movie_timescale": str(sr)})
    clip = decode(out, DecodeRequest(audio_native=True))
    assert clip.audio_native.shape[0] == 2 and clip.native_sr == sr
    assert clip.audio_lead_s == pytest.approx(0.25, abs=1.0 / sr)


def test_mux_copies_a_video_stream_packet_for_packet(tmp_path):
    import av

    src = mux(tmp_path / "src.mp4", VideoTrack(frames=_frames(30, 15), size=(64, 48), rate=Fraction(15)))
    out = mux(tmp_path / "copy.mp4", VideoCopy(src), AudioTrack(pcm=_clicks(16000, 2.0, [1.0]), sample_rate=16000,
                                                                 codec="aac"))
    with av.open(str(src)) as a, av.open(str(out)) as b:
        assert [bytes(p) for p in a.demux(a.streams.video[0]) if p.size] == \
               [bytes(p) for p in b.demux(b.streams.video[0]) if p.size]
    assert probe(out).has_audio


def test_a_failed_mux_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="even"):
        mux(tmp_path / "odd.mp4", VideoTrack(frames=_frames(3, 25, size=(63, 48)), size=(63, 48)))
    with pytest.raises(ValueError, match="channels, samples"):
        mux(tmp_path / "flat.mp4", audio=AudioTrack(pcm=np.zeros(100, np.float32), sample_rate=16000))
    with pytest.raises(ValueError, match="cannot tell the container"):
        mux(tmp_path / "clip.bin", VideoTrack(frames=_frames(3, 25), size=(64, 48)))
    assert list(tmp_path.iterdir()) == []


def test_device_resolution(monkeypatch):
    import torch

    assert resolve_device("cpu") == "cpu" and torch_device(None).type in ("cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu" and not wants_gpu("auto")
    assert wants_gpu("cuda:1")  # the engine must schedule a GPU for it even where this process sees none
    with pytest.raises(DeviceUnavailable, match="--clap-device cuda was asked for"):
        resolve_device("cuda", "--clap-device")
    with pytest.raises(DeviceUnavailable, match="not a device name"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and wants_gpu("auto") and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceUnavailable, match="1 CUDA device"):
        resolve_device("cuda:3")


def test_json_safe_turns_pandas_and_numpy_values_into_strict_json():
    import pandas as pd

    row = {"a": np.int64(3), "b": np.float32(0.5), "c": float("nan"), "d": np.float64("inf"), "e": pd.NA,
           "f": pd.NaT, "g": np.bool_(True), "h": np.arange(2, dtype=np.int16), "i": ("x", np.str_("y")),
           "j": {"k": [np.nan, 1]}, "s": "text"}
    clean = json_safe(row)
    assert json.loads(json.dumps(clean, allow_nan=False)) == {
        "a": 3, "b": 0.5, "c": None, "d": None, "e": None, "f": None, "g": True, "h": [0, 1], "i": ["x", "y"],
        "j": {"k": [None, 1]}, "s": "text"}
    assert type(clean["a"]) is int and type(clean["g"]) is bool
    kept = json_safe({"c": np.float64("nan")}, keep_nan=True)["c"]
    assert type(kept) is float and np.isnan(kept)


def test_core_imports_nothing_above_it():
    """The layer contract, checked here too so a plain pytest run catches it."""
    import ast

    for path in (Path(__file__).parents[1] / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        above = [n for n in names if n.split(".")[0] in ("pipeline", "train", "filters", "augment", "shards")]
        assert not above, f"{path.name} imports {above}"
