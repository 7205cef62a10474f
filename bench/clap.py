"""Benchmark: CLAP stage throughput against decode time per clip, measured in the same run.

The model is the full-size ``laion/clap-htsat-unfused`` architecture (LAION 630k-audioset-best:
HTSAT-tiny audio tower, RoBERTa-base text tower, 512-d projections) built from its config with
random weights: the same compute as the real checkpoint, nothing downloaded. Clips are the real
VGGSound test clips, decoded by ``core.decode`` at 48 kHz; the CLAP stage is timed through
``filters.clap.ClapScorer``, the code the clean stage runs.

    .venv/bin/python bench/clap.py [--clips 16] [--batch-size 8] [--device auto] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from clap_fixture import write_byte_bpe_tokenizer  # noqa: E402
from transformers import ClapConfig as HFClapConfig  # noqa: E402
from transformers import ClapFeatureExtractor, ClapModel  # noqa: E402

from core.device import resolve_device  # noqa: E402
from filters.clap import CLAP_SAMPLE_RATE, ClapConfig, ClapScorer  # noqa: E402
from core.decode import DecodeRequest, decode  # noqa: E402

CLIPS = ROOT / "tests" / "data" / "vggsound" / "video"
LABELS = ["playing acoustic guitar", "playing drum kit", "playing squash", "playing badminton", "dog barking"]

# laion/clap-htsat-unfused config.json. transformers converted the checkpoint with ``ClapConfig()``
# plus ``audio_config.enable_fusion = False`` (convert_clap_original_pytorch_to_hf.py, HTSAT-tiny),
# so these are transformers' ClapConfig defaults written out; ``check_config`` verifies that.
UNFUSED_CONFIG = {
    "projection_dim": 512,
    "projection_hidden_act": "relu",
    "logit_scale_init_value": 1 / 0.07,
    "text_config": {  # RoBERTa-base
        "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514,
        "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    },
    "audio_config": {  # HTSAT-tiny (Swin): 96-d patches, depths 2-2-6-2, 256x256 spectrogram image
        "window_size": 8, "num_mel_bins": 64, "spec_size": 256, "patch_size": 4, "patch_stride": [4, 4],
        "num_classes": 527, "hidden_size": 768, "depths": [2, 2, 6, 2], "num_attention_heads": [4, 8, 16, 32],
        "enable_fusion": False, "fusion_type": None, "patch_embed_input_channels": 1,
        "flatten_patch_embeds": True, "patch_embeds_hidden_size": 96, "enable_patch_layer_norm": True,
        "mlp_ratio": 4.0, "qkv_bias": True, "aff_block_r": 4,
    },
}
# its preprocessor_config.json: 48 kHz, 10 s, 64 mel bins 50-14000 Hz, hop 480, n_fft 1024
UNFUSED_FEATURES = {
    "feature_size": 64, "sampling_rate": 48000, "hop_length": 480, "max_length_s": 10, "fft_window_size": 1024,
    "frequency_min": 50, "frequency_max": 14000, "padding": "repeatpad", "truncation": "rand_trunc",
}


def check_config(config: HFClapConfig) -> list[str]:
    """Differences between the written-out config and transformers' ClapConfig defaults (expected: none)."""
    default = HFClapConfig()
    diffs = []
    for part in ("text_config", "audio_config"):
        ours, ref = getattr(config, part).to_dict(), getattr(default, part).to_dict()
        for key in sorted(set(UNFUSED_CONFIG[part])):
            want = ref.get(key)
            if key == "enable_fusion":
                want = False
            if _norm(ours.get(key)) != _norm(want):
                diffs.append(f"{part}.{key}: {ours.get(key)!r} != default {want!r}")
    for key in ("projection_dim", "projection_hidden_act", "logit_scale_init_value"):
        if _norm(getattr(config, key)) != _norm(getattr(default, key)):
            diffs.append(f"{key}: {getattr(config, key)!r} != default {getattr(default, key)!r}")
    return diffs


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _per_clip(fn, items, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return (time.perf_counter() - start) / (repeat * len(items))


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16, help="clips through the CLAP stage (real clips, cycled)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--decode-repeat", type=int, default=2, help="decode every real clip this many times")
    ap.add_argument("--gray-max-side", type=int, default=160,
                    help="grey frame size of the second decode baseline (audio + every frame, as AV-Align needs)")
    return ap.parse_args()


