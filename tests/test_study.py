"""The paper's data side (docs/study.md): audio pre-training, fine-tuning, shard mixtures, text-to-audio.

Fast tests use hand-built shards (``shards_fixture``); the slow ones run the runbook's audio rows
end to end on the sample data with tiny random models (clean -> encode -> pre-train -> fine-tune
-> text-to-audio) and a 2-rank torchrun on a mixture with the unconditional condition.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards_fixture import TINY_LATENT, VAE_SCALING, make_sample, write_shards

ROOT = Path(__file__).resolve().parents[1]


def write_audio_only_shards(out: Path, counts: dict[str, list[int]], seed: int = 1) -> Path:
    """Shards as ``pipeline.encode`` writes them for an audio-only corpus: no ``clip.npy``."""
    folder = out / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, n = [], 0
    for split, per_shard in counts.items():
        for index, count in enumerate(per_shard):
            name = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(folder / name)) as sink:
                for _ in range(count):
                    sample = make_sample(f"audio-{split}-{n:05d}", n % 2, rng, split=split)
                    del sample["clip.npy"]
                    sink.write(sample)
                    n += 1
            data = (folder / name).read_bytes()
            entries.append({"name": name, "split": split, "count": count, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "index.json").write_text(json.dumps({"shards": entries}))
    (folder / "card.json").write_text(json.dumps({
        "vae_scaling_factor": VAE_SCALING, "clip_model": "tiny-random-clip", "latent_shape": [2, *TINY_LATENT],
        "sample_rate": 16000, "audio_only": True}))
    return folder


@pytest.fixture(scope="module")
def video_set(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("video"), {"train": [20], "test": [4]})


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory) -> Path:
    return write_audio_only_shards(tmp_path_factory.mktemp("audio"), {"train": [5, 3]})


# ---- shard mixtures ---------------------------------------------------------------------------

def test_parse_mixture():
    from shards.sources import ShardSourceError, parse_mixture

    assert parse_mixture("a/b:0.7,s3://bucket/x:.3") == [("a/b", 0.7), ("s3://bucket/x", 0.3)]
    assert parse_mixture("out/shards") is None and parse_mixture("train-{000000..000003}.tar") is None
    for bad in ("a:0.7,b", "a:0,b:1", "a:0.5,a:0.5"):
        with pytest.raises(ShardSourceError):
            parse_mixture(bad)


def _draw_sets(spec: str, n: int, seed: int = 0) -> list[str]:
    """Which set each of the first ``n`` samples of one stream came from (by shard URL)."""
    from shards.sources import find_shards, parse_mixture, split_shards, weighted_shards
    from shards.stream import ResampledMixSource

    shards = []
    for src, weight in parse_mixture(spec):
        shards += weighted_shards(split_shards(find_shards(src)[0], "train"), weight)
    stream = iter(ResampledMixSource(shards, rank=0, seed=seed, mix_shards=2, buffer=8))
    return ["audio" if "/audio" in next(stream)["__url__"] else "video" for _ in range(n)]


def test_mixture_draws_each_set_in_proportion(audio_set, video_set):
    """8 audio samples in two shards, 20 video samples in one: 0.7/0.3 of the samples all the same,
    and the same sequence every time (hashed draws)."""
    spec = f"{audio_set}:0.7,{video_set}:0.3"
    drawn = _draw_sets(spec, 4000)
    share = Counter(drawn)["audio"] / len(drawn)
    assert abs(share - 0.7) < 0.04, share
    assert _draw_sets(spec, 300) == drawn[:300]
    flipped = Counter(_draw_sets(f"{audio_set}:0.3,{video_set}:0.7", 4000))["audio"] / 4000
    assert abs(flipped - 0.3) < 0.04, flipped


def test_mixture_data_info_records_sets_and_refuses_other_latents(audio_set, video_set, tmp_path):
    from train.trainer import DataInfo

    info = DataInfo(f"{audio_set}:0.7,{video_set}:0.3")
    assert [m["share"] for m in info.mixture] == [0.7, 0.3] and info.audio_only
    assert [m["train_samples"] for m in info.mixture] == [8, 20] and len(info.train) == 3
    other = write_shards(tmp_path, {"train": [2]}, latent_shape=(8, 8, 8))
    with pytest.raises(ValueError, match="disagree on latent_shape"):
        DataInfo(f"{video_set}:1,{other}:1")


# ---- conditions without video -----------------------------------------------------------------

def test_text_and_none_conditions_build_their_context():
    import torch

    from train.config import ModelConfig
    from train.model import ConditionEncoder

    text = torch.randn(3, 16)
    enc = ConditionEncoder(ModelConfig(condition="text", clip_dim=16, text_dim=16, text_repeat=0), 32)
    tokens, mask = enc(None, None, text)
    assert tokens.shape == (3, 1, 32) and mask.all()
    assert torch.allclose(tokens[:, 0], enc.proj(text))
    video_text = ConditionEncoder(ModelConfig(condition="video+text", clip_dim=16, text_dim=16, text_repeat=2), 32)
    tokens, mask = video_text(None, None, text, drop=torch.tensor([True, False, False]))  # text-to-audio
    assert tokens.shape == (3, 2, 32) and torch.equal(mask[0], torch.tensor([True, False]))
    assert torch.allclose(tokens[0, 0], video_text.null[0]) and torch.allclose(tokens[1, 1], video_text.proj(text[1]))
    none = ConditionEncoder(ModelConfig(condition="none", clip_dim=16), 32)
    tokens, mask = none(None, None, None, batch=4)
    assert tokens.shape == (4, 1, 32) and torch.allclose(tokens[2, 0], none.null[0])
    with pytest.raises(ValueError, match="needs the CLIP text"):
        ConditionEncoder(ModelConfig(condition="video", clip_dim=16), 32)(None, None, None)


def test_without_video_no_vision_or_flow_member_is_read():
    """need_video=False (text / none): vision-<name>.npy and flow-<name>.npy are neither read nor required."""
    from shards.batch import collate, decode_sample
    from shards.sources import train_members

    rng = np.random.default_rng(0)
    sample = make_sample("k", 0, rng)
    sample["vision-siglip2.npy"] = sample["flow-siglip2.npy"] = sample.pop("clip.npy")
    assert train_members("siglip2", True, need_video=False) == ("text.npy", "latent.npy", "json")
    out = decode_sample(sample, True, vision="siglip2", need_flow=True, need_video=False)
    assert out["clip"] is None and "flow" not in out and out["text"] is not None
    bare = {k: v for k, v in sample.items() if not k.startswith(("vision-", "flow-"))}  # an audio-only sample
    batch = collate([decode_sample(bare, True, vision="siglip2", need_flow=True, need_video=False)] * 2)
    assert "clip" not in batch and "flow" not in batch and batch["text"].shape[0] == 2
    with_video = decode_sample(sample, True, vision="siglip2", need_flow=True)
    assert with_video["clip"].shape == with_video["flow"].shape


def test_video_conditions_are_refused_on_audio_only_sets_before_the_vision_checks(audio_set, video_set):
    from train.config import ModelConfig
    from train.trainer import DataInfo

    for condition in ("video", "video+flow", "video+flow+text+pe"):
        with pytest.raises(ValueError, match="audio-only shards"):
            DataInfo(str(audio_set)).condition_config(ModelConfig(condition=condition, vision_encoder="siglip2"))
    mixed = DataInfo(f"{audio_set}:0.7,{video_set}:0.3")
    cfg = mixed.condition_config(ModelConfig(condition="text", vision_encoder="siglip2"))
    assert cfg.condition == "text" and cfg.vision_encoder == "siglip2"  # no vision member needed


def test_pretrain_audio_condition_and_audio_only_shards_need_it(audio_set, tmp_path):
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig, TrainConfig
    from train.trainer import pretrain_model_config, train

    tcfg = TrainConfig(shards=str(audio_set), out=str(tmp_path / "run"), pretrain="audio")
    assert pretrain_model_config(tcfg, ModelConfig()).condition == "text"
    assert pretrain_model_config(tcfg, ModelConfig(condition="none")).condition == "none"
    with pytest.raises(ValueError, match="reads no video"):
        pretrain_model_config(tcfg, ModelConfig(condition="video+text"))
    plain = TrainConfig(shards=str(audio_set), out=str(tmp_path / "run"), max_steps=1, workers=0, val_every=0)
    with pytest.raises(ValueError, match="audio-only shards"):
        train(plain, ModelConfig(unet_config=TINY_UNET_CONFIG), NoiseConfig())


def test_sampler_refuses_what_the_model_cannot_do():
    from train.config import SamplerConfig
    from train.sample import SamplerError, check_inputs

    tta = SamplerConfig(ckpt="run", out="a.wav", caption="a dog barks")
    check_inputs(tta, "text")
    check_inputs(tta, "video+text+pe")
    with pytest.raises(SamplerError, match="trained with --condition video .*text-to-audio|text-to-audio needs"):
        check_inputs(tta, "video")
    with pytest.raises(SamplerError, match="unconditional model"):
        check_inputs(tta, "none")
    check_inputs(SamplerConfig(ckpt="run", out="a.wav"), "none")  # unconditional: a sample of the prior
    with pytest.raises(SamplerError, match="without video"):
        check_inputs(SamplerConfig(ckpt="run", out="a.wav", video="v.mp4", caption="x"), "text")
    with pytest.raises(SamplerError, match="--mux needs --video"):
        check_inputs(SamplerConfig(ckpt="run", out="a.wav", caption="x", mux="a.mp4"), "text")


# ---- fine-tuning start ------------------------------------------------------------------------

def test_init_from_loads_every_weight_or_names_what_does_not_fit(tmp_path):
    import torch
    from safetensors.torch import save_file

    from train.checkpoint import CheckpointError, init_from
    from train.config import TINY_UNET_CONFIG, ModelConfig
    from train.model import VideoToAudioUNet

    torch.manual_seed(1)
    source = VideoToAudioUNet(ModelConfig(unet_config=TINY_UNET_CONFIG, clip_dim=16, condition="text"))
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    target = VideoToAudioUNet(ModelConfig(unet_config=TINY_UNET_CONFIG, clip_dim=16, condition="video+text+pe"))
    record = init_from(target, path)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and record["path"] == str(path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    wider = VideoToAudioUNet(ModelConfig(unet_config=TINY_UNET_CONFIG, clip_dim=24))
    with pytest.raises(CheckpointError, match=r"shape differs .*cond\.proj\.weight \(32, 16\) vs \(32, 24\)"):
        init_from(wider, path)
    partial = {k: v for k, v in source.state_dict().items() if k != "cond.null"}
    save_file({k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing in the source \(1\): cond\.null"):
        init_from(target, tmp_path / "partial.safetensors")


# ---- the runbook's audio rows, end to end on the sample data ----------------------------------

def write_video_shards(out: Path, card: dict, n: int = 4, frames: int = 20) -> Path:
    """Video shards whose latents, CLIP width and VAE match an encoded set's card (random features):
    the fine-tuning data of the end-to-end test, without a second real encode."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    dim, shape = int(card["text_dim"]), tuple(card["latent_shape"])
    with wds.TarWriter(str(out / "train-000000.tar")) as sink:
        for i in range(n):
            latent = np.stack([rng.standard_normal(shape[1:]), np.full(shape[1:], 0.05)])
            sink.write({"__key__": f"video-{i:04d}", "clip.npy": _npy(rng.standard_normal((frames, dim))),
                        "text.npy": _npy(rng.standard_normal(dim)), "latent.npy": _npy(latent),
                        "json": json.dumps({"key": f"video-{i:04d}", "caption": "a knock"}).encode()})
    (out / "index.json").write_text(json.dumps({"shards": [{"name": "train-000000.tar", "split": "train", "count": n}]}))
    (out / "card.json").write_text(json.dumps({**card, "audio_only": False}))
    return out


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_clap_dir):
    """docs/study.md's audio rows with tiny models: sample -> clean -> encode -> pre-train -> fine-tune."""
    from model_fixtures_encoders import TINY_CLIP_DIM
    from pipeline.clean import main as clean
    from pipeline.encode import main as encode
    from pipeline.sample import generate
    from shards.random_models import build_random_clip, build_random_vae
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig, TrainConfig
    from train.trainer import train

    tmp = tmp_path_factory.mktemp("study")
    clip_dir = build_random_clip(tmp / "clip", size="tiny", projection_dim=TINY_CLIP_DIM)
    vae_dir = build_random_vae(tmp / "vae", size="tiny")
    generate(tmp / "data" / "audio", kind="audio")
    assert clean(["--dataset", "audio", "--root", str(tmp / "data" / "audio"), "--out", str(tmp / "out" / "audio"),
                  "--clap-model", str(tiny_clap_dir), "--clap-device", "cpu", "--clap-min", "0",
                  "--workers", "1"]) == 0
    assert encode(["--ledger", str(tmp / "out" / "audio" / "ledger.parquet"), "--out", str(tmp / "shards-audio"),
                   "--shard-size", "2", "--clip-model", str(clip_dir), "--vae", str(vae_dir), "--device", "cpu",
                   "--workers", "1"]) == 0
    video = write_video_shards(tmp / "shards-video", json.loads((tmp / "shards-audio" / "card.json").read_text()))
    common = dict(batch_size=2, max_steps=2, ckpt_every=2, val_every=0, workers=0, log_every=1, warmup_steps=1)
    tiny = dict(unet_config=TINY_UNET_CONFIG, clip_dim=TINY_CLIP_DIM)
    train(TrainConfig(shards=str(tmp / "shards-audio"), out=str(tmp / "run-pretrain"), pretrain="audio", **common),
          ModelConfig(**tiny), NoiseConfig())
    train(TrainConfig(shards=str(video), out=str(tmp / "run-finetune"), init_from=str(tmp / "run-pretrain"),
                      **common), ModelConfig(condition="video+text", **tiny), NoiseConfig())
    return {"tmp": tmp, "clip": clip_dir, "vae": vae_dir}


