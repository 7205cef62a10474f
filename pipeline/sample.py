"""Synthetic datasets with known ground truth, so every command runs on a fresh machine.

The clips come from ``core.synth`` (a square that jumps on each event frame, a click at each
event time, optionally shifted). ``generate`` lays such clips out as a VGGSound root (``vggsound.csv`` + ``video/``)
or a YouTube corpus folder, together with the broken inputs the pipeline must survive, and writes
``sample_manifest.json`` saying what every row and file is and what decoding it must give.

    python -m pipeline.sample --out data/vggsound [--kind vggsound|youtube|audio] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from core.cli_config import add_config_args, from_args
from core.config import DEFAULT_SIGNAL, DecodeLimits
from core.synth import EventClip, truncate_file, write_audio_file, write_audio_only, write_event_clip, write_video_only

MANIFEST_NAME = "sample_manifest.json"
_N_VGG_IDS = 30  # ids drawn per VGGSound sample (more than its rows need)
_YT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass(frozen=True)
class SampleConfig:
    """What ``python -m pipeline.sample`` generates."""

    kind: Literal["vggsound", "youtube", "audio"] = field(
        default="vggsound", metadata={"help": "dataset layout: a VGGSound root, a YouTube corpus folder or an "
                                              "audio-only corpus (captions.csv, WavCaps JSON, AudioCaps CSV)"})
    seed: int = field(default=0, metadata={"help": "seed for ids, event times, textures and clicks"})


def youtube_ids(seed: int, n: int, salt: str = "") -> list[str]:
    """``n`` distinct, deterministic 11-character YouTube-style ids."""
    rng = random.Random(f"{seed}:{salt}")
    ids: list[str] = []
    while len(ids) < n:
        yid = "".join(rng.choice(_YT_ALPHABET) for _ in range(11))
        if yid not in ids:
            ids.append(yid)
    return ids


def _event_times(rng: random.Random, rate: Fraction, lo: float, hi: float, count: int, min_gap: float,
                 avoid: Sequence[float] = ()) -> list[float]:
    """``count`` frame-grid times in ``[lo, hi]`` at least ``min_gap`` apart (a shift < gap - 0.2 s can't
    realign them) and 0.5 s away from every ``avoid`` time (window borders of long videos)."""
    for _attempt in range(1000):
        picks = sorted(rng.uniform(lo, hi) for _ in range(count))
        if all(b - a >= min_gap for a, b in zip(picks, picks[1:])) and all(
                abs(t - x) >= 0.5 for t in picks for x in avoid):
            return [float(round(t * rate) / rate) for t in picks]
    step = (hi - lo) / max(count - 1, 1)
    return [float(round((lo + i * step) * rate) / rate) for i in range(count)]


def _clip_record(clip: EventClip, root: Path, offset: float = 0.0, window: float | None = None) -> dict:
    """Event times relative to ``offset`` (the CSV start of an untrimmed file), kept inside the window."""
    def rel(ts):
        out = [round(t - offset, 6) for t in ts]
        return [t for t in out if window is None or 0.0 <= t < window]

    return {
        "file": clip.path.relative_to(root).as_posix(),
        "fps": clip.fps,
        "file_duration_s": clip.duration_s,
        "sample_rate": clip.sample_rate,
        "file_event_times": [round(t, 6) for t in clip.event_times],
        "file_audio_event_times": [round(t, 6) for t in clip.audio_event_times],
        "event_times": rel(clip.event_times),
        "audio_event_times": rel(clip.audio_event_times),
    }


_ALIGNED_LABELS = [
    ("hammering, nailing", "train"), ("dog barking", "train"), ("chopping wood", "train"),
    ("woodpecker pecking tree", "train"), ("bird chirping, tweeting", "test"), ("ice cracking", "test"),
]
_SHIFTS = [("vehicle horn, car horn, honking", "train", 0.32), ("ripping paper", "train", -0.4),
           ("typing on typewriter", "test", 0.52)]


class _VggsoundRows:
    """The CSV rows of a VGGSound sample as they are made: ids, start seconds and the clips' records."""

    def __init__(self, root: Path, seed: int):
        self.root, self.seed = root, seed
        self.rng = random.Random(seed)
        self.window = DEFAULT_SIGNAL.window_s
        self.ids = iter(youtube_ids(seed, _N_VGG_IDS, "vggsound"))
        self.entries: list[dict] = []  # one per CSV row, in the order written later

    def next_id(self) -> tuple[str, int]:
        """A fresh YouTube id and a start second (in this order: the rng sequence fixes the dataset)."""
        return next(self.ids), self.rng.randrange(0, 300)

    def path(self, yid: str, start: int) -> Path:
        return self.root / "video" / f"{yid}_{start:06d}.mp4"

    def events(self, rate: Fraction, lo: float, hi: float, count: int, min_gap: float = 1.0) -> list[float]:
        return _event_times(self.rng, rate, lo, hi, count, min_gap)

    def add(self, kind: str, label: str, split: str, expect: str, clip: EventClip | None, yid: str, start: int, *,
            av_align: str | None = None, note: str = "", offset: float = 0.0, **extra) -> dict:
        entry = {"youtube_id": yid, "start_seconds": start, "label": label, "split": split, "kind": kind,
                 "expect": expect, "expect_av_align": av_align, "expect_curation": [], "note": note, **extra}
        if clip is not None:
            entry.update(_clip_record(clip, self.root, offset=offset, window=self.window))
        self.entries.append(entry)
        return entry

    def add_file(self, kind: str, label: str, expect: str, path: Path, yid: str, start: int, note: str) -> None:
        """A row whose file is not a clip (empty, cut, not a video): the manifest names the file only."""
        self.add(kind, label, "train", expect, None, yid, start, file=path.relative_to(self.root).as_posix(),
                 note=note)


