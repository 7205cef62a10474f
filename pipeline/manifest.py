"""Manifests: turn a dataset folder into rows, one per input item, nothing dropped silently.

Every CSV line (VGGSound) or every window of every video (YouTube) becomes exactly one row.
Problems found here (malformed line, missing file, duplicate id, test-split leak) become rows
with their status already decided, so counts always reconcile with the input.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterator

from core import storage
from core.cli_config import check_count, check_finite
from core.config import SignalConfig
from core.decode import DecodeError, probe
from core.keys import make_key, sanitize
from core.stage import FAILED, FILTERED, PENDING, Row

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov")
_YTDLP_ID_SUFFIX = re.compile(r"\[([A-Za-z0-9_-]{11})\]$")


@dataclass(frozen=True)
class WindowConfig:
    """How long videos (YouTube corpus) are cut into windows."""

    stride_s: int = field(default=10, metadata={"help": "seconds between window starts (integer)"})
    min_last_window_s: float = field(
        default=5.0, metadata={"help": "keep a shorter final window when at least this long"}
    )

    def __post_init__(self):
        check_count("stride_s", self.stride_s, minimum=1)
        check_finite("min_last_window_s", self.min_last_window_s, lo=0.0)


def _row(**values) -> Row:
    base: Row = {"source": "", "youtube_id": "", "video_path": "", "label": "", "caption": "", "split": "",
                 "start_s": 0.0, "duration_s": None, "status": PENDING, "reason": "", "line": None}
    base.update(values)
    return base


def load_excluded_ids(path: str | Path) -> set[str]:
    """YouTube ids that must never enter a corpus: a VGGSound CSV (its test split) or one id a line."""
    ids: set[str] = set()
    with storage.open_file(path, "r", newline="", encoding="utf-8-sig", errors="replace") as f:
        for _, fields in csv_records(f):
            if isinstance(fields, str) or not fields or not fields[0].strip() or fields[0].startswith("#"):
                continue
            if len(fields) >= 4:
                if fields[-1].strip() == "test":
                    ids.add(fields[0].strip())
            else:
                ids.add(fields[0].strip())
    return ids


def _apply_exclusion(row: Row, excluded: set[str]) -> Row:
    if row["status"] == PENDING and row["youtube_id"] in excluded:
        row["status"], row["reason"] = FILTERED, "test_leak"
    return row


def _index_videos(video_dir: str) -> dict[str, str]:
    """Stem -> path (or URL) for every clip in the folder (one listing instead of 200k stat calls)."""
    index: dict[str, str] = {}
    for path in storage.list_files(video_dir):
        stem, ext = os.path.splitext(storage.basename(path))
        if ext.lower() in VIDEO_EXTENSIONS and (stem not in index or ext.lower() == ".mp4"):
            index[stem] = path
    return index


# the csv module refuses longer fields; such a line is one bad row, never the end of the run
MAX_FIELD_CHARS = 131072
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
_INTEGER = re.compile(r"\+?[0-9]+")


def csv_records(f) -> Iterator[tuple[int, list[str] | str]]:
    """``(physical line, fields)`` for every record of an open CSV, or ``(line, problem)`` for a record
    the csv module cannot parse. The line is where the record starts, also after multi-line labels."""
    reader = csv.reader(f)
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield line, f"unparseable CSV record ({e})"
            continue
        yield line, fields


def _check_text(fields: list[str]) -> str:
    """What makes a record's text unusable (bytes that are not UTF-8, an oversized field), or ""."""
    for i, text in enumerate(fields, start=1):
        if _UNDECODABLE.search(text):
            return f"field {i} is not valid UTF-8"
        if len(text) > MAX_FIELD_CHARS:
            return f"field {i} is {len(text)} characters long (limit {MAX_FIELD_CHARS})"
    return ""


