"""Decoding by timestamps: real clips, odd and variable frame rates, non-zero starts, windows."""
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from core.config import DecodeLimits
from core.decode import DecodeError, DecodeRequest, decode, probe
from core.mux import AudioTrack, VideoTrack, mux

FIXTURES = Path(__file__).parent / "data" / "vggsound" / "video"


def write_counter_video(path: Path, times_s: list[float], size=(64, 48), audio_s: float | None = None, sr=16000):
    """Frame i is a flat grey level 10*i shown at ``times_s[i]`` (any spacing); optional PCM audio."""
    w, h = size
    frames = ((np.full((h, w, 3), min(255, 10 * i), np.uint8), Fraction(round(t * 1000), 1000))
              for i, t in enumerate(times_s))
    video = VideoTrack(frames=frames, size=size, rate=Fraction(1000), codec="ffv1")
    audio = None
    if audio_s:
        ramp = (np.arange(int(audio_s * sr)) % 1000).astype(np.int16)[None, :]
        audio = AudioTrack(pcm=ramp, sample_rate=sr, codec="pcm_s16le", sample_format="s16")
    return mux(path, video, audio, container_format="matroska")


def test_real_clip_facts():
    clip = decode(FIXTURES / "-yoaSondvkw_000071.mp4",
                  DecodeRequest(audio_rates=(16000, 22050, 48000), gray=True, rgb_fps=2.0))
    assert clip.video_fps == 25.0
    assert clip.gray.shape == (251, 720, 1280)
    assert clip.rgb.shape[1:] == (720, 1280, 3) and clip.rgb.shape[0] in (20, 21)
    np.testing.assert_allclose(clip.rgb_times[:3], [0.0, 0.5, 1.0])
    for rate, audio in clip.audio.items():
        assert audio.dtype == np.float32 and abs(audio.size / rate - clip.duration_s) < 0.01
    assert 10.0 <= clip.duration_s <= 10.05
    assert probe(FIXTURES / "-yoaSondvkw_000071.mp4").video_fps == 25.0


def test_fast_gray_is_small_and_scaled():
    clip = decode(FIXTURES / "0Bp8c3PfAAA_000053.mp4", DecodeRequest(audio_rates=(22050,), gray=True, gray_max_side=160))
    assert clip.gray.shape == (300, 90, 160)
    assert clip.gray_scale == pytest.approx(160 / 1280)


def test_variable_frame_rate_and_nonzero_start(tmp_path):
    # irregular spacing (VFR) starting at 0.7 s: an odd 14.96-fps-like cadence with a jitter
    times = [0.7 + i / 14.96 + (0.01 if i % 3 == 0 else 0.0) for i in range(60)]
    path = write_counter_video(tmp_path / "vfr.mkv", times, audio_s=5.0)
    clip = decode(path, DecodeRequest(audio_rates=(16000,), gray=True, rgb_fps=2.0))
    np.testing.assert_allclose(clip.gray_times, [round(t, 3) for t in times], atol=1e-3)
    # each 2 fps grid point shows the last frame whose time is <= it (frame i has level 10*i)
    for t, img in zip(clip.rgb_times, clip.rgb):
        shown = max([i for i, ft in enumerate(times) if ft <= t + 1e-9], default=0)
        assert abs(int(img.mean()) - min(255, 10 * shown)) <= 2, (t, shown, img.mean())


def test_window_cut_by_timestamps(tmp_path):
    times = [i / 25 for i in range(25 * 30)]  # 30 s at 25 fps
    path = write_counter_video(tmp_path / "long.mkv", times, audio_s=30.0)
    clip = decode(path, DecodeRequest(start_s=12.0, duration_s=10.0, audio_rates=(16000,), gray=True, rgb_fps=2.0))
    assert clip.gray.shape[0] == 250
    np.testing.assert_allclose(clip.gray_times[0], 0.0, atol=1e-6)
    assert clip.rgb.shape[0] == 20
    audio = clip.audio[16000]
    assert audio.size == 160000
    # the PCM ramp restarts every 1000 samples: sample 0 of the window is sample 12*16000 of the file
    assert abs(audio[0] * 32768 - (12 * 16000) % 1000) < 2