def _aligned_and_shifted(rows: _VggsoundRows) -> None:
    """Clips whose sound matches the picture, one more window of the same video, and shifted sound."""
    seed, window, rate = rows.seed, rows.window, Fraction(25)
    for i, (label, split) in enumerate(_ALIGNED_LABELS):
        yid, start = rows.next_id()
        clip = write_event_clip(rows.path(yid, start), duration_s=window, fps=rate,
                                event_times=rows.events(rate, 0.6, window - 0.6, 3 + i % 3), seed=seed * 1000 + i)
        rows.add("aligned", label, split, "ok", clip, yid, start, av_align="high",
                 note="square jumps and a click sounds on the same frame", audio_shift_s=0.0)
    # same YouTube video, another 10 s window: a different clip with its own key, not a duplicate
    twin = rows.entries[0]
    start2 = (twin["start_seconds"] + 40) % 300
    clip = write_event_clip(rows.path(twin["youtube_id"], start2), duration_s=window, fps=rate,
                            event_times=rows.events(rate, 0.6, window - 0.6, 4), seed=seed * 1000 + 50)
    rows.add("aligned", twin["label"], twin["split"], "ok", clip, twin["youtube_id"], start2, av_align="high",
             note="same youtube_id as another row with a different start: a distinct clip", audio_shift_s=0.0)

    for j, (label, split, shift) in enumerate(_SHIFTS):
        yid, start = rows.next_id()
        lo, hi = 0.6 + max(0.0, -shift), window - 0.6 - max(0.0, shift)
        clip = write_event_clip(rows.path(yid, start), duration_s=window, fps=rate,
                                event_times=rows.events(rate, lo, hi, 4, abs(shift) + 0.3),
                                audio_shift_s=shift, seed=seed * 1000 + 100 + j)
        rows.add("shifted", label, split, "ok", clip, yid, start, av_align="low", audio_shift_s=shift,
                 note=f"audio clicks {shift:+.2f}s from the jumps: no click within one frame of a jump")