def vggsound_rows(csv_path: str | Path, video_dir: str | Path, signal: SignalConfig = SignalConfig(),
                  excluded: set[str] = frozenset(), caption_template: str = "{label}") -> list[Row]:
    """Rows for the official headerless ``youtube_id,start_seconds,label,split`` CSV.

    The CSV and the clips may be local or object-storage URLs (``s3://...``); URLs stay URLs.
    Every record becomes one row, whatever its bytes: a record that cannot be used is a failed
    ``bad_csv_row`` with its physical line number. A UTF-8 byte-order mark is skipped.
    """
    videos = _index_videos(str(video_dir))
    rows: list[Row] = []
    seen: set[str] = set()
    with storage.open_file(csv_path, "r", newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, fields in csv_records(f):
            if isinstance(fields, list) and (not fields or all(not x.strip() for x in fields)):
                continue
            parsed = fields if isinstance(fields, str) else (_check_text(fields) or _parse_vggsound_fields(fields))
            if isinstance(parsed, str):
                rows.append(_row(key=make_key("vggsound", "badrow", f"L{line_no:06d}"), source="vggsound",
                                 status=FAILED, reason=f"bad_csv_row: {parsed}", line=line_no))
                continue
            rows.append(_apply_exclusion(_clip_row(parsed, line_no, videos, str(video_dir), signal, seen,
                                                   caption_template), excluded))
    return rows


def _clip_row(parsed: tuple[str, int, str, str], line_no: int, videos: dict[str, str], video_dir: str,
              signal: SignalConfig, seen: set[str], caption_template: str) -> Row:
    yid, start, label, split = parsed
    key = make_key("vggsound", yid, f"{start:06d}")
    row = _row(key=key, source="vggsound", youtube_id=yid, label=label,
               caption=caption_template.format(label=label), split=split,
               start_s=float(start), duration_s=signal.window_s, line=line_no)
    if key in seen:
        row.update(key=make_key(key, f"dupL{line_no:06d}"), status=FAILED,
                   reason=f"duplicate_id: {yid} {start} repeats an earlier line")
        return row
    seen.add(key)
    path = videos.get(f"{yid}_{start:06d}")
    if path is None:
        expected = storage.join(video_dir, f"{yid}_{start:06d}.mp4")
        row.update(status=FAILED, reason=f"missing_file: {expected}", video_path=expected)
    else:
        row["video_path"] = str(path)
    return row


def parse_start(text: str) -> int | str:
    """A start time in whole seconds, parsed exactly (no float rounding of long digit strings);
    or a description of why it is not one (NaN, infinities, 1e400, fractions, negatives)."""
    if _INTEGER.fullmatch(text):
        return int(text)
    try:
        value = Decimal(text)
    except InvalidOperation:
        return f"start_seconds {text[:40]!r} is not a number"
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        return f"start_seconds {text[:40]!r} is not a non-negative integer"
    if value.adjusted() > 12:  # 1e400 is an integer, but no video is 10^12 s long
        return f"start_seconds {text[:40]!r} is out of range"
    return int(value)


def _parse_vggsound_fields(fields: list[str]) -> tuple[str, int, str, str] | str:
    """Validate one CSV record; return the parsed tuple or a description of what is wrong."""
    if len(fields) < 4:
        return f"expected 4 fields (youtube_id,start_seconds,label,split), got {len(fields)}"
    # an unquoted label with commas splits into extra fields: the first two and the last are fixed
    yid, start_text, split = fields[0].strip(), fields[1].strip(), fields[-1].strip()
    label = ",".join(fields[2:-1]).strip()
    if not yid or sanitize(yid) != yid:
        return f"youtube_id {yid[:40]!r} has characters outside [A-Za-z0-9_-]"
    start = parse_start(start_text)
    if isinstance(start, str):
        return start
    if not label:
        return "empty label"
    if split not in ("train", "test"):
        return f"split {split[:40]!r} is not train or test"
    return yid, start, label, split


def _stem(video: str) -> str:
    return os.path.splitext(storage.basename(video))[0]


def _youtube_id_for(video: str, info: dict) -> str:
    if isinstance(info.get("id"), str) and info["id"]:
        return sanitize(info["id"])
    m = _YTDLP_ID_SUFFIX.search(_stem(video))
    if m:
        return m.group(1)
    return sanitize(_stem(video))


def _caption_from_info(info: dict) -> str:
    title = str(info.get("title") or "").strip()
    tags = [str(t) for t in (info.get("tags") or [])][:8]
    if title and tags:
        return f"{title} ({', '.join(tags)})"
    return title or ", ".join(tags)


def _read_info(video: str, files: set[str]) -> dict:
    """The yt-dlp sidecar, if any. A broken sidecar only costs the caption, never the video."""
    sidecar = os.path.splitext(video)[0] + ".info.json"
    if sidecar not in files:
        return {}
    try:
        data = json.loads((storage.read_bytes(sidecar) or b"").decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def windows_for(duration_s: float, signal: SignalConfig, windows: WindowConfig) -> list[tuple[float, float]]:
    """``(start, length)`` windows of a video; a video shorter than one window gives one short window."""
    if duration_s <= signal.window_s:
        return [(0.0, duration_s)]
    out = []
    start = 0
    while start + signal.window_s <= duration_s + 1e-6:
        out.append((float(start), signal.window_s))
        start += windows.stride_s
    rest = duration_s - start
    if start < duration_s and rest >= windows.min_last_window_s and (not out or start >= out[-1][0] + signal.window_s):
        out.append((float(start), rest))
    return out


def youtube_rows(root: str | Path, signal: SignalConfig = SignalConfig(), windows: WindowConfig = WindowConfig(),
                 excluded: set[str] = frozenset()) -> list[Row]:
    """Rows for every window of every video below ``root`` (local or a URL; the window list is part
    of the manifest)."""
    files = storage.list_files(root, recursive=True)
    videos = [p for p in files if os.path.splitext(p)[1].lower() in VIDEO_EXTENSIONS]
    listed = set(files)
    rows: list[Row] = []
    seen: set[str] = set()
    for video in videos:
        info = _read_info(video, listed)
        yid = _youtube_id_for(video, info)
        caption = _caption_from_info(info)
        common = dict(source="youtube", youtube_id=yid, video_path=video, caption=caption,
                      label="", split="train")
        try:
            facts = probe(video)
        except DecodeError as e:
            key = make_key("youtube", yid, "000000")
            rows.append(_row(key=key if key not in seen else make_key(key, sanitize(storage.basename(video))), **common,
                             status=FAILED, reason=e.ledger_reason))
            seen.add(rows[-1]["key"])
            continue
        for start, length in windows_for(facts.duration_s, signal, windows):
            key = make_key("youtube", yid, f"{int(start):06d}")
            row = _row(key=key, **common, start_s=start, duration_s=length)
            if key in seen:
                row.update(key=make_key(key, sanitize(storage.basename(video))), status=FAILED,
                           reason=f"duplicate_id: {yid} window {int(start)} already taken by another file")
            seen.add(row["key"])
            rows.append(_apply_exclusion(row, excluded))
    return rows


# ---- audio-only corpora (WavCaps, AudioCaps, a plain captions.csv) ---------------------------

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
AUDIOCAPS_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
AUDIOCAPS_SPLITS = {"train.csv": "train", "val.csv": "test", "test.csv": "test"}
PLAIN_CAPTIONS = "captions.csv"


@dataclass(frozen=True)
class AudioItem:
    """One captioned audio file of a caption manifest, before windowing; ``problem`` marks a bad entry."""

    ident: str
    path: str  # resolved file, or "" when it could not be found
    caption: str
    split: str = "train"
    youtube_id: str = ""
    start_s: float | None = None  # AudioCaps: where the clip starts in an untrimmed file
    line: int | None = None
    where: str = ""  # manifest name + line/entry, for messages
    problem: str = ""  # bad_manifest_row / missing_file detail


def _index_audio(root: str) -> tuple[dict[str, str], set[str]]:
    """Stem -> path of every audio file below ``root`` ("" for a stem several files share), and all paths."""
    files = sorted(p for p in storage.list_files(root, recursive=True)
                   if os.path.splitext(p)[1].lower() in AUDIO_EXTENSIONS)
    index: dict[str, str] = {}
    for path in files:
        stem = os.path.splitext(storage.basename(path))[0]
        index[stem] = "" if stem in index else path  # never guess which of two files a caption meant
    return index, set(files)


def _by_stem(stems: dict[str, str], names: list[str]) -> tuple[str, int, str]:
    """``(path, which name matched, problem)`` for the first of ``names`` that names a file below the root."""
    for i, name in enumerate(names):
        if name in stems:
            if not stems[name]:
                return "", i, f"bad_manifest_row: several audio files below the root are named {name!r}"
            return stems[name], i, ""
    return "", -1, ""


def _resolve_audio(root: str, name: str, files: set[str]) -> str:
    """A manifest's file reference, absolute or relative to the root; "" unless it is an audio file below
    the root (a path that leaves the root, such as ``../x.wav``, is never opened)."""
    if not name:
        return ""
    candidates = [name] if os.path.isabs(name) or storage.is_url(name) else []
    candidates.append(storage.join(root, name.lstrip("/")))
    for c in candidates:
        c = c if storage.is_url(c) else os.path.normpath(c)
        if c in files:
            return str(c)
    return ""


def _bad(where: str, line: int | None, ident: str, detail: str) -> AudioItem:
    return AudioItem(ident=ident, path="", caption="", line=line, where=where, problem=f"bad_manifest_row: {detail}")


def _caption_problem(caption: object) -> str:
    if not isinstance(caption, str) or not caption.strip():
        return "empty caption"
    return _check_text([caption])


def wavcaps_items(path: str, root: str, stems: dict[str, str], files: set[str]) -> list[AudioItem]:
    """Entries of a WavCaps JSON ``{"data": [{"id", "caption", "audio" | "wav_path", "duration"}]}``."""
    name = storage.basename(path)
    try:
        data = json.loads((storage.read_bytes(path) or b"").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [_bad(name, None, sanitize(name), f"{name} is not JSON ({e})")]
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return [_bad(name, None, sanitize(name), f'{name} has no "data" list')]
    items = []
    for i, entry in enumerate(entries, start=1):
        where = f"{name} entry {i}"
        if not isinstance(entry, dict) or not str(entry.get("id") or "").strip():
            items.append(_bad(where, i, f"{sanitize(name)}-E{i:06d}", "entry is not an object with an id"))
            continue
        ident = str(entry["id"]).strip()
        problem = _caption_problem(entry.get("caption"))
        if problem:
            items.append(_bad(where, i, ident, problem))
            continue
        ref = str(entry.get("audio") or entry.get("wav_path") or "")
        found, problem = _resolve_audio(root, ref, files), ""
        if not found:
            found, _, problem = _by_stem(stems, [os.path.splitext(storage.basename(ref))[0] or ident, ident])
        items.append(AudioItem(ident=ident, path=found, caption=entry["caption"].strip(), line=i, where=where,
                               problem="" if found else problem or
                               f"missing_file: {storage.join(root, ref) if ref else ident}"))
    return items


def _csv_dicts(path: str) -> Iterator[tuple[int, list[str], list[str] | str]]:
    """``(line, header, fields or problem)`` for every record after a CSV's header line."""
    with storage.open_file(path, "r", newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        records = csv_records(f)
        header = next((fields for _, fields in records if isinstance(fields, list) and fields), None)
        if header is None:
            return
        header = [h.strip() for h in header]
        for line, fields in records:
            if isinstance(fields, list) and not any(x.strip() for x in fields):
                continue
            yield line, header, fields


def _csv_record(header: list[str], fields: list[str] | str) -> dict[str, str] | str:
    if isinstance(fields, str):
        return fields
    problem = _check_text(fields)
    if problem:
        return problem
    if len(fields) != len(header):
        return f"expected {len(header)} fields ({','.join(header)}), got {len(fields)}"
    return {h: v.strip() for h, v in zip(header, fields)}


def audiocaps_items(path: str, split: str, stems: dict[str, str]) -> list[AudioItem]:
    """Rows of an AudioCaps CSV (``audiocap_id,youtube_id,start_time,caption``). A row's file is found
    as ``{audiocap_id}``, ``{youtube_id}_{start_time}`` (trimmed clips) or ``[Y]{youtube_id}`` (untrimmed)."""
    name = storage.basename(path)
    items = []
    for line, header, fields in _csv_dicts(path):
        where = f"{name} line {line}"
        rec = _csv_record(header, fields)
        if isinstance(rec, dict) and not rec.get("audiocap_id"):
            rec = "empty audiocap_id"
        if isinstance(rec, str):
            items.append(_bad(where, line, f"{sanitize(name)}-L{line:06d}", rec))
            continue
        start = parse_start(rec["start_time"])
        problem = start if isinstance(start, str) else _caption_problem(rec["caption"])
        if problem:
            items.append(_bad(where, line, rec["audiocap_id"], problem))
            continue
        yid = rec["youtube_id"]
        found, which, problem = _by_stem(stems, [rec["audiocap_id"], f"{yid}_{start}", f"{yid}_{start:06d}",
                                                 f"Y{yid}", yid])
        trimmed = 0 <= which < 3  # the first three names are trimmed clips, used whole
        items.append(AudioItem(ident=rec["audiocap_id"], path=found, caption=rec["caption"], split=split,
                               youtube_id=sanitize(yid), start_s=None if trimmed else float(start), line=line,
                               where=where, problem="" if found else problem or
                               f"missing_file: no audio named {rec['audiocap_id']}, {yid}_{start} or {yid}"))
    return items


def plain_caption_items(path: str, root: str, files: set[str]) -> list[AudioItem]:
    """Rows of ``captions.csv`` with the header ``file,caption`` (optional ``split``); paths relative to the root."""
    items = []
    for line, header, fields in _csv_dicts(path):
        where = f"{PLAIN_CAPTIONS} line {line}"
        rec = _csv_record(header, fields)
        if isinstance(rec, dict) and not {"file", "caption"} <= set(rec):
            rec = f"header must name file and caption, not {','.join(header)}"
        if isinstance(rec, dict) and rec.get("split", "train") not in ("train", "test"):
            rec = f"split {rec['split'][:40]!r} is not train or test"
        problem = rec if isinstance(rec, str) else (_caption_problem(rec["caption"]) or
                                                     ("" if rec["file"] else "empty file name"))
        if problem:
            items.append(_bad(where, line, f"captions-L{line:06d}", problem))
            continue
        found = _resolve_audio(root, rec["file"], files)
        items.append(AudioItem(ident=os.path.splitext(rec["file"])[0], path=found, caption=rec["caption"],
                               split=rec.get("split") or "train", line=line, where=where,
                               problem="" if found else f"missing_file: {storage.join(root, rec['file'])}"))
    return items


def caption_manifests(root: str) -> list[tuple[str, str]]:
    """``(kind, path)`` of every caption manifest at the top of ``root``: captions.csv, AudioCaps's
    train/val/test.csv (recognised by their header), WavCaps JSON files."""
    found = []
    for path in sorted(storage.list_files(root)):
        name = storage.basename(path)
        if name == PLAIN_CAPTIONS:
            found.append(("plain", path))
        elif name in AUDIOCAPS_SPLITS:
            header = next((h for _, h, _ in _csv_dicts(path)), None)
            if header == AUDIOCAPS_HEADER:
                found.append(("audiocaps", path))
        elif name.endswith(".json") and not name.endswith(".info.json") and name != "sample_manifest.json":
            found.append(("wavcaps", path))
    return found


def audio_items(root: str) -> list[AudioItem]:
    manifests = caption_manifests(root)
    if not manifests:
        raise ValueError(f"{root} has no caption manifest: captions.csv (file,caption), AudioCaps "
                         f"train/val/test.csv ({','.join(AUDIOCAPS_HEADER)}) or a WavCaps JSON")
    stems, files = _index_audio(root)
    items: list[AudioItem] = []
    for kind, path in manifests:
        if kind == "plain":
            items += plain_caption_items(path, root, files)
        elif kind == "audiocaps":
            items += audiocaps_items(path, AUDIOCAPS_SPLITS[storage.basename(path)], stems)
        else:
            items += wavcaps_items(path, root, stems, files)
    return items


def _audio_windows(item: AudioItem, duration_s: float, signal: SignalConfig,
                   windows: WindowConfig) -> list[tuple[float, float]]:
    """An AudioCaps row in an untrimmed file is its one window; every other file is cut like a long video."""
    if item.start_s is not None and duration_s > signal.window_s + 1.0 and item.start_s < duration_s:
        return [(item.start_s, min(signal.window_s, duration_s - item.start_s))]
    return windows_for(duration_s, signal, windows)


def audio_rows(root: str | Path, signal: SignalConfig = SignalConfig(), windows: WindowConfig = WindowConfig(),
               excluded: set[str] = frozenset()) -> list[Row]:
    """Rows for every window of every captioned audio file below ``root``; bad entries are rows too.

    Each window is scored against its own caption (the caption is the CLAP prompt). The file's path
    is kept in ``video_path``, the ledger's one media-path column.
    """
    rows: list[Row] = []
    seen: set[str] = set()
    for item in audio_items(str(root)):
        common = dict(source="audio", youtube_id=item.youtube_id, video_path=item.path, caption=item.caption,
                      split=item.split, line=item.line)
        base = make_key("audio", sanitize(item.ident))
        if item.problem:
            key = make_key(base, "bad", f"L{item.line or 0:06d}") if base in seen else base
            seen.add(key)
            rows.append(_row(key=key, **common, status=FAILED, reason=f"{item.problem} ({item.where})"))
            continue
        try:
            spans = _audio_windows(item, probe(item.path).duration_s, signal, windows)
        except DecodeError as e:
            spans, reason = [(0.0, None)], e.ledger_reason
        else:
            reason = ""
        for start, length in spans:
            key = make_key(base, f"{int(start):06d}")
            row = _row(key=key, **common, start_s=start, duration_s=length)
            if reason:
                row.update(status=FAILED, reason=reason)
            if key in seen:
                row.update(key=make_key(key, f"dupL{item.line or 0:06d}"), status=FAILED,
                           reason=f"duplicate_id: {item.ident} window {int(start)} repeats an earlier entry "
                                  f"({item.where})")
            seen.add(row["key"])
            rows.append(_apply_exclusion(row, excluded))
    return rows
