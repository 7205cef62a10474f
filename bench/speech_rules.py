"""The VAD speech filter against the zero-shot CLAP speech rule, on the same windows.

    python bench/speech_rules.py --clap-model PATH [--clips DIR] [--snrs 20,10,0,-5] [--json OUT]
    python bench/speech_rules.py --ledger OUT/ledger.parquet     # a clean run's stored scores

Windows: each real clip of ``--clips`` (10 s) as it is and with espeak-ng speech mixed in from 1 s
at each ``--snrs`` level (speech power over the clip's power), or every scored row of a clean
``--ledger`` (its ``speech_share``/``speech_run_s`` and ``speech_score``/``event_score`` columns).
For every window it prints the VAD's voiced share, longest run and verdict (the clean defaults:
speech when share > 0.5 or a run > 4 s) next to the CLAP speech score, event score and verdict
(speech when the speech prompts beat the event score by ``--speech-music-margin`` and reach
``--speech-music-min``), then the agreement and the 2x2 confusion per condition and overall.

The CLAP side means something only with the released LAION-CLAP weights (``--clap-model`` a
local folder or a cached hub id). A model that is not the released architecture (the tiny
random-weight models tests build) is refused unless ``--allow-random-weights``, and then every
CLAP figure is labelled meaningless. ``--clap-model none`` prints the VAD side only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.decode import DecodeRequest, decode  # noqa: E402
from filters.clap import CLAP_SAMPLE_RATE, ClapConfig, ClapScorer  # noqa: E402
from filters.curation import VAD_SAMPLE_RATE, CurationConfig, CurationFilters, SpeechDetector  # noqa: E402
from filters.curation import curation_reasons  # noqa: E402
from filters.speech_music import SPEECH, SpeechMusicConfig, embed_prompts, verdicts  # noqa: E402

CLIPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "vggsound" / "video"
SENTENCE = ("Hello everyone and welcome back to the channel. Today I will show you how to fix a "
            "bicycle tire in less than ten minutes, so let us get started right away.")
WINDOW_S = 10.0
# the released LAION-CLAP (laion/clap-htsat-unfused and -fused): what a real checkpoint's config holds
RELEASED = {"projection_dim": 512, "text_config.hidden_size": 768, "text_config.vocab_size": 50265,
            "audio_config.hidden_size": 768, "audio_config.num_mel_bins": 64, "audio_config.spec_size": 256}
MEANINGLESS = "CLAP FIGURES ARE MEANINGLESS: random weights (--allow-random-weights), not the released LAION-CLAP"


def not_released(config) -> list[str]:
    """How a loaded CLAP model's config differs from the released LAION-CLAP architecture."""
    out = []
    for name, want in RELEASED.items():
        value = config
        for part in name.split("."):
            value = getattr(value, part, None)
        if value != want:
            out.append(f"{name} = {value} (the release has {want})")
    return out


def speech_wave() -> np.ndarray:
    """espeak-ng's reading of SENTENCE, 16 kHz mono."""
    import soundfile as sf
    import soxr

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), SENTENCE], check=True, timeout=60)
        x, sr = sf.read(str(wav), dtype="float32")
    return soxr.resample(x, sr, VAD_SAMPLE_RATE).astype(np.float32)


def mix(background: np.ndarray, speech: np.ndarray, snr_db: float, sr: int, at_s: float = 1.0) -> np.ndarray:
    """Speech from ``at_s`` over ``background`` (same rate ``sr``) at ``snr_db``."""
    out = background.copy()
    start = int(at_s * sr)
    n = min(speech.size, out.size - start)
    gain = np.sqrt(np.mean(background ** 2) / np.mean(speech[:n] ** 2) * 10 ** (snr_db / 10))
    out[start:start + n] += gain * speech[:n]
    return out