def _static_and_untrimmed(rows: _VggsoundRows) -> None:
    """A still, silent clip and an untrimmed download whose CSV window lies inside a longer file."""
    seed, window, rate = rows.seed, rows.window, Fraction(25)
    yid, start = rows.next_id()
    clip = write_event_clip(rows.path(yid, start), duration_s=window, motion=False, sound=False,
                            seed=seed * 1000 + 200)
    rows.add("static_silent", "wind noise", "train", "ok", clip, yid, start, av_align="low",
             note="still square, digital silence: no motion peaks, no onsets (AV-Align 0)", audio_shift_s=0.0,
             expect_curation=["silent", "static"])

    yid, start = next(rows.ids), 10
    long_s = 2.5 * window
    events = (rows.events(rate, 0.6, start - 0.6, 3) + rows.events(rate, start + 0.6, start + window - 0.6, 4)
              + rows.events(rate, start + window + 0.6, long_s - 0.6, 2))
    clip = write_event_clip(rows.path(yid, start), duration_s=long_s, fps=rate, event_times=events,
                            seed=seed * 1000 + 300)
    rows.add("untrimmed", "hammering, nailing", "train", "ok", clip, yid, start, av_align="high",
             offset=float(start), audio_shift_s=0.0, window_start_s=float(start),
             note=f"{long_s:g}s file, CSV start {start}: only [start, start+{window:g}) is the clip; "
                  "event_times are relative to the window start")


def _odd_timing(rows: _VggsoundRows) -> None:
    """An NTSC-rate clip, a variable-frame-rate clip and one too short to keep."""
    seed, window, rate, odd = rows.seed, rows.window, Fraction(25), Fraction(24000, 1001)
    yid, start = rows.next_id()
    clip = write_event_clip(rows.path(yid, start), duration_s=window, fps=odd,
                            event_times=rows.events(odd, 0.6, window - 0.6, 4), seed=seed * 1000 + 400)
    rows.add("odd_fps", "chopping wood", "train", "ok", clip, yid, start, av_align="high", audio_shift_s=0.0,
             note="24000/1001 fps: frame i is at i*1001/24000 s")

    yid, start = rows.next_id()
    clip = write_event_clip(rows.path(yid, start), duration_s=window, fps=rate, fps_is_variable=True,
                            event_times=rows.events(rate, 0.6, window - 0.6, 4), seed=seed * 1000 + 500)
    rows.add("variable_fps", "dog barking", "train", "ok", clip, yid, start, av_align="high", audio_shift_s=0.0,
             note="variable frame rate (frames up to 0.3 frame off the 25 fps grid): use timestamps, not i/fps")

    short_s = round(0.6 * DecodeLimits().min_duration_s, 3)
    yid, start = rows.next_id()
    clip = write_event_clip(rows.path(yid, start), duration_s=short_s, fps=15, event_times=(0.2,),
                            seed=seed * 1000 + 600)
    rows.add("too_short", "ice cracking", "train", "too_short", clip, yid, start,
             note=f"{short_s:g}s long: shorter than DecodeLimits.min_duration_s")


def _broken_inputs(rows: _VggsoundRows) -> None:
    """Files a download leaves behind: empty, truncated, an HTML page, one stream missing, no file at all."""
    seed, window = rows.seed, rows.window
    yid, start = rows.next_id()
    path = rows.path(yid, start)
    path.write_bytes(b"")
    rows.add_file("broken_empty", "dog barking", "decode_error", path, yid, start, "zero-byte file (a failed download)")

    yid, start = rows.next_id()
    path = rows.path(yid, start)
    write_event_clip(path, duration_s=window, seed=seed * 1000 + 700)
    truncate_file(path, 0.5)
    rows.add_file("broken_truncated", "chopping wood", "decode_error", path, yid, start,
                  "a real mp4 cut to half its bytes (moov index lost)")

    yid, start = rows.next_id()
    path = rows.path(yid, start)
    path.write_text("<html><head><title>404 Not Found</title></head><body>Video unavailable</body></html>\n")
    rows.add_file("broken_not_video", "ripping paper", "decode_error", path, yid, start,
                  "an HTML error page saved under a .mp4 name")

    yid, start = rows.next_id()
    clip = write_video_only(rows.path(yid, start), duration_s=window, seed=seed * 1000 + 800)
    rows.add("no_audio", "dog barking", "train", "no_audio_stream", clip, yid, start,
             note="h264 video, no audio stream")

    yid, start = rows.next_id()
    clip = write_audio_only(rows.path(yid, start), duration_s=window, seed=seed * 1000 + 900)
    rows.add("no_video", "hammering, nailing", "train", "no_video_stream", clip, yid, start,
             note="ALAC audio in mp4, no video stream")

    yid, start = rows.next_id()
    rows.add("missing_file", "dog barking", "train", "missing_file", None, yid, start,
             note="listed in the CSV, never downloaded")