def test_errors_are_typed(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("hello, not a video")
    silent_video = write_counter_video(tmp_path / "noaudio.mkv", [i / 25 for i in range(50)])
    short = write_counter_video(tmp_path / "short.mkv", [i / 25 for i in range(10)], audio_s=0.4)
    cases = {
        tmp_path / "missing.mp4": "missing_file",
        empty: "decode_error",
        text: "decode_error",
        silent_video: "no_audio_stream",
        short: "too_short",
    }
    for path, reason in cases.items():
        with pytest.raises(DecodeError) as err:
            decode(path, DecodeRequest(audio_rates=(16000,), gray=True), DecodeLimits(min_duration_s=1.0))
        assert err.value.reason == reason, (path, err.value)


def test_timeout_stops_a_slow_decode():
    with pytest.raises(DecodeError) as err:
        decode(FIXTURES / "0Bp8c3PfAAA_000053.mp4", DecodeRequest(audio_rates=(16000,), gray=True),
               DecodeLimits(timeout_s=0.05))
    assert err.value.reason == "decode_timeout"


# ---------------------------------------------------------------------------- decoding only what is needed


def test_skip_loop_filter_reaches_the_decoder_and_keeps_every_frame():
    path = FIXTURES / "-26aVYRtEAc_000030.mp4"
    full = decode(path, DecodeRequest(gray=True, need_audio=False))
    fast = decode(path, DecodeRequest(gray=True, need_audio=False, skip_loop_filter=True))
    np.testing.assert_array_equal(fast.gray_times, full.gray_times)
    diff = np.abs(fast.gray.astype(np.int16) - full.gray)
    assert diff.max() > 0  # the deblocking filter really was skipped...
    assert diff.mean() < 2.0  # ...and the pictures are the same pictures
    assert fast.duration_s == full.duration_s


@pytest.mark.parametrize("scaler", ["fast_bilinear", "area"])
def test_gray_scaled_inside_ffmpeg_matches_the_opencv_geometry(scaler):
    path = FIXTURES / "0Bp8c3PfAAA_000053.mp4"
    ref = decode(path, DecodeRequest(gray=True, gray_max_side=64, need_audio=False))
    sws = decode(path, DecodeRequest(gray=True, gray_max_side=64, gray_scaler=scaler, need_audio=False))
    assert sws.gray.shape == ref.gray.shape == (300, 36, 64) and sws.gray_scale == ref.gray_scale == 64 / 1280
    np.testing.assert_array_equal(sws.gray_times, ref.gray_times)
    # libswscale expands the limited luma range as OpenCV's BGR path does: same pictures, brighter
    corr = np.corrcoef(sws.gray.ravel().astype(float), ref.gray.ravel().astype(float))[0, 1]
    assert corr > 0.8  # fast_bilinear aliases (0.86 here), area does not


def test_request_options_are_validated():
    with pytest.raises(ValueError, match="gray_scaler"):
        DecodeRequest(gray=True, gray_max_side=64, gray_scaler="nearest-ish")
    with pytest.raises(ValueError, match="rgb_size"):
        DecodeRequest(rgb_fps=2.0, rgb_size=0)
    with pytest.raises(ValueError, match="rgb_grid"):
        DecodeRequest(rgb_fps=2.0, rgb_grid="round")


def test_rgb_frames_sized_as_decoded_equal_the_encoders_resize():
    from core.frames import resize_crop

    path = FIXTURES / "-BAKe6QGTUk_000030.mp4"  # 640x360: the exact path, no pre-shrink
    full = decode(path, DecodeRequest(rgb_fps=2.0, need_audio=False))
    sized = decode(path, DecodeRequest(rgb_fps=2.0, rgb_size=224, need_audio=False))
    np.testing.assert_array_equal(sized.rgb_times, full.rgb_times)
    np.testing.assert_array_equal(sized.rgb, resize_crop(full.rgb, 224))


def write_huge_clip(path: Path, side: int = 8192, seconds: int = 3, fps: int = 1) -> Path:
    """A ``side`` x ``side`` FFV1 clip, one flat frame a second, with silent PCM audio."""
    with av.open(str(path), "w", format="matroska") as c:
        vs = c.add_stream("ffv1", rate=fps)
        vs.width = vs.height = side
        vs.pix_fmt = "yuv420p"
        a = c.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.VideoFrame(side, side, "yuv420p")
        for i in range(seconds * fps):
            for plane in frame.planes:
                plane.update(np.full(plane.buffer_size, 60 + 40 * i, np.uint8))
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, seconds * 16000), np.int16), format="s16", layout="mono")
        silence.sample_rate, silence.pts = 16000, 0
        for p in list(a.encode(silence)) + list(a.encode()):
            c.mux(p)
    return path


