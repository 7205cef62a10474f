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
            "--lr", "1e-3", "--warmup-steps", "3", "--val-every", "8", "--val-samples", "6",
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
    return write_shards(tmp_path_factory.mktemp("data"), {"train": [1, 2, 7], "test": [6]})


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
    assert rows[0]["val_loss_ema"] == pytest.approx(first)  # the EMA starts as the weights
    assert rows[STEPS]["val_loss_ema"] != pytest.approx(last)  # and then lags behind them
    assert "validation set: 6 test sample(s)" in output
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
    assert b[STEPS]["val_loss_ema"] == pytest.approx(a[STEPS]["val_loss_ema"], rel=1e-5)


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


def test_two_rank_validation_equals_one_rank_on_the_same_weights(uneven_shards, straight_run, tmp_path):
    """The validation set is fixed and each sample's draws come from its key: ranks and batch size do not matter."""
    from train.config import TrainConfig
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig
    from train.trainer import train

    straight, _ = straight_run
    tcfg = TrainConfig(shards=str(uneven_shards), out=str(tmp_path / "run"), batch_size=2, max_steps=0,
                       val_samples=6, workers=0, seed=3)
    train(tcfg, ModelConfig(unet_config=TINY_UNET_CONFIG, condition="video+text+pe"), NoiseConfig())
    one_rank = _rows(tmp_path / "run")[0]
    assert one_rank["val_loss"] == pytest.approx(_rows(straight)[0]["val_loss"], rel=1e-5)


test_two_rank_validation_equals_one_rank_on_the_same_weights = pytest.mark.slow(
    test_two_rank_validation_equals_one_rank_on_the_same_weights)


def _in_process_run(shards: Path, out: Path, max_steps: int, condition: str = "video", **kw) -> dict:
    from train.config import TrainConfig
    from train.config import TINY_UNET_CONFIG, ModelConfig, NoiseConfig
    from train.trainer import train

    kw = {"batch_size": 2, "ckpt_every": 2, "val_every": 0, "workers": 0, "log_every": 1, "seed": 1, **kw}
    tcfg = TrainConfig(shards=str(shards), out=str(out), max_steps=max_steps, **kw)
    return train(tcfg, ModelConfig(unet_config=TINY_UNET_CONFIG, condition=condition), NoiseConfig())