@pytest.mark.slow
def test_audio_corpus_cleans_and_encodes_without_video(study):
    import pandas as pd

    tmp = study["tmp"]
    ledger = pd.read_parquet(tmp / "out" / "audio" / "ledger.parquet").set_index("key")
    manifest = json.loads((tmp / "data" / "audio" / "sample_manifest.json").read_text())
    assert ledger.loc["audio-clips_quiet-000000", ["status", "reason"]].tolist() == ["filtered", "silent"]
    assert ledger.loc["audio-clips_gone", "reason"].startswith("missing_file")
    assert ledger.loc["audio-captions-L000005", "reason"].startswith("bad_manifest_row")
    scored = ledger[ledger["status"] != "failed"]
    assert len(scored) == 6 and scored["clap_score"].notna().all()  # each window against its own caption
    assert scored["av_align"].isna().all() and scored["motion_max"].isna().all()  # not applicable, not failures
    run = json.loads((tmp / "out" / "audio" / "run.json").read_text())
    assert "av_align" in run["not_applicable"] and run["dataset"] == "audio"
    assert {f["format"] for f in manifest["files"]} == {"captions.csv", "wavcaps", "audiocaps"}
    card = json.loads((tmp / "shards-audio" / "card.json").read_text())
    assert card["audio_only"] and "clip.npy" not in card["members"] and card["samples"] == 5
    assert not card["vision_encoders"] and not card["with_flow"]
    assert not [m for m in card["members"] if m.startswith(("vision-", "flow-"))]
    index = json.loads((tmp / "shards-audio" / "index.json").read_text())
    names = [m for s in index["shards"] for m in tarfile.open(tmp / "shards-audio" / s["name"]).getnames()]
    assert names and not [n for n in names if n.endswith("clip.npy")]
    assert {n.split(".", 1)[1] for n in names} == {"audio.flac", "json", "latent.npy", "text.npy"}


