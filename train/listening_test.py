"""``python -m train.listening_test build|analyze``: the 1-100 subjective study of the VTA-LDM paper.

``build --system NAME=DIR ... --out STUDY`` muxes every system's sampler output (``CLIP.wav`` +
``CLIP.json``) into its clip's video and writes a self-contained study folder: ``index.html``
(no network, no server: open it from the folder), ``media/`` (one mp4 per system per clip, named
by a random token so neither the file nor the page reveals the system) and ``key.json`` (token ->
system and clip; keep it away from raters). The page asks for a rater name, shows every video
in an order shuffled per rater (seeded by the name, recorded in the answers), with four sliders
1-100 (overall quality, audio quality, semantic alignment, temporal alignment), and saves the
answers as ``answers-RATER.json`` for the rater to send back.

``analyze --study STUDY ANSWERS.json ...`` joins the answers with the key and writes
``results.csv`` (per system and question: mean, 95% confidence interval from Student's t,
ratings) and ``results.png``, and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import secrets
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from core.atomic import atomic_write_text
from train.soundtrack import mux

QUESTIONS = {"overall": "Overall quality", "audio_quality": "Audio quality",
             "semantic": "Semantic alignment (does the sound fit what is seen?)",
             "temporal": "Temporal alignment (do sounds happen when things happen?)"}
PAGE = Path(__file__).with_name("listening_test.html")


def _outputs(folder: Path) -> dict[str, dict]:
    found = {}
    for side in sorted(folder.glob("*.json")):
        meta = json.loads(side.read_text())
        if isinstance(meta, dict) and "video" in meta and side.with_suffix(".wav").is_file():
            found[side.stem] = meta
    return found


def build(systems: dict[str, Path], out: Path) -> dict:
    """Mux every (system, clip) pair into ``out/media`` and write the page and the key."""
    found = {name: _outputs(folder) for name, folder in systems.items()}
    clips = sorted(set.intersection(*(set(f) for f in found.values()))) if found else []
    if not clips:
        raise ValueError("the systems share no clip (CLIP.wav + CLIP.json present in every folder)")
    key, trials = {}, []
    for clip in clips:
        for name, folder in systems.items():
            token = secrets.token_hex(8)
            meta = found[name][clip]
            audio, sr = sf.read(str(folder / f"{clip}.wav"), dtype="float32")
            mux(meta["video"], audio, sr, out / "media" / f"{token}.mp4", float(meta.get("start_s") or 0.0))
            key[token] = {"system": name, "clip": clip}
            trials.append({"id": token, "media": f"media/{token}.mp4"})
    trials.sort(key=lambda t: t["id"])  # the page's list says nothing about systems
    config = {"trials": trials, "questions": QUESTIONS}
    page = PAGE.read_text().replace("/*STUDY*/null", json.dumps(config))
    atomic_write_text(out / "index.html", page)
    atomic_write_text(out / "key.json", json.dumps({"systems": list(systems), "clips": clips, "key": key}, indent=1))
    return {"clips": len(clips), "systems": list(systems), "videos": len(trials), "page": str(out / "index.html")}


def _t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def analyze(study: Path, answer_files: list[Path]) -> list[dict]:
    """Per system and question: mean, 95% CI (Student's t over all ratings), n."""
    key = json.loads((study / "key.json").read_text())
    ratings: dict[tuple[str, str], list[float]] = {}
    for path in answer_files:
        answers = json.loads(Path(path).read_text())
        for trial in answers["trials"]:
            if trial["id"] not in key["key"]:
                raise ValueError(f"{path}: trial {trial['id']} is not in this study's key")
            system = key["key"][trial["id"]]["system"]
            for q in QUESTIONS:
                value = trial["ratings"].get(q)
                if value is not None:
                    if not 1 <= float(value) <= 100:
                        raise ValueError(f"{path}: rating {value} of {q} is outside 1-100")
                    ratings.setdefault((system, q), []).append(float(value))
    rows = []
    for system in key["systems"]:
        for q in QUESTIONS:
            vals = np.asarray(ratings.get((system, q), []))
            half = _t975(len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else float("nan")
            rows.append({"system": system, "question": q, "n": int(len(vals)),
                         "mean": float(vals.mean()) if len(vals) else float("nan"), "ci95": float(half)})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        mine = [r for r in rows if r["system"] == system]
        ax.bar(np.arange(len(QUESTIONS)) + i * width, [r["mean"] for r in mine], width,
               yerr=[r["ci95"] for r in mine], capsize=3, label=system)
    ax.set_xticks(np.arange(len(QUESTIONS)) + width * (len(systems) - 1) / 2, list(QUESTIONS))
    ax.set_ylim(0, 100)
    ax.set_ylabel("mean rating (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.listening_test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the study folder (page, videos, key)")
    b.add_argument("--system", action="append", required=True, metavar="NAME=DIR",
                   help="a system's sampler outputs (repeat for each system)")
    b.add_argument("--out", required=True, type=Path)
    a = sub.add_parser("analyze", help="per-system means with 95%% confidence intervals")
    a.add_argument("--study", required=True, type=Path)
    a.add_argument("answers", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            systems = dict(s.split("=", 1) for s in args.system)
            print(json.dumps(build({k: Path(v) for k, v in systems.items()}, args.out)))
            return 0
        rows = analyze(args.study, args.answers)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["system", "question", "n", "mean", "ci95"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.study / "results.csv", table.getvalue())
    plot(rows, args.study / "results.png")
    for r in rows:
        print(f"{r['system']:16s} {r['question']:14s} {r['mean']:6.1f} +- {r['ci95']:5.1f}  (n={r['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