# Peak of the memory the encode stage's signal step allocates (tracemalloc sees every NumPy buffer),
# in a fresh process; imports and first-use set-up happen before tracing starts.
_PEAK_PROBE = """
import json, sys, tracemalloc
import numpy as np
from core.frames import resize_crop
from shards.encode_stage import FRAMES, EncodeStageConfig, SignalStage
resize_crop(np.zeros((1, 8, 8, 3), np.uint8), 4)
stage = SignalStage(EncodeStageConfig())
tracemalloc.start()
row = stage.process_row({"key": "k", "video_path": sys.argv[1], "start_s": 0.0, "duration_s": float(sys.argv[2])})
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "status": row.get("status"),
                  "frames": list(row[FRAMES].shape)}))
"""


def _encode_peak(path: Path, seconds: float) -> dict:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(path), str(seconds)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_huge_frames_cost_the_memory_of_a_normal_clip(tmp_path):
    huge = _encode_peak(write_huge_clip(tmp_path / "huge.mkv"), 3.0)
    normal = _encode_peak(FIXTURES / "-yoaSondvkw_000071.mp4", 10.0)  # 1280x720, 10 s
    assert huge["status"] is None and huge["frames"] == [6, 224, 224, 3]
    assert normal["frames"][1:] == [224, 224, 3]
    # full-size RGB frames would be 6 x 201 MB; sized as decoded, the huge clip stays within 1.5x
    assert huge["peak"] <= 1.5 * normal["peak"], (huge, normal)


def test_caller_itimer_survives_a_decode():
    """A decode arms its own SIGALRM, then gives the caller back its timer, minus the time spent."""
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 100.0, 5.0)
    try:
        decode(FIXTURES / "-26aVYRtEAc_000030.mp4", DecodeRequest(audio_rates=(16000,), need_video=False))
        delay, interval = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < delay <= 100.0 and interval == 5.0
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.timeout(60)
def test_file_named_like_an_ffmpeg_protocol_is_read_as_a_file(tmp_path, monkeypatch):
    import shutil

    from pipeline.manifest import youtube_rows

    shutil.copy(FIXTURES / "-26aVYRtEAc_000030.mp4", tmp_path / "pipe:0.mp4")
    monkeypatch.chdir(tmp_path)
    rows = youtube_rows(Path("."))  # a relative root: the path is the bare name "pipe:0.mp4"
    assert [r["video_path"] for r in rows] == ["pipe:0.mp4"] and rows[0]["status"] == ""
    clip = decode("pipe:0.mp4", DecodeRequest(audio_rates=(16000,), need_video=False))
    assert clip.duration_s > 9.0 and probe("pipe:0.mp4").has_video


def _ffmpeg_fps_frames(path: Path, fps: int, count: int) -> list[np.ndarray]:
    """What FFmpeg's own fps filter (round=near, as torio's ``frame_rate=`` uses it) outputs."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        graph = av.filter.Graph()
        src, fps_filter, sink = graph.add_buffer(template=stream), graph.add("fps", f"fps={fps}"), graph.add("buffersink")
        src.link_to(fps_filter)
        fps_filter.link_to(sink)
        graph.configure()
        out = []
        for frame in c.decode(stream):
            graph.push(frame)
            while len(out) < count:
                try:
                    out.append(graph.pull().to_ndarray(format="rgb24"))
                except (av.error.BlockingIOError, av.error.EOFError):
                    break
            if len(out) >= count:
                return out
    return out


@pytest.mark.parametrize("source", ["counter", "real"])
def test_nearest_rgb_grid_picks_the_frames_ffmpegs_fps_filter_picks(source, tmp_path):
    """A 30 fps source on a 25 fps grid: "last" takes the frame at or before each point, "nearest"
    equals FFmpeg's fps filter frame for frame (on a real 30 fps clip and on exact timestamps)."""
    if source == "counter":
        path = write_counter_video(tmp_path / "c.mkv", [i / 30 for i in range(60)])
    else:
        path = FIXTURES / "-26aVYRtEAc_000030.mp4"  # 30 fps
    got = decode(path, DecodeRequest(duration_s=1.6, rgb_fps=25, rgb_grid="nearest", need_audio=False)).rgb
    last = decode(path, DecodeRequest(duration_s=1.6, rgb_fps=25, need_audio=False)).rgb
    expected = _ffmpeg_fps_frames(path, 25, len(got))
    assert len(got) == len(expected) == 40
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert not all(np.array_equal(a, b) for a, b in zip(last, expected))
    if source == "counter":  # grid point j at j/25 s: nearest 30 fps frame round(1.2 j), previous floor(1.2 j)
        levels = [round(int(f[0, 0, 0]) / 10) for f in got[:20]]  # grey 10 * frame index, below 255
        assert levels == [int(np.floor(1.2 * j + 0.5)) for j in range(20)]
        assert [round(int(f[0, 0, 0]) / 10) for f in last[:20]] == [int(np.floor(1.2 * j + 1e-9)) for j in range(20)]
