"""Trainer: 2-process torchrun (gloo) on tiny shards; kill-and-resume; condition dropout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from cluster_fixtures import kill_tree
from shards_fixture import write_shards

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _train_args(shards: Path, out: Path, max_steps: int) -> list[str]:
    from train.config import TINY_UNET_CONFIG

    return ["-m", "train", "--shards", str(shards), "--out", str(out), "--unet-config", TINY_UNET_CONFIG,
            "--batch-size", "4", "--max-steps", str(max_steps), "--ckpt-every", "4", "--log-every", "1",
            "--lr", "1e-3", "--warmup-steps", "3", "--val-every", "8", "--val-batches", "2",
            "--workers", "2", "--mix-shards", "2", "--condition", "video+text+pe", "--seed", "3"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(TORCHRUN + args,
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _rows(run: Path) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """Three train shards of 1, 2 and 7 samples for 2 ranks x 2 workers, and one test shard."""
    return write_shards(tmp_path_factory.mktemp("data"), {"train": [1, 2, 7], "test": [3]})


@pytest.fixture(scope="module")
def straight_run(uneven_shards, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = _torchrun(_train_args(uneven_shards, run, STEPS))
    return run, proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_rank_gloo_run_overfits_with_equal_steps(straight_run):
    run, output = straight_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps_per_rank"] == [STEPS, STEPS]
    assert summary["batches_per_rank"] == [STEPS, STEPS]  # uneven shards, yet the same number of batches
    assert "only 3 training shard(s) for 2 rank(s) x 2 worker(s)" in output
    rows = _rows(run)
    assert sorted(k for k in rows if "loss" in rows[k]) == list(range(1, STEPS + 1))
    first, last = rows[0]["val_loss"], rows[STEPS]["val_loss"]
    assert last < 0.7 * first, (first, last)
    assert (run / "checkpoints" / f"step-{STEPS:08d}" / "ema.safetensors").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(uneven_shards, straight_run, tmp_path):
    straight, _ = straight_run
    run = tmp_path / "run"
    # an open-ended run, killed (SIGKILL, whole process group) as soon as a checkpoint exists
    proc = subprocess.Popen(TORCHRUN + _train_args(uneven_shards, run, 1000), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list((run / "checkpoints").glob("step-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert killed_at < STEPS, "the killed run got too far to test resuming"
    resumed = _torchrun(_train_args(uneven_shards, run, STEPS))
    assert f"resuming at step {killed_at}" in resumed.stdout + resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == killed_at and summary["steps_per_rank"] == [STEPS - killed_at] * 2
    a, b = _rows(straight), _rows(run)
    assert sorted(b) == sorted(a)  # rows the killed run wrote after its checkpoint were dropped
    for step in range(1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-7), step
    assert b[STEPS]["val_loss"] == pytest.approx(a[STEPS]["val_loss"], rel=1e-5)


def test_condition_dropout_rate_and_null_condition():
    import torch
    from train.config import ModelConfig
    from train.model import ConditionEncoder, condition_dropout

    gen = torch.Generator().manual_seed(0)
    drops = torch.cat([condition_dropout(1000, 0.1, gen, "cpu") for _ in range(100)])
    assert abs(drops.float().mean().item() - 0.1) < 0.005
    assert not condition_dropout(1000, 0.0, gen, "cpu").any()

    enc = ConditionEncoder(ModelConfig(condition="video+text"), 16)
    clip, mask = torch.randn(4, 5, 768), torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    text = torch.randn(4, 768)
    drop = torch.tensor([False, True, False, True])
    ctx, ctx_mask = enc(clip, mask, text, drop)
    ref, ref_mask = enc(clip, mask, text)
    null, null_mask = enc.null_context(4, 6)
    assert ctx.shape == (4, 6, 16)
    assert torch.equal(ctx[~drop], ref[~drop]) and torch.equal(ctx_mask[~drop], ref_mask[~drop])
    assert torch.equal(ctx[drop], null[drop]) and torch.equal(ctx_mask[drop], null_mask[drop])
    assert ctx_mask[1].tolist() == [True] + [False] * 5  # only the null token is attended to
    assert ref_mask[1].tolist() == [True, True, True, True, False, False]  # text token + 3 real frames


def test_loss_uses_configured_dropout_rate_and_trains_the_projection():
    import torch
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig
    from train.model import DiffusionLoss, VideoToAudioUNet

    model = VideoToAudioUNet(ModelConfig(unet_config=TINY_UNET_CONFIG))
    loss_fn = DiffusionLoss(NoiseConfig())
    batch = {"latent": torch.randn(64, 2, 8, 16, 8).abs() * 0.1, "clip": torch.randn(64, 3, 768),
             "clip_mask": torch.ones(64, 3, dtype=torch.bool)}
    gen = torch.Generator().manual_seed(1)
    terms = loss_fn(model, batch, 1.0, gen, cond_dropout=0.5)
    assert 16 <= int(terms.drop.sum()) <= 48
    terms.loss.backward()
    # the projection is a trained parameter (VTA-LDM never gave it to its optimiser)
    assert model.cond.proj.weight.grad is not None and model.cond.proj.weight.grad.abs().sum() > 0
    assert model.cond.null.grad is not None and model.cond.null.grad.abs().sum() > 0


def test_min_snr_weights_for_v_prediction():
    import torch
    from train.config import NoiseConfig
    from train.model import DiffusionLoss

    loss_fn = DiffusionLoss(NoiseConfig())
    t = torch.tensor([0, 500, 999])
    snr = loss_fn.snr(t)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    assert torch.allclose(loss_fn.weights(t), expected)
    w = loss_fn.weights(t)
    assert float(w[0]) < 1.0 and float(w[2]) == pytest.approx(float(snr[2] / (snr[2] + 1)), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# sampler and evaluation

VIDEO = ROOT / "tests" / "data" / "vggsound" / "video" / "0DCit2EBtjs_000030.mp4"  # 10 s, 30 fps, with sound


def write_small_video(path: Path, seconds: float = 10.0, fps: int = 12, size: tuple[int, int] = (96, 64)) -> Path:
    """A small h264 + AAC mp4: a square that jumps every second, a click at each jump."""
    from core.mux import AudioTrack, VideoTrack, mux

    w, h = size
    sr = 16000

    def frames():
        for i in range(int(seconds * fps)):
            img = np.zeros((h, w, 3), np.uint8)
            x = (i // fps * 17) % (w - 16)
            img[20:36, x:x + 16] = 255
            yield img, Fraction(i, fps)

    audio = np.zeros(int(seconds * sr), np.float32)
    for s in range(1, int(seconds)):
        audio[s * sr:s * sr + 400] = 0.8 * np.sin(np.arange(400) * 0.3)
    return mux(path, VideoTrack(frames=frames(), size=size, rate=Fraction(fps)),
               AudioTrack(pcm=audio[None, :], sample_rate=sr, codec="aac"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """A one-step run on full-size AudioLDM latents (in-process, no torchrun) and tiny random encoders."""
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig

    from model_fixtures import AUDIOLDM_LATENT, build_tiny_models
    from train.config import TrainConfig
    from train.trainer import train

    base = tmp_path_factory.mktemp("tiny_run")
    shards = write_shards(base / "data", {"train": [2]}, latent_shape=AUDIOLDM_LATENT)
    tcfg = TrainConfig(shards=str(shards), out=str(base / "run"), batch_size=1, max_steps=1, ckpt_every=1,
                       val_every=0, workers=0, log_every=1)
    summary = train(tcfg, ModelConfig(unet_config=TINY_UNET_CONFIG), NoiseConfig())
    assert summary["steps"] == 1 and summary["world_size"] == 1
    return base / "run", build_tiny_models(base / "models")


@pytest.fixture(scope="module")
def generated(tiny_run, tmp_path_factory) -> Path:
    """One sampler output, muxed: the CLI as a user runs it."""
    from train.sample import main

    run, models = tiny_run
    folder = tmp_path_factory.mktemp("generated")
    video = write_small_video(tmp_path_factory.mktemp("video") / "small.mp4")
    rc = main(["--ckpt", str(run), "--video", str(video), "--clip-model", str(models["clip"]),
               "--vae", str(models["vae"]), "--vocoder", str(folder / "no-such-vocoder"), "--allow-random-weights",
               "--out", str(folder / "clip.wav"), "--mux", str(folder / "clip.mp4"), "--steps", "3",
               "--guidance", "3", "--seed", "7", "--caption", "a dog barking"])
    assert rc == 0
    return folder


@pytest.mark.slow
def test_sampler_writes_16k_wav_of_10_24_s_and_a_muxed_mp4(generated):
    import av
    import soundfile as sf

    info = sf.info(str(generated / "clip.wav"))
    assert (info.samplerate, info.frames, info.channels) == (16000, 163840, 1)
    sidecar = json.loads((generated / "clip.json").read_text())
    assert sidecar["random_weights"] == ["CLIP", "VAE", "vocoder"] and sidecar["clip_frames"] == 20
    assert sidecar["trained_steps"] == 1 and sidecar["caption"] == "a dog barking"
    assert sidecar["models"]["vocoder"].endswith(".random-models/vocoder")  # --allow-random-weights fallback
    with av.open(str(generated / "clip.mp4")) as c, av.open(sidecar["video"]) as src:
        assert [s.type for s in c.streams] == ["video", "audio"]
        assert c.streams.audio[0].sample_rate == 16000
        assert c.streams.video[0].codec_context.name == src.streams.video[0].codec_context.name
        copied = [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]
        original = [bytes(p) for p in src.demux(src.streams.video[0]) if p.size]
        assert copied == original  # the picture is copied losslessly


@pytest.mark.slow
def test_evaluate_scores_av_align_both_modes_and_clap(generated, tmp_path):
    import csv

    from clap_fixture import build_tiny_clap
    from core.models import file_sha256
    from filters.av_align import AVAlignConfig, score_clip
    from train.evaluate import main

    clap = build_tiny_clap(tmp_path / "clap")
    # a second output without caption and without mp4: muxed on the fly, CLAP left empty
    (generated / "nocap.wav").write_bytes((generated / "clip.wav").read_bytes())
    side = json.loads((generated / "clip.json").read_text())
    (generated / "nocap.json").write_text(json.dumps(dict(side, caption=None, mux=None)))
    try:
        assert main(["--generated", str(generated), "--out", str(tmp_path / "eval"), "--clap-model", str(clap),
                     "--no-panns", "--no-vggish", "--no-passt"]) == 0
    finally:
        (generated / "nocap.wav").unlink()
        (generated / "nocap.json").unlink()
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "eval" / "eval.csv"))}
    assert set(rows) == {"clip", "nocap"}
    ref = score_clip(generated / "clip.mp4", AVAlignConfig(mode="reference")).score
    assert float(rows["clip"]["av_align_reference"]) == pytest.approx(ref)
    assert 0.0 <= float(rows["clip"]["av_align_fast"]) <= 1.0
    assert -1.0 <= float(rows["clip"]["clap"]) <= 1.0
    assert rows["nocap"]["clap"] == "" and "no caption" in rows["nocap"]["reason"]
    assert float(rows["nocap"]["av_align_reference"]) == pytest.approx(ref)  # same sound, same video
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["count"] == 2 and summary["metrics"]["clap"]["n"] == 1 and summary["random_weights"]
    assert summary["metrics"]["clap"]["value"] == pytest.approx(float(rows["clip"]["clap"]))
    assert summary["metrics"]["clap"]["weights_sha256"] == {"model.safetensors": file_sha256(clap / "model.safetensors")}
    assert summary["metrics"]["av_align_reference"]["value"] == pytest.approx(ref)


@pytest.mark.slow
def test_denoising_is_seeded_and_guided_against_the_null_condition(tiny_run):
    import torch

    from train.checkpoint import load_for_inference
    from train.sample import denoise

    run, _ = tiny_run
    model, run_config, _ = load_for_inference(run)
    clip = torch.randn(20, 768)

    def sample(seed: int, guidance: float, scheduler: str = "ddim") -> torch.Tensor:
        return denoise(model, clip, None, run_config, 1, guidance, scheduler, seed)

    a = sample(1, 3.0)
    assert a.shape == (1, 8, 256, 16) and torch.isfinite(a).all()
    assert torch.equal(a, sample(1, 3.0))
    assert not torch.equal(a, sample(2, 3.0)) and not torch.equal(a, sample(1, 1.0))
    assert torch.isfinite(sample(1, 3.0, "dpm")).all()


def _clicks(sr: int, seconds: float, times: list[float]) -> np.ndarray:
    audio = np.zeros(int(sr * seconds), np.float32)
    for t in times:
        i = int(round(t * sr))
        audio[i:i + 16] = 0.9
    return audio


def _decoded_audio(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        chunks, first = [], None
        for frame in c.decode(stream):
            if first is None:
                first = float(frame.time)
            chunks.append(frame.to_ndarray().reshape(-1))
        audio = np.concatenate(chunks)
        if first and first > 0:
            audio = np.concatenate([np.zeros(int(round(first * stream.sample_rate)), np.float32), audio])
        return audio, stream.sample_rate


@pytest.mark.parametrize("start_s", [0.0, 2.0])
def test_mux_keeps_sound_in_sync_with_the_picture(tmp_path, start_s):
    """Clicks placed at known times come back at those times (AAC priming handled by the edit list)."""
    import av

    from train.sample import mux

    times = [0.5, 3.25, 5.5]
    out = mux(str(VIDEO), _clicks(16000, 10.24 if start_s == 0 else 6.0, times), 16000, tmp_path / "m.mp4", start_s)
    audio, sr = _decoded_audio(out)
    found = []
    for t in times:
        lo = int((t - 0.1) * sr)
        found.append((lo + int(np.argmax(np.abs(audio[lo:lo + int(0.2 * sr)])))) / sr)
    assert np.allclose(found, times, atol=0.002), found
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert [s.type for s in c.streams] == ["video", "audio"]
        first_video = next(f for f in c.decode(v)).time
        assert abs(first_video) < 0.05
