"""Set-level metrics of ``python -m train.evaluate``: each with its value, model, weights and settings."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from filters.av_align import AVAlignConfig
from filters.clap import ClapConfig
from metrics import cavp as c
from metrics import desync as d
from metrics import pam as p
from metrics.divergence import EPS, inception_score
from metrics.frechet import frechet_distance_of
from metrics.panns import SAMPLE_RATE as PANNS_SR
from metrics.passt import SAMPLE_RATE as PASST_SR
from metrics.vggish import SAMPLE_RATE as VGGISH_SR
from train.config import EvalConfig
from train.eval_models import Models

MODES = ("reference", "fast")
VGGISH_MODEL = "VGGish (torchvggish vggish-10086976)"
# the two classifiers: model name, label, rate, what the FD features and the KL/IS logits are
CLASSIFIERS = {
    "panns": ("PANNs CNN14 16 kHz (Cnn14_16k_mAP=0.438)", "PANNs", PANNS_SR, "fc1 after ReLU (2048-d)",
              "fc_audioset (527)"),
    "passt": ("PaSST-S 32 kHz (passt-s-f128-p16-s10-ap.476-swa)", "PaSST", PASST_SR,
              "(cls + dist) / 2 after the final norm (768-d); input made exactly 10 s", "head (527)")}


def _metric(value, n: int, model: str, sha256, settings: dict, reason: str = "") -> dict:
    return {"value": value, "n": n, "model": model, "weights_sha256": sha256, "settings": settings,
            **({"reason": reason} if value is None else {})}


def _mean_of(rows: list[dict], key: str) -> tuple[float | None, int]:
    vals = [r[key] for r in rows if isinstance(r.get(key), float)]
    return (float(np.mean(vals)) if vals else None), len(vals)


def classifier_metrics(cfg: EvalConfig, models: Models, rows, gen_feats, ref_feats, attr: str) -> dict:
    """FD, KL (means over pairs) and IS with one classifier (PANNs or PaSST), each fully described."""
    name, label, rate, features, logits_of = CLASSIFIERS[attr]
    model = name + (" RANDOM WEIGHTS" if label in models.random else "")
    sha = models.sha256.get(attr)
    front = _front(cfg, rate)
    out = {}
    gen = _stack([f[attr][0][None] for f in gen_feats.values() if attr in f])
    ref = _stack([f[attr][0][None] for f in ref_feats.values() if attr in f])
    if len(gen) >= 2 and len(ref) >= 2:
        out[f"fd_{attr}"] = _metric(frechet_distance_of(gen, ref), len(gen), model, sha,
                                    {**front, "features": features, "reference_clips": len(ref)})
    else:
        out[f"fd_{attr}"] = _metric(None, len(gen), model, sha, front,
                                    "FD needs >= 2 generated and >= 2 reference clips (--reference)")
    for kind in ("softmax", "sigmoid"):
        value, n = _mean_of(rows, f"kl_{kind}_{attr}")
        out[f"kl_{kind}_{attr}"] = _metric(value, n, model, sha, {**front, "direction": "KL(reference || generated)",
                                                                  "eps": EPS, "mean": "over pairs"},
                                           "" if n else "KL needs generated and reference clips of the same name")
    logits = _stack([f[attr][1][None] for f in gen_feats.values() if attr in f])
    settings = {**front, "splits": cfg.is_splits, "shuffle_seed": 2020, "logits": logits_of}
    if len(logits) >= cfg.is_splits:
        mean, std = inception_score(logits, cfg.is_splits)
        out[f"is_{attr}"] = _metric(mean, len(logits), model, sha, {**settings, "std": std})
    else:
        out[f"is_{attr}"] = _metric(None, len(logits), model, sha, settings,
                                    f"IS needs at least --is-splits={cfg.is_splits} generated clips")
    return out


def _front(cfg: EvalConfig, rate: int) -> dict:
    return {"sample_rate": rate, "mono": "channel mean", "dc": "mean removed", "resampler": "soxr HQ",
            "seconds": cfg.audio_length_s or "whole file"}


def vggish_metrics(cfg: EvalConfig, models: Models, gen_feats, ref_feats) -> dict:
    """FAD: the Frechet distance of all 0.96 s VGGish examples of the generated and the reference clips."""
    model = VGGISH_MODEL + (" RANDOM WEIGHTS" if "VGGish" in models.random else "")
    gen = _stack([f["vggish"] for f in gen_feats.values() if "vggish" in f])
    ref = _stack([f["vggish"] for f in ref_feats.values() if "vggish" in f])
    settings = {**_front(cfg, VGGISH_SR), "features": "128-d, no PCA, no final ReLU, one per 0.96 s example",
                "generated_examples": len(gen), "reference_examples": len(ref)}
    if len(gen) >= 2 and len(ref) >= 2:
        value, reason = frechet_distance_of(gen, ref), ""
    else:
        value, reason = None, "FAD needs >= 2 VGGish examples (0.96 s each) on both sides (--reference)"
    return {"fad_vggish": _metric(value, sum("vggish" in f for f in gen_feats.values()), model,
                                  models.sha256.get("vggish"), settings, reason)}


SYNCHFORMER_MODEL = "Synchformer (AudioSet 24-01-04T16-39-21, MMAudio synchformer_state_dict.pth)"


def desync_metrics(rows, models: Models) -> dict:
    """DeSync: the mean over clips of each clip's mean |offset| (s) of its first and last 4.8 s."""
    value, n = _mean_of(rows, "desync")
    model = SYNCHFORMER_MODEL + (" RANDOM WEIGHTS" if "Synchformer" in models.random else "")
    settings = {"fps": d.FPS, "frames": "FFmpeg fps filter's pick (nearest)", "image_size": d.IMAGE_SIZE, "resize": "short side, bicubic antialiased, centre crop",
                "normalise": "mean 0.5, std 0.5", "sample_rate": d.SAMPLE_RATE, "resampler": "torchaudio kernel",
                "mel": {"n_fft": d.N_FFT, "win_length": d.WIN, "hop_length": d.HOP, "n_mels": 128, "scale": "htk",
                        "log_eps": 1e-6, "frames": 66, "mean": d.MEL_MEAN, "std": d.MEL_STD},
                "segment_s": 0.64, "step_s": 0.32, "seconds": d.DURATION_S, "windows": "first and last 14 segments",
                "grid_s": [-2.0, 2.0, 21], "unit": "seconds, |offset|"}
    return {"desync": _metric(value, n, model, models.sha256.get("desync"), settings,
                              "no clip could be scored (needs >= 4.8 s of video and sound)")}