def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(uneven_shards, tmp_path, caplog):
    import logging

    from train.checkpoint import CheckpointError

    run = tmp_path / "run"
    _in_process_run(uneven_shards, run, 4)
    bad = run / "checkpoints" / "step-00000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        summary = _in_process_run(uneven_shards, run, 5)
    assert summary["resumed_from"] == 2 and summary["steps"] == 5
    assert str(bad) in caplog.text and "previous intact checkpoint" in caplog.text
    for step in (2, 4, 5):  # nothing intact left: the error names every file
        ckpt_dir = run / "checkpoints" / f"step-{step:08d}"
        if ckpt_dir.is_dir():
            (ckpt_dir / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        _in_process_run(uneven_shards, run, 6)


test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used = pytest.mark.slow(
    test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used)


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_continues_with_new_streams(uneven_shards, straight_run, tmp_path, caplog):
    import logging
    import shutil

    straight, _ = straight_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for p in (run / "checkpoints").glob("step-*"):
        if p.name != "step-00000008":
            shutil.rmtree(p)
    with caplog.at_level(logging.WARNING):
        summary = _in_process_run(uneven_shards, run, 10, "video+text+pe", mix_shards=2, seed=3)
    assert summary["resumed_from"] == 8 and summary["world_size"] == 1
    assert "written by 2 ranks, this run has 1" in caplog.text
    state = json.loads((run / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["data"][0]["generation"] == 8  # streams keyed by the resume step
    assert state["step"] == 10 and state["lr_scheduler"]["last_epoch"] == 10  # the schedule went on


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--ema-decay", "1"), ("--text-repeat", "-1"),
                                         ("--shuffle-buffer", "0")])
def test_a_bad_training_flag_is_a_one_line_error(flag, value, capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--shards", "s", "--out", "o", flag, value])
    assert e.value.code == 2 and flag.lstrip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")


def test_parameter_groups_spare_norms_biases_embeddings_and_the_null_token():
    from train.config import TrainConfig
    from train.config import TINY_UNET_CONFIG, ModelConfig
    from train.model import VideoToAudioUNet
    from train.optim import build_optimizer

    model = VideoToAudioUNet(ModelConfig(unet_config=TINY_UNET_CONFIG))
    groups = {g["name"]: g for g in build_optimizer(model, TrainConfig(weight_decay=0.01)).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    spared = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert "cond.null" in spared and "cond.proj.bias" in spared and "cond.proj.weight" in decayed
    assert {n for n in spared if "norm" in n} and not {n for n in decayed if "norm" in n or n.endswith(".bias")}
    assert {n for n in names.values() if n.startswith("unet.time_embedding.")} <= spared
    assert "unet.conv_in.weight" in decayed


def test_an_optimiser_state_from_before_the_parameter_groups_is_mapped_onto_them():
    from train.config import TrainConfig
    import torch

    from train.config import TINY_UNET_CONFIG, ModelConfig
    from train.model import VideoToAudioUNet
    from train.optim import adapt_optimizer_state, build_optimizer

    model = VideoToAudioUNet(ModelConfig(unet_config=TINY_UNET_CONFIG))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)  # the previous trainer's optimiser
    old.step()
    new = build_optimizer(model, TrainConfig())
    new.load_state_dict(adapt_optimizer_state(old.state_dict(), new, model))
    assert new.state[model.cond.null]["step"] == 1 and new.param_groups[1]["weight_decay"] == 0.0
    for p in (model.cond.null, model.unet.conv_in.weight):
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_sampling_ends_on_the_clean_latent(kind):
    """With an oracle denoiser the last step must return x0 itself (set_alpha_to_one / final sigma 0)."""
    import torch

    from train.config import NoiseConfig
    from train.model import DiffusionLoss, sampling_scheduler

    cfg = NoiseConfig()
    sched = sampling_scheduler(cfg, kind)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 8, 16, 8, generator=gen), torch.randn(1, 8, 16, 8, generator=gen)
    train_sched = DiffusionLoss(cfg).scheduler
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        a = train_sched.alphas_cumprod[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that is in x, exactly
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        x = sched.step(v, t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-4), float((x - x0).abs().max())


def test_text_repeat_gives_vta_ldm_one_text_copy_per_frame():
    import torch

    from train.config import ModelConfig
    from train.model import ConditionEncoder

    clip, mask, text = torch.randn(2, 5, 768), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 768)
    mask[1, 3:] = False
    one = ConditionEncoder(ModelConfig(condition="video+text"), 16)
    ctx, ctx_mask = one(clip, mask, text)
    assert ctx.shape == (2, 6, 16) and ctx_mask[1].tolist() == [True, True, True, True, False, False]
    vta = ConditionEncoder(ModelConfig(condition="video+text", text_repeat=0), 16)
    vta.load_state_dict(one.state_dict())
    ctx, ctx_mask = vta(clip, mask, text)
    assert ctx.shape == (2, 10, 16) and vta.context_length(5) == 10
    assert ctx_mask[1].tolist() == [True] * 3 + [False] * 2 + [True] * 3 + [False] * 2  # padded frames' copies too
    assert torch.equal(ctx[:, 0], ctx[:, 4]) and torch.equal(ctx[:, 5:], one(clip, mask, text)[0][:, 1:])
    three = ConditionEncoder(ModelConfig(condition="video+text", text_repeat=3), 16)
    assert three(clip, mask, text)[0].shape == (2, 8, 16) and three(clip, mask, text)[1][1, :3].all()
    with pytest.raises(ValueError, match="text_repeat"):
        ModelConfig(text_repeat=-1)


@pytest.mark.parametrize("schedule, at_half, at_end", [("constant", 1.0, 1.0), ("linear", 0.5, 0.0),
                                                       ("cosine", 0.5, 0.0)])
def test_lr_schedules_after_warm_up(schedule, at_half, at_end):
    import torch

    from train.config import TrainConfig
    from train.optim import build_optimizer, build_scheduler

    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_schedule=schedule)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(at_half, abs=1e-6) and lrs[110] == pytest.approx(at_end, abs=1e-6)


def test_ema_warmup_on_follows_diffusers_and_off_is_flat():
    import torch

    from train.config import TrainConfig
    from train.optim import build_ema

    model = torch.nn.Linear(2, 2)
    on = build_ema(model, TrainConfig(ema_decay=0.9999))
    off = build_ema(model, TrainConfig(ema_decay=0.9999, ema_warmup="off"))
    assert on.get_decay(10_001) == pytest.approx(10_001 / 10_010) and on.get_decay(10**6) == 0.9999
    assert off.get_decay(2) == off.get_decay(10_001) == 0.9999
    assert build_ema(model, TrainConfig(ema_decay=0.0)) is None


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
def test_evaluate_scores_av_align_both_modes_and_clap(generated, tiny_clap_dir, tmp_path):
    import csv

    from core.models import file_sha256
    from filters.av_align import AVAlignConfig, score_clip
    from train.evaluate import main

    clap = tiny_clap_dir
    # a second output without caption and without mp4: muxed on the fly, CLAP left empty
    (generated / "nocap.wav").write_bytes((generated / "clip.wav").read_bytes())
    side = json.loads((generated / "clip.json").read_text())
    (generated / "nocap.json").write_text(json.dumps(dict(side, caption=None, mux=None)))
    try:
        assert main(["--generated", str(generated), "--out", str(tmp_path / "eval"), "--clap-model", str(clap),
                     "--no-panns", "--no-vggish", "--no-passt", "--no-desync", "--no-pam"]) == 0
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