def _csv_problems(rows: _VggsoundRows) -> tuple[dict, dict]:
    """Shuffle the rows, insert a duplicate line and two malformed ones; return the duplicate and its original."""
    rng, entries = rows.rng, rows.entries
    rng.shuffle(entries)
    dup_of = next(e for e in entries if e["kind"] == "aligned")
    dup = {k: v for k, v in dup_of.items() if k in ("youtube_id", "start_seconds", "label", "split")}
    dup.update(kind="duplicate", expect="duplicate_id", expect_av_align=None,
               note="repeats an earlier line (same youtube_id and start)")
    entries.insert(entries.index(dup_of) + 1 + rng.randrange(0, len(entries) - entries.index(dup_of)), dup)
    bad_start = {"youtube_id": next(rows.ids), "start_seconds": "3O", "label": "dog barking", "split": "train",
                 "kind": "malformed", "expect": "bad_csv_row", "expect_av_align": None,
                 "note": "start_seconds is not a number (letter O)"}
    short_row = {"youtube_id": next(rows.ids), "start_seconds": 30, "label": None, "split": None,
                 "kind": "malformed", "expect": "bad_csv_row", "expect_av_align": None,
                 "note": "only two fields"}
    entries.insert(rng.randrange(1, len(entries)), bad_start)
    entries.insert(rng.randrange(1, len(entries)), short_row)
    return dup, dup_of