@pytest.mark.slow
def test_pretrain_then_finetune_records_the_source(study):
    tmp = study["tmp"]
    pre = json.loads((tmp / "run-pretrain" / "run_config.json").read_text())
    assert pre["model"]["condition"] == "text" and pre["train"]["pretrain"] == "audio" and pre["data"]["audio_only"]
    fine = json.loads((tmp / "run-finetune" / "run_config.json").read_text())
    source = fine["init_from"]
    ema = tmp / "run-pretrain" / "checkpoints" / "step-00000002" / "ema.safetensors"
    assert source["path"] == str(tmp / "run-pretrain") and source["weights"] == "ema"
    assert source["sha256"] == hashlib.sha256(ema.read_bytes()).hexdigest()
    summary = json.loads((tmp / "run-finetune" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] is None  # step 0, fresh optimiser
    losses = [json.loads(x).get("loss") for x in (tmp / "run-finetune" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses if x is not None)


@pytest.mark.slow
def test_text_to_audio_from_the_same_model(study):
    """The fine-tuned video+text model, sampled from a caption alone (the paper's TTA demo)."""
    import soundfile as sf

    from train.sample import main as sample

    tmp = study["tmp"]
    out = tmp / "tta" / "dog.wav"
    assert sample(["--ckpt", str(tmp / "run-finetune"), "--caption", "a door knocks twice", "--out", str(out),
                   "--clip-model", str(study["clip"]), "--vae", str(study["vae"]), "--allow-random-weights",
                   "--steps", "2", "--device", "cpu"]) == 0
    audio, sr = sf.read(out)
    assert sr == 16000 and len(audio) == 163840 and np.isfinite(audio).all()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["mode"] == "text-to-audio" and sidecar["video"] is None and sidecar["clip_frames"] == 0
    assert sidecar["condition"] == "video+text" and sidecar["caption"] == "a door knocks twice"


@pytest.mark.slow
def test_torchrun_two_ranks_unconditional_audio_pretraining_on_a_mixture(audio_set, video_set, tmp_path):
    """--pretrain audio --condition none over audio-only + video shards, 2 ranks (gloo): the unused
    condition projection must not stall DDP; every rank runs every step."""
    from train.config import TINY_UNET_CONFIG

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
         "--shards", f"{audio_set}:0.7,{video_set}:0.3", "--out", str(run), "--pretrain", "audio", "--condition",
         "none", "--unet-config", TINY_UNET_CONFIG, "--batch-size", "2", "--max-steps", "3", "--ckpt-every", "3",
         "--val-every", "3", "--val-samples", "4", "--workers", "0", "--log-every", "1", "--warmup-steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_rank"] == [3, 3]
    config = json.loads((run / "run_config.json").read_text())
    assert [m["share"] for m in config["data"]["mixture"]] == [0.7, 0.3] and config["model"]["condition"] == "none"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