def clip_windows(clips: Path, snrs: list[float]) -> list[dict]:
    """Each clip as is and with speech at each SNR: name, condition and its audio at 16 and 48 kHz."""
    import soxr

    speech16 = speech_wave()
    speech48 = soxr.resample(speech16, VAD_SAMPLE_RATE, CLAP_SAMPLE_RATE).astype(np.float32)
    rows = []
    for path in sorted(clips.glob("*.mp4")):
        clip = decode(str(path), DecodeRequest(audio_rates=(VAD_SAMPLE_RATE, CLAP_SAMPLE_RATE), need_video=False))
        a16 = clip.audio[VAD_SAMPLE_RATE][: int(WINDOW_S * VAD_SAMPLE_RATE)]
        a48 = clip.audio[CLAP_SAMPLE_RATE][: int(WINDOW_S * CLAP_SAMPLE_RATE)]
        rows.append({"window": path.stem, "condition": "as is", "a16": a16, "a48": a48})
        for snr in snrs:
            rows.append({"window": path.stem, "condition": f"speech {snr:g} dB",
                         "a16": mix(a16, speech16, snr, VAD_SAMPLE_RATE),
                         "a48": mix(a48, speech48, snr, CLAP_SAMPLE_RATE)})
    return rows


def score_windows(rows: list[dict], scorer: ClapScorer | None, sm: SpeechMusicConfig) -> pd.DataFrame:
    """VAD scores (Silero, the clean defaults) and, with a scorer, CLAP speech and event scores."""
    vad = SpeechDetector(CurationConfig())
    df = pd.DataFrame([{"window": r["window"], "condition": r["condition"], **s}
                       for r, s in zip(rows, vad.scores_batch([r["a16"] for r in rows]))])
    if scorer is not None:
        emb = scorer.audio_embeddings([r["a48"] for r in rows])
        prompts = embed_prompts(scorer, sm)
        df["speech_score"] = (emb @ prompts.speech.T).max(axis=1)
        df["event_score"] = (emb @ prompts.event.T).max(axis=1)
    return df


def decide(df: pd.DataFrame, sm: SpeechMusicConfig) -> pd.DataFrame:
    """Both rules' verdicts on stored scores: ``vad`` and ``clap`` are True for speech (None: no score)."""
    out = df.copy()
    vad = curation_reasons(out, CurationFilters(speech="on", silent="off", static="off"), "") == "speech"
    out["vad"] = vad.astype(object).where(pd.to_numeric(out["speech_share"], errors="coerce").notna(), None)
    out["clap"] = None
    if "speech_score" in out and pd.to_numeric(out["speech_score"], errors="coerce").notna().any():
        clap = verdicts(out["speech_score"], np.full(len(out), np.nan), out["event_score"], sm, kinds=(SPEECH,))
        known = (pd.to_numeric(out["speech_score"], errors="coerce").notna()
                 & pd.to_numeric(out["event_score"], errors="coerce").notna())
        out["clap"] = pd.Series(clap == SPEECH, index=out.index).astype(object).where(known, None)
    return out


def confusion(df: pd.DataFrame) -> dict:
    """Counts of (VAD, CLAP) verdict pairs and the agreement over windows both rules decided."""
    both = df[df["vad"].notna() & df["clap"].notna()]
    pairs = Counter(zip(both["vad"].astype(bool), both["clap"].astype(bool)))
    n = len(both)
    return {"windows": int(len(df)), "vad_speech": int(df["vad"].fillna(False).astype(bool).sum()),
            "decided_by_both": n, "both_speech": pairs[(True, True)], "vad_only": pairs[(True, False)],
            "clap_only": pairs[(False, True)], "neither": pairs[(False, False)],
            "agreement": round((pairs[(True, True)] + pairs[(False, False)]) / n, 4) if n else None}


def report(df: pd.DataFrame, group: str, random_clap: bool) -> dict:
    """Print the per-window table and the confusion per ``group`` value and overall; return them."""
    print(f"{'window':24s} {'condition':>14s} {'VAD share run':>14s} {'VAD':>7s} {'CLAP sp-ev':>11s} {'CLAP':>7s}")
    for r in df.itertuples():
        clap = "-" if r.clap is None else ("speech" if r.clap else "keep")
        sp = "" if pd.isna(getattr(r, "speech_score", np.nan)) else f"{r.speech_score - r.event_score:+.3f}"
        vad = "-" if r.vad is None else ("speech" if r.vad else "keep")
        share = "" if pd.isna(r.speech_share) else f"{r.speech_share:.2f} {r.speech_run_s:4.1f}"
        print(f"{str(r.window)[:24]:24s} {str(getattr(r, group))[:14]:>14s} {share:>14s} {vad:>7s} {sp:>11s} {clap:>7s}")
    tables = {str(k): confusion(g) for k, g in df.groupby(group, sort=False)}
    tables["all"] = confusion(df)
    print(f"\n{group:>14s} windows VAD-speech | both VAD-only CLAP-only neither agreement")
    for k, t in tables.items():
        print(f"{k[:14]:>14s} {t['windows']:7d} {t['vad_speech']:10d} | {t['both_speech']:4d} {t['vad_only']:8d} "
              f"{t['clap_only']:9d} {t['neither']:7d} {t['agreement'] if t['agreement'] is not None else '-':>9}")
    if random_clap:
        print(f"\n{MEANINGLESS}")
    elif tables["all"]["decided_by_both"] == 0:
        print("\nCLAP side not measured: it needs the released LAION-CLAP weights (--clap-model PATH)")
    return tables