def _random_scorer(batch_size: int, device: str) -> tuple[ClapScorer, dict]:
    """The unfused LAION architecture with random weights, and what to say about it."""
    config = HFClapConfig(**UNFUSED_CONFIG)
    diffs = check_config(config)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = ClapModel(config).eval()
    build_s = time.perf_counter() - t0
    n_audio = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("audio_model", "audio_projection")))
    n_text = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("text_model", "text_projection")))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_byte_bpe_tokenizer(Path(tmp))
    cfg = ClapConfig(model="laion/clap-htsat-unfused architecture, random weights", batch_size=batch_size)
    scorer = ClapScorer.from_components(cfg, model, ClapFeatureExtractor(**UNFUSED_FEATURES), tokenizer,
                                        device=device)
    return scorer, {"diffs": diffs, "build_s": build_s, "n_audio": n_audio, "n_text": n_text}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clap_timings(scorer: ClapScorer, decoded: list[np.ndarray], clips: int, batch_size: int,
                  device: str) -> dict[str, float]:
    """Seconds per caption (text tower), per clip (feature extraction alone, the whole CLAP stage)."""
    audios = [decoded[i % len(decoded)] for i in range(clips)]
    labels = [LABELS[i % len(LABELS)] for i in range(clips)]
    scorer.audio_embeddings(audios[:batch_size])  # warm-up batches
    scorer.text_embeddings(["warm-up caption"])
    t0 = time.perf_counter()
    text = scorer.text_embeddings([scorer.caption(label) for label in LABELS])
    text_s = (time.perf_counter() - t0) / len(LABELS)
    features = scorer.feature_extractor
    features_s = _per_clip(lambda a: features([a], sampling_rate=CLAP_SAMPLE_RATE, return_tensors="pt"), audios, 1)
    _sync(device)
    t0 = time.perf_counter()
    scores = scorer.score_labels(scorer.audio_embeddings(audios), labels)
    _sync(device)
    clap_s = (time.perf_counter() - t0) / len(audios)
    assert text.shape[1] == 512 and np.all(np.abs(scores) <= 1.0)
    return {"text": text_s, "features": features_s, "clap": clap_s}


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    scorer, built = _random_scorer(args.batch_size, device)

    paths = sorted(CLIPS.glob("*.mp4"))
    audio_req = DecodeRequest(start_s=0.0, duration_s=10.0, audio_rates=(CLAP_SAMPLE_RATE,), need_video=False)
    full_req = DecodeRequest(start_s=0.0, duration_s=10.0, audio_rates=(CLAP_SAMPLE_RATE, 22050, 16000),
                             gray=True, gray_max_side=args.gray_max_side)
    decoded = [decode(p, audio_req).audio[CLAP_SAMPLE_RATE] for p in paths]  # also warms the caches
    decode_audio_s = _per_clip(lambda p: decode(p, audio_req), paths, args.decode_repeat)
    decode_full_s = _per_clip(lambda p: decode(p, full_req), paths, args.decode_repeat)
    t = _clap_timings(scorer, decoded, args.clips, args.batch_size, device)

    diffs = built["diffs"]
    dev_name = (torch.cuda.get_device_name(0) if device.startswith("cuda")
                else f"cpu ({torch.get_num_threads()} threads)")
    print("CLAP stage benchmark: laion/clap-htsat-unfused architecture, random weights")
    print(f"  config check vs transformers ClapConfig defaults: {'identical' if not diffs else '; '.join(diffs)}")
    print(f"  parameters: audio tower {built['n_audio'] / 1e6:.1f} M, text tower {built['n_text'] / 1e6:.1f} M "
          f"(built in {built['build_s']:.1f} s)")
    print(f"  device: {dev_name}; {args.clips} clips of 10 s at 48 kHz, batch size {args.batch_size}; "
          f"torch {torch.__version__}")
    print(f"  {'stage':<58}{'s/clip':>10}{'clips/s':>10}")
    rows = [
        (f"decode: audio only at 48 kHz ({len(paths)} real clips x {args.decode_repeat})", decode_audio_s),
        (f"decode: audio 48k/22.05k/16k + grey frames <= {args.gray_max_side}px", decode_full_s),
        ("CLAP feature extraction (log-mel, numpy) only", t["features"]),
        ("CLAP stage: log-mel + audio tower + cosine", t["clap"]),
    ]
    for name, sec in rows:
        print(f"  {name:<58}{sec:>10.4f}{1.0 / sec:>10.2f}")
    print(f"  text tower: {t['text']:.4f} s per distinct caption (cached per worker: VGGSound has 309 classes)")
    print(f"  ratio CLAP stage / audio-only decode: {t['clap'] / decode_audio_s:.1f}x")
    print(f"  ratio CLAP stage / audio+frames decode: {t['clap'] / decode_full_s:.1f}x")
    print(f"  dominant: {'CLAP' if t['clap'] > decode_full_s else 'decode'}")


if __name__ == "__main__":
    main()