CAVP_MODEL = "Diff-Foley CAVP (cavp_epoch66.ckpt)"


def cavp_metrics(rows, models: Models) -> dict:
    """CAVP score: the mean over clips of each clip's mean cosine of its 0.25 s video and audio embeddings."""
    value, n = _mean_of(rows, "cavp")
    model = CAVP_MODEL + (" RANDOM WEIGHTS" if "CAVP" in models.random else "")
    settings = {"fps": c.FPS, "frames": "FFmpeg fps filter's pick (nearest), no re-encode",
                "image_size": c.IMAGE_SIZE, "resize": "squashed, PIL bilinear", "range": "[0, 1], no normalisation",
                "clip_frames": c.CLIP_FRAMES, "sample_rate": c.SAMPLE_RATE, "resampler": "soxr HQ",
                "seconds": "int(min(video, sound))",
                "mel": {"n_fft": c.N_FFT, "hop_length": c.HOP, "n_mels": c.N_MELS, "fmin": c.F_MIN, "fmax": c.F_MAX,
                        "power": 1, "scale": "slaney (librosa)",
                        "db": "clip((20 log10(max(x, 1e-5)) - 20 + 100) / 100, 0, 1)"},
                "pairing": "one video frame per 16 spectrogram frames, cut to the shorter", "unit": "cosine"}
    return {"cavp": _metric(value, n, model, models.sha256.get("cavp"), settings,
                            "no clip could be scored (needs >= 1 s of video and sound)")}
MSCLAP_MODEL = "MS-CLAP 2023 (CLAP_weights_2023.pth) + GPT-2 tokenizer"


def pam_metrics(rows, models: Models) -> dict:
    """PAM: the mean over clips of each clip's mean positive-prompt probability over its 7 s windows."""
    value, n = _mean_of(rows, "pam")
    model = MSCLAP_MODEL + (" RANDOM WEIGHTS" if "MS-CLAP" in models.random else "")
    settings = {"sample_rate": p.SAMPLE_RATE, "mono": "channel mean", "resampler": "torchaudio kernel",
                "window_s": p.WINDOW_S, "windows": "whole 7 s windows + the last 7 s; shorter clips tiled",
                "prompts": list(p.PROMPTS), "text_len": p.TEXT_LEN, "pad": "'!' (id 0)",
                "scale": models.pam.scale if models.pam else None, "unit": "probability of the clean prompt"}
    return {"pam": _metric(value, n, model, models.sha256.get("pam"), settings,
                           models.pam_reason or "no clip could be scored")}


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 1))


def clip_metrics(rows, models: Models, clap_cfg: ClapConfig) -> dict:
    out = {}
    for mode in MODES:
        value, n = _mean_of(rows, f"av_align_{mode}")
        out[f"av_align_{mode}"] = _metric(value, n, "AV-Align (Yariv et al. 2023), no learned weights", None,
                                          {"mode": mode, **asdict(AVAlignConfig(mode=mode))}, "not computed")
    value, n = _mean_of(rows, "clap")
    clap = models.clap
    out["clap"] = _metric(value, n, clap_cfg.model, clap.resolved.weight_hashes() if clap and clap.resolved else None,
                          clap.metadata() if clap else {"model": clap_cfg.model},
                          models.clap_reason or "no clip could be scored")
    return out


def table(metrics: dict) -> str:
    lines = [f"{'metric':20s} {'value':>10s} {'n':>5s}  model"]
    for name, m in metrics.items():
        value = f"{m['value']:.4f}" if m["value"] is not None else "-"
        lines.append(f"{name:20s} {value:>10s} {m['n']:>5d}  {m['model']}" + (f"  ({m['reason']})"
                                                                              if m["value"] is None else ""))
    return "\n".join(lines)