class NotReleased(Exception):
    """A CLAP that is not the released LAION-CLAP, passed without --allow-random-weights."""


def _refuse(model: str, problems: list[str]) -> None:
    raise NotReleased(f"error: {model} is not the released LAION-CLAP ({'; '.join(problems)}): its speech scores "
                     f"would mean nothing. Pass the real checkpoint, or --allow-random-weights to run anyway "
                     f"(every CLAP figure is then labelled meaningless)")


def ledger_clap_random(meta: dict, allow: bool) -> bool:
    """Whether the CLAP that scored a ledger was a random test model (refused unless ``allow``)."""
    from transformers import ClapConfig as HFClapConfig

    from core.models import resolve_pretrained

    clap = meta.get("clap") or {}
    if clap.get("clap_skipped", True):
        return False
    model = str(clap.get("clap_model"))
    problems = not_released(HFClapConfig.from_pretrained(str(resolve_pretrained(model).path)))
    if problems and not allow:
        _refuse(model, problems)
    return bool(problems)


def load_scorer(args: argparse.Namespace) -> tuple[ClapScorer | None, bool]:
    """The CLAP scorer (None for --clap-model none) and whether its weights are a random test model."""
    cfg = ClapConfig(model=args.clap_model, device=args.clap_device)
    if not cfg.enabled:
        return None, False
    scorer = ClapScorer(cfg).load()
    problems = not_released(scorer.model.config)
    if problems and not args.allow_random_weights:
        _refuse(args.clap_model, problems)
    return scorer, bool(problems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clap-model", help="released LAION-CLAP folder or cached hub id; 'none': VAD only "
                   "(needed for --clips; a --ledger's run records its own)")
    p.add_argument("--clap-device", default="cpu")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="accept a CLAP that is not the release (its figures are printed as meaningless)")
    p.add_argument("--clips", type=Path, default=CLIPS, help="folder of real clips (*.mp4)")
    p.add_argument("--snrs", default="20,10,0,-5", help="speech-to-clip SNRs (dB) of the espeak-ng mixes")
    p.add_argument("--ledger", type=Path, help="compare on a clean ledger's stored scores instead")
    p.add_argument("--speech-music-margin", type=float, default=SpeechMusicConfig().speech_music_margin)
    p.add_argument("--speech-music-min", type=float, default=SpeechMusicConfig().speech_music_min)
    p.add_argument("--json", type=Path, help="also write the confusion tables here")
    args = p.parse_args(argv)
    try:
        return run(p, args)
    except NotReleased as e:
        print(e, file=sys.stderr)
        return 2


def run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    sm = SpeechMusicConfig(speech_music_margin=args.speech_music_margin, speech_music_min=args.speech_music_min)
    if args.ledger:
        from pipeline.ledger import read_ledger

        ledger, meta = read_ledger(args.ledger)
        random_clap = ledger_clap_random(meta, args.allow_random_weights)
        df = decide(ledger[ledger["status"] != "failed"].rename(columns={"key": "window"}), sm)
        df["condition"] = df["source"].replace("", "ledger")
        tables = report(df, "condition", random_clap)
    else:
        if not args.clap_model:
            p.error("--clap-model PATH (or none) is needed to score the clips")
        scorer, random_clap = load_scorer(args)
        snrs = [float(s) for s in args.snrs.split(",") if s.strip()]
        df = decide(score_windows(clip_windows(args.clips, snrs), scorer, sm), sm)
        tables = report(df, "condition", random_clap)
    if args.json:
        args.json.write_text(json.dumps({"clap_model": getattr(args, "clap_model", None), "random_weights": random_clap,
                                         "meaningless_clap": random_clap, "tables": tables}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