def _generate_vggsound(root: Path, seed: int) -> dict:
    """VGGSound layout: aligned, shifted, static, odd-rate, untrimmed, short and broken clips plus bad CSV rows."""
    rows = _VggsoundRows(root, seed)
    for make in (_aligned_and_shifted, _static_and_untrimmed, _odd_timing, _broken_inputs):
        make(rows)
    dup, dup_of = _csv_problems(rows)
    with open(root / "vggsound.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        for line, e in enumerate(rows.entries, start=1):
            fields = [e["youtube_id"], e["start_seconds"], e["label"], e["split"]]
            writer.writerow([x for x in fields if x is not None])
            e["csv_line"] = line
            e.setdefault("file", None)
    dup["duplicate_of_line"] = dup_of["csv_line"]
    return {"layout": "vggsound", "csv": "vggsound.csv", "video_dir": "video", "window_s": rows.window,
            "rows": rows.entries}


_YT_VIDEOS = [
    # (subfolder, title or None (no sidecar, file named by id), suffix, seconds, fps, shift, tags, categories)
    ("workshop", "Hammer test v1.2 - nailing a pallet", ".mp4", 30.0, 25, 0.0,
     ["hammer", "nails", "woodworking"], ["Howto & Style"]),
    ("nature", "Woodpecker at dawn [4K]", ".mkv", 35.0, 30, 0.0, ["woodpecker", "birds", "forest"], ["Pets & Animals"]),
    ("nature", None, ".webm", 25.0, 25, 0.0, [], []),
    ("street", "Car horns downtown", ".mp4", 28.0, 25, 0.45, ["traffic", "horn"], ["Autos & Vehicles"]),
]


def _generate_youtube(root: Path, seed: int) -> dict:
    """A corpus folder: long videos in subfolders, some with yt-dlp sidecars, one mkv, one webm, one broken."""
    rng = random.Random(seed + 7)
    ids = youtube_ids(seed, len(_YT_VIDEOS) + 1, "youtube")
    # the first video reuses a VGGSound test-split id of the same seed, so test-leak exclusion has a case
    vgg_ids = youtube_ids(seed, _N_VGG_IDS, "vggsound")  # the aligned rows take the first ids, in order
    vgg_test = [yid for yid, (_label, split) in zip(vgg_ids, _ALIGNED_LABELS) if split == "test"]
    ids[0] = vgg_test[0]
    files = []
    for i, (sub, title, suffix, seconds, fps, shift, tags, cats) in enumerate(_YT_VIDEOS):
        yid = ids[i]
        stem = f"{title} [{yid}]" if title else yid
        path = root / sub / f"{stem}{suffix}"
        rate = Fraction(fps)
        lo, hi = 0.6 + max(0.0, -shift), seconds - 0.6 - max(0.0, shift)
        count = int(seconds // 2.5)
        borders = np.arange(0.0, seconds, DEFAULT_SIGNAL.window_s)
        events = _event_times(rng, rate, lo, hi, count, max(1.0, abs(shift) + 0.3), avoid=borders)
        clip = write_event_clip(path, duration_s=seconds, fps=rate, event_times=events, audio_shift_s=shift,
                                sample_rate=48000 if suffix == ".webm" else 44100, seed=seed * 1000 + 2000 + i)
        rec = {"youtube_id": yid, "title": title, "kind": "aligned" if shift == 0 else "shifted", "expect": "ok",
               "expect_av_align": "high" if shift == 0 else "low", "audio_shift_s": shift,
               "info_json": None, "in_vggsound_test_split": yid in vgg_test, **_clip_record(clip, root)}
        if title:
            rec["info_json"] = _write_info(path, yid, title, tags, cats, seconds, fps, root)
        files.append(rec)
    yid = ids[-1]
    path = root / "street" / f"Street ambience [{yid}].mp4"
    write_event_clip(path, duration_s=30.0, seed=seed * 1000 + 2900)
    truncate_file(path, 0.5)
    files.append({"youtube_id": yid, "title": "Street ambience", "kind": "broken_truncated", "expect": "decode_error",
                  "expect_av_align": None, "file": path.relative_to(root).as_posix(), "in_vggsound_test_split": False,
                  "info_json": _write_info(path, yid, "Street ambience", ["street"], ["Travel & Events"], 30.0, 25,
                                           root),
                  "note": "interrupted download: half the bytes, sidecar present"})
    return {"layout": "youtube", "window_s": DEFAULT_SIGNAL.window_s, "files": files}


_AUDIO_FILES = (  # (file, seconds, caption, sound): one long file cut into windows, one silent
    ("clips/rain_long.wav", 25.0, "clicks on a steady hum, recorded close", True),
    ("clips/quiet.flac", 6.0, "an empty room", False),
)


def _generate_audio(root: Path, seed: int) -> dict:
    """An audio-only corpus in all three caption formats, with a long file, a silent one and bad entries."""
    files = []
    for i, (rel, seconds, caption, sound) in enumerate(_AUDIO_FILES):
        write_audio_file(root / rel, duration_s=seconds, sound=sound, seed=seed * 1000 + 3000 + i)
        files.append({"file": rel, "caption": caption, "kind": "long" if seconds > 10 else "silent",
                      "expect": "ok" if sound else "silent", "seconds": seconds, "format": "captions.csv"})
    lines = [["file", "caption"], *([f["file"], f["caption"]] for f in files), ["clips/gone.wav", "a missing file"],
             ["clips/no_caption.wav", ""]]
    files += [{"file": "clips/gone.wav", "kind": "missing", "expect": "missing_file", "format": "captions.csv"},
              {"file": "clips/no_caption.wav", "kind": "malformed", "expect": "bad_manifest_row",
               "format": "captions.csv"}]
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(lines)
    write_audio_file(root / "wavcaps" / "fs_1001.flac", duration_s=8.0, seed=seed * 1000 + 3100)
    (root / "wavcaps.json").write_text(json.dumps({"data": [
        {"id": "fs_1001", "caption": "a door knocks several times", "audio": "wavcaps/fs_1001.flac", "duration": 8.0},
        {"id": "fs_1002", "caption": "wind", "wav_path": "wavcaps/fs_1002.flac", "duration": 4.0}]}, indent=1) + "\n")
    files += [{"file": "wavcaps/fs_1001.flac", "kind": "short", "expect": "ok", "format": "wavcaps"},
              {"file": "wavcaps/fs_1002.flac", "kind": "missing", "expect": "missing_file", "format": "wavcaps"}]
    yid = youtube_ids(seed, 1, "audiocaps")[0]
    write_audio_file(root / "audiocaps" / "91139.wav", duration_s=10.0, seed=seed * 1000 + 3200)
    (root / "train.csv").write_text(f"audiocap_id,youtube_id,start_time,caption\n91139,{yid},30,"
                                    f"a man knocks on wood\n", encoding="utf-8")
    files.append({"file": "audiocaps/91139.wav", "kind": "trimmed", "expect": "ok", "format": "audiocaps"})
    return {"layout": "audio", "window_s": DEFAULT_SIGNAL.window_s, "files": files}


def _write_info(video: Path, yid: str, title: str, tags: list[str], categories: list[str], seconds: float,
                fps: int, root: Path) -> str:
    """A yt-dlp style ``{stem}.info.json`` beside the video."""
    info = {
        "id": yid, "title": title, "fulltitle": title, "tags": tags, "categories": categories,
        "duration": int(round(seconds)), "duration_string": f"{int(seconds) // 60}:{int(seconds) % 60:02d}",
        "ext": video.suffix.lstrip("."), "width": 160, "height": 120, "fps": fps,
        "webpage_url": f"https://www.youtube.com/watch?v={yid}", "extractor": "youtube",
        "description": f"Synthetic test video: {title}.",
    }
    sidecar = video.with_name(video.stem + ".info.json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return sidecar.relative_to(root).as_posix()


def _check_target(out: Path) -> None:
    """Only an absent or empty folder, or one holding an earlier sample, may receive a sample."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out} is not empty and holds no {MANIFEST_NAME}: refusing to write sample data into it")


def _clear_previous(out: Path) -> None:
    """Remove exactly what an earlier generation wrote (its manifest lists it); nothing else."""
    manifest = out / MANIFEST_NAME
    if not manifest.exists():
        return
    old = json.loads(manifest.read_text(encoding="utf-8"))
    written = [out / p for p in old.get("written", [])]
    manifest.unlink()
    for p in written:
        if p.is_file() or p.is_symlink():
            p.unlink()
    for d in sorted({q for p in written for q in p.parents if out in q.parents}, key=lambda q: len(q.parts),
                    reverse=True):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def generate(out_dir: str | Path, kind: str = "vggsound", seed: int = 0) -> Path:
    """Write a sample dataset of ``kind`` into ``out_dir`` and return the path of its manifest.

    Files are built in a hidden sibling folder and moved in at the end, so a failed run leaves
    ``out_dir`` as it was. A folder holding anything but an earlier sample is never touched.
    """
    generators = {"vggsound": _generate_vggsound, "youtube": _generate_youtube, "audio": _generate_audio}
    if kind not in generators:
        raise ValueError(f"unknown sample kind {kind!r}: use 'vggsound', 'youtube' or 'audio'")
    out = Path(out_dir)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        body = generators[kind](staging, seed)
        written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        manifest = {"generator": "pipeline.sample", "kind": kind, "seed": seed, **body, "written": written}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _clear_previous(out)
        out.mkdir(exist_ok=True)
        for entry in sorted(staging.iterdir(), key=lambda q: q.name != MANIFEST_NAME):  # manifest last
            if entry.name != MANIFEST_NAME:
                os.replace(entry, out / entry.name)
        os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / MANIFEST_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data/<kind>)")
    add_config_args(parser, SampleConfig)
    args = parser.parse_args(argv)
    cfg = from_args(SampleConfig, args)
    out = args.out or Path("data") / cfg.kind
    t0 = time.perf_counter()
    try:
        manifest_path = generate(out, cfg.kind, cfg.seed)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    items = manifest["rows"] if cfg.kind == "vggsound" else manifest["files"]
    for item in items:
        where = item.get("file") or "(no file)"
        print(f"  {item['kind']:<17} expect {item['expect']:<16} {where}")
    counts: dict[str, int] = {}
    for item in items:
        counts[item["kind"]] = counts.get(item["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"wrote {cfg.kind} sample (seed {cfg.seed}) to {out}: {len(manifest['written'])} files, "
          f"{len(items)} {dict(vggsound='CSV rows', youtube='videos').get(cfg.kind, 'audio entries')} ({summary}) "
          f"in {time.perf_counter() - t0:.1f}s; ground truth in {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
