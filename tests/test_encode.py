"""``python -m pipeline.encode`` end to end: shards a stock WebDataset reads, honest index and card,
byte-identical reruns (also with another worker count), kill-and-resume, failures as records."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures_encoders import (REAL_CLIP, THRESHOLDS, TINY_CLIP_DIM, assert_same_samples,  # noqa: E402,F401
                                     ledger_row, tiny_clip_dir, tiny_vae_dir, write_ledger)

from pipeline.encode import main  # noqa: E402
from core.synth import truncate_file, write_event_clip  # noqa: E402
from shards.shard_writer import shard_order  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_MEMBERS = {"json", "vision-clip.npy", "text.npy", "latent.npy", "mel.npy", "audio.flac"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A ledger of generated and real clips (ok, filtered, failed, missing, corrupt) and a small plan."""
    from augment.config import AugmentConfig
    from augment.plan import build_plan, plan_meta
    from augment.recipe import write_plan

    root = tmp_path_factory.mktemp("encode_data")
    video = root / "video"
    video.mkdir()
    rows = []
    labels = ["dog barking", "glass breaking"]
    for i in range(5):
        path = write_event_clip(video / f"gen{i}_000000.mp4", duration_s=10.0, seed=i).path
        split = "test" if i == 4 else "train"
        rows.append(ledger_row(f"vggsound-gen{i}-000000", path, label=labels[i % 2], split=split))
    rows.append(ledger_row("vggsound-0DCit2EBtjs-000030", REAL_CLIP, label="playing acoustic guitar"))
    rows.append(ledger_row("vggsound-filt-000000", video / "gen0_000000.mp4", status="filtered", reason="clap<0.3"))
    rows.append(ledger_row("vggsound-fail-000000", video / "nothing.mp4", status="failed", reason="missing_file"))
    rows.append(ledger_row("vggsound-gone-000000", video / "gone_000000.mp4"))  # ok in the ledger, file since lost
    broken = write_event_clip(video / "broken_000000.mp4", duration_s=10.0, seed=9).path
    truncate_file(broken, 0.02)
    rows.append(ledger_row("vggsound-broken-000000", broken))
    out = root / "out"
    ledger_path = write_ledger(out, rows)

    cfg = AugmentConfig(concat_per_clip=1, stretch_rates=(1.25,))
    ok = pd.DataFrame(rows[:6])
    recipes, summary = build_plan(ok, cfg)
    concat = [r for r in recipes if r.kind == "concat"][:1]
    stretch = [r for r in recipes if r.kind == "stretch"][:1]
    write_plan(out / "plan.parquet", concat + stretch, plan_meta(cfg, str(ledger_path), summary, "test"))
    return {"ledger": ledger_path, "plan": out / "plan.parquet", "root": root,
            "encoded": sorted([r["key"] for r in rows[:6]] + [r.key for r in concat + stretch]),
            "failed": ["vggsound-broken-000000", "vggsound-gone-000000"],
            "recipes": {r.key: r for r in concat + stretch}}


def _args(dataset, out: Path, clip: Path, vae: Path, *extra: str) -> list[str]:
    return ["--ledger", str(dataset["ledger"]), "--plan", str(dataset["plan"]), "--out", str(out),
            "--clip-model", str(clip), "--vae", str(vae), "--shard-size", "3", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def encoded(dataset, tiny_clip_dir, tiny_vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a") / "shards"
    assert main(_args(dataset, out, tiny_clip_dir, tiny_vae_dir, "--workers", "1", "--with-mel")) == 0
    return out


def _shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


@pytest.mark.slow
def test_index_is_honest_and_counts_add_up(dataset, encoded):
    index = json.loads((encoded / "index.json").read_text())
    files = _shard_files(encoded)
    assert [s["name"] for s in index["shards"]] == sorted(files)  # every shard listed, nothing else
    assert [s["name"] for s in index["shards"]] == ["test-000000.tar", "train-000000.tar", "train-000001.tar",
                                                    "train-000002.tar"]
    for s in index["shards"]:
        data = files[s["name"]]
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys = sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
        assert s["count"] == len(keys) and s["split"] == s["name"].split("-")[0]
    failed = json.loads((encoded / "failed.json").read_text())
    assert [f["key"] for f in failed] == dataset["failed"]
    reasons = {f["key"]: f["reason"] for f in failed}
    assert reasons["vggsound-gone-000000"].startswith("missing_file")
    assert reasons["vggsound-broken-000000"].startswith("decode_error")
    card = json.loads((encoded / "card.json").read_text())
    assert card["counts"] == {"test": 1, "train": len(dataset["encoded"]) - 1}
    assert card["samples"] == sum(s["count"] for s in index["shards"]) == len(dataset["encoded"])
    assert (card["failed"], card["from_ledger"], card["from_plan"]) == (2, 8, 2)
    assert card["failed_reasons"] == {"decode_error": 1, "missing_file": 1}


@pytest.mark.slow
def test_card_records_encoders_and_parameters(encoded, tiny_clip_dir, tiny_vae_dir):
    from core.models import file_sha256

    card = json.loads((encoded / "card.json").read_text())
    assert card["random_weights"] is True  # the fixtures are random-weight folders, and the card says so
    assert card["clip_weights_sha256"] == {"model.safetensors": file_sha256(tiny_clip_dir / "model.safetensors")}
    assert card["vae_weights_sha256"] == {
        "diffusion_pytorch_model.safetensors": file_sha256(tiny_vae_dir / "diffusion_pytorch_model.safetensors")}
    assert card["vae_scaling_factor"] == 1.0 and card["latent_shape"] == [2, 8, 256, 16]
    assert (card["clip_normalize"], card["clip_fps"], card["clip_dim"], card["sample_rate"]) == (True, 2.0, 16, 16000)
    assert card["mel"]["n_fft"] == 1024 and card["mel"]["hop_length"] == 160 and card["mel"]["n_mels"] == 64
    assert card["mel"]["resampler"] == "torchaudio" and card["feature_resampler"]["name"] == "torchaudio"
    assert card["thresholds"] == THRESHOLDS
    assert card["code_version"] and card["with_mel"] is True
    assert card["augmentation_plan"]["config"]["stretch_rates"] == [1.25]


@pytest.mark.slow
def test_stock_webdataset_reads_every_sample(dataset, encoded):
    import webdataset as wds

    urls = [str(encoded / s["name"]) for s in json.loads((encoded / "index.json").read_text())["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == dataset["encoded"]
    # test split first, each split in the writer's hashed key order
    assert keys == sorted(keys[:1], key=shard_order) + sorted(keys[1:], key=shard_order)
    for s in samples:
        assert set(s) - {"__key__", "__url__", "__local_path__"} == ALLOWED_MEMBERS
        clip, text, latent, mel = s["vision-clip.npy"], s["text.npy"], s["latent.npy"], s["mel.npy"]
        assert clip.dtype == text.dtype == latent.dtype == mel.dtype == np.float16
        recipe = dataset["recipes"].get(s["__key__"])
        seconds = recipe.duration_s if recipe else 10.0  # a 1.25x stretch of a 10 s clip lasts 8 s
        assert clip.ndim == 2 and clip.shape[1] == TINY_CLIP_DIM
        assert clip.shape[0] == int(np.ceil(seconds * 2 - 1e-9)) or (not recipe and clip.shape[0] == 19)
        assert text.shape == (TINY_CLIP_DIM,) and latent.shape == (2, 8, 256, 16) and mel.shape == (64, 1024)
        assert (latent[1] > 0).all() and np.isfinite(latent).all()
        audio, sr = sf.read(io.BytesIO(s["audio.flac"]))
        assert sr == 16000 and audio.ndim == 1 and seconds - 0.05 <= audio.size / sr <= seconds
        meta = s["json"]
        assert meta["key"] == s["__key__"] and meta["caption"]
        if recipe:
            assert meta["augmentation"]["kind"] == recipe.kind and meta["kind"] == recipe.kind
            segments = meta["augmentation"]["segments"]
            assert [g["source_key"] for g in segments] == [g.source_key for g in recipe.segments]
            assert "/" not in meta["augmentation"]["segments"][0]["video_path"]  # no machine paths in shards
        else:
            assert meta["augmentation"] is None and meta["scores"]["clap_score"] == 0.5


@pytest.mark.slow
def test_no_pickles_in_shards(encoded):
    for path in encoded.glob("*.tar"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                assert member in ALLOWED_MEMBERS and "/" not in m.name
                data = tar.extractfile(m).read()
                if member.endswith(".npy"):
                    np.load(io.BytesIO(data), allow_pickle=False)  # raises on object (pickled) arrays
                assert b"\x80\x04\x95" not in data[:16]  # no pickle protocol-4 stream anywhere


@pytest.mark.slow
def test_process_pool_gives_the_same_samples(dataset, encoded, tiny_clip_dir, tiny_vae_dir, tmp_path):
    """Two worker processes (one CPU thread each): same shards and members; float kernels with another
    thread count may move a latent by one float16 step, nothing else may differ."""
    out = tmp_path / "shards"
    assert main(_args(dataset, out, tiny_clip_dir, tiny_vae_dir, "--workers", "2", "--with-mel")) == 0
    assert sorted(_shard_files(out)) == sorted(_shard_files(encoded))
    for name in _shard_files(encoded):
        assert_same_samples(out / name, encoded / name)


@pytest.mark.slow
def test_killed_run_resumes_and_skips_finished_shards(dataset, encoded, tiny_clip_dir, tiny_vae_dir, tmp_path,
                                                      capsys):
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "pipeline.encode", *_args(dataset, out, tiny_clip_dir, tiny_vae_dir,
                                                          "--workers", "1", "--batch-size", "1", "--with-mel")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "test-000000.tar"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never finished its first shard"
    assert not (out / "index.json").exists(), "the run finished before it could be killed"
    before = first.stat().st_mtime_ns

    assert main(_args(dataset, out, tiny_clip_dir, tiny_vae_dir, "--workers", "1", "--with-mel")) == 0
    printed = capsys.readouterr().out
    assert "resuming:" in printed and "1 skipped" in printed
    assert first.stat().st_mtime_ns == before  # the finished shard was not rewritten
    assert _shard_files(out) == _shard_files(encoded)
    assert (out / "index.json").read_bytes() == (encoded / "index.json").read_bytes()
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name.endswith((".partial", ".tmp"))]

    assert main(_args(dataset, out, tiny_clip_dir, tiny_vae_dir, "--workers", "1", "--with-mel")) == 0
    assert "4 skipped" in capsys.readouterr().out  # a finished folder is a no-op


@pytest.mark.slow
def test_crashed_and_raising_samples_are_encoded_by_the_rerun_and_bytes_match_any_batching(
        dataset, encoded, tiny_clip_dir, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    """A worker SIGKILLed on one sample and an unexpected error on another (``V2A_INJECT_FAULT``): the
    first run closes its shards without them; the rerun, the faults gone, encodes both again and
    rewrites the shards whose ranges held them, ending byte-identical to the reference run, which
    encoded every sample at its first try in batches of 8 (this one: batches of 1)."""
    from pipeline.runners.faults import FAULT_ENV
    from shards.shard_writer import read_tar_samples

    train = sorted((k for k in dataset["encoded"] if k != "vggsound-gen4-000000"), key=shard_order)
    crashed, raised = train[0], train[4]  # in the first and the second train shard
    out = tmp_path / "shards"
    args = _args(dataset, out, tiny_clip_dir, tiny_vae_dir, "--workers", "1", "--batch-size", "1", "--with-mel")
    monkeypatch.setenv(FAULT_ENV, f"encode_signals:{crashed}:kill,encode_features:{raised}")
    assert main(args) == 0
    reasons = {f["key"]: f["reason"] for f in json.loads((out / "failed.json").read_text())}
    assert reasons[crashed].startswith("worker_crashed: ") and "SIGKILL" in reasons[crashed]
    assert reasons[raised].startswith("stage_error: encode_features: InjectedFault")
    held = [k for name in _shard_files(out) for k, _ in read_tar_samples(out / name)]
    assert crashed not in held and raised not in held and len(held) == len(dataset["encoded"]) - 2
    capsys.readouterr()

    monkeypatch.delenv(FAULT_ENV)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "retrying 2 sample(s)" in printed and "this run: 2 samples" in printed
    held = [k for name in _shard_files(out) for k, _ in read_tar_samples(out / name)]
    assert sorted(held) == dataset["encoded"]  # each sample exactly once
    assert _shard_files(out) == _shard_files(encoded)
    for name in ("index.json", "failed.json", "card.json"):
        assert (out / name).read_bytes() == (encoded / name).read_bytes(), name
    assert not list((out / ".work" / "samples").glob("*.tar"))  # nothing left behind in the cache


@pytest.mark.slow
def test_real_runs_refuse_missing_weights_and_demo_falls_back_loudly(dataset, tmp_path, capsys):
    import huggingface_hub.constants

    ledger = write_ledger(tmp_path / "one", [ledger_row("vggsound-gen0-000000", dataset["root"] / "video" /
                                                        "gen0_000000.mp4")])
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        args = ["--ledger", str(ledger), "--clip-model", "nobody-v2a/no-clip", "--vae", "nobody-v2a/no-vae",
                "--device", "cpu", "--workers", "1"]
        assert main(args) == 2
        assert "nobody-v2a/no-clip" in capsys.readouterr().err
        assert not (tmp_path / "one" / "shards" / "index.json").exists()
        assert main(args + ["--allow-random-weights"]) == 0
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = False
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed
    card = json.loads((tmp_path / "one" / "shards" / "card.json").read_text())
    assert card["random_weights"] is True and "nobody-v2a/no-clip" in card["random_weights_reason"]
    assert card["clip_dim"] == 768 and card["latent_shape"] == [2, 8, 256, 16] and card["samples"] == 1


@pytest.mark.slow
def test_ray_read_webdataset_reads_the_shards(dataset, encoded):
    ray = pytest.importorskip("ray")

    urls = [str(encoded / s["name"]) for s in json.loads((encoded / "index.json").read_text())["shards"]]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = ray.data.read_webdataset(urls).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["__key__"] for r in rows) == dataset["encoded"]
    for r in rows:
        assert r["latent.npy"].shape == (2, 8, 256, 16) and r["latent.npy"].dtype == np.float16
        assert r["vision-clip.npy"].shape[1] == TINY_CLIP_DIM and r["json"]["key"] == r["__key__"]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(dataset, encoded, tiny_clip_dir, tiny_vae_dir, capsys):
    before = _shard_files(encoded)
    assert main(_args(dataset, encoded, tiny_clip_dir, tiny_vae_dir, "--workers", "1", "--with-mel",
                      "--no-clip-normalize")) == 2
    assert "clip_normalize" in capsys.readouterr().err
    assert _shard_files(encoded) == before


def test_keys_are_sanitised_and_collisions_fail():
    from pipeline.encode_work import assign_keys

    rows = [{"key": "yt.abc/1", "split": "train"}, {"key": "yt_abc_1", "split": "train"}, {"key": "ok-1", "split": "x"}]
    kept, dup = assign_keys(rows)
    assert [r["key"] for r in kept] == ["ok-1", "yt_abc_1"]
    assert [d["key"] for d in dup] == ["yt_abc_1"] and dup[0]["reason"].startswith("duplicate_key")
    assert "yt.abc/1" in dup[0]["reason"]


def _replanned(dataset, tmp_path) -> tuple[Path, str, float]:
    """The same plan with the stretch recipe re-planned under its key: its source window starts 1 s later."""
    import dataclasses

    from augment.recipe import read_plan, write_plan

    _, meta = read_plan(dataset["plan"])
    recipes = dict(dataset["recipes"])
    key = next(k for k, r in recipes.items() if r.kind == "stretch")
    old = recipes[key]
    seg = old.segments[0]
    seg = dataclasses.replace(seg, src_start_s=seg.src_start_s + 1.0)
    recipes[key] = dataclasses.replace(old, segments=(seg,), duration_s=(seg.src_end_s - seg.src_start_s) / seg.rate)
    path = tmp_path / "replanned.parquet"
    write_plan(path, [recipes[k] for k in sorted(recipes)], meta)
    return path, key, seg.src_start_s


@pytest.mark.slow
def test_a_replanned_recipe_is_encoded_again_nothing_stale_reused(dataset, encoded, tiny_clip_dir, tiny_vae_dir,
                                                                   tmp_path, capsys):
    import shutil

    from shards.shard_writer import read_tar_samples

    out = tmp_path / "shards"
    shutil.copytree(encoded, out)
    plan, key, new_start = _replanned(dataset, tmp_path)
    args = _args(dataset, out, tiny_clip_dir, tiny_vae_dir, "--workers", "1", "--with-mel")
    args[args.index("--plan") + 1] = str(plan)
    assert main(args) == 0
    assert "this run: 1 samples" in capsys.readouterr().out  # only the changed recipe was encoded
    before = {k: m for name in _shard_files(encoded) for k, m in read_tar_samples(encoded / name)}
    after = {k: m for name in _shard_files(out) for k, m in read_tar_samples(out / name)}
    assert sorted(after) == sorted(before) == dataset["encoded"]
    meta = json.loads(after[key]["json"])
    assert meta["augmentation"]["segments"][0]["src_start_s"] == new_start
    assert after[key]["audio.flac"] != before[key]["audio.flac"]
    assert all(after[k] == before[k] for k in after if k != key)  # the others were reused, byte for byte
    index = json.loads((out / "index.json").read_text())
    assert [(s["name"], s["sha256"]) for s in index["shards"]] == [
        (p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(out.glob("*.tar"))]


def test_a_ledger_without_the_columns_encode_reads_is_refused(tiny_clip_dir, tiny_vae_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ledger.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "status": ["ok", "ok"], "label": ["x", "y"]}), path)
    models = ["--clip-model", str(tiny_clip_dir), "--vae", str(tiny_vae_dir)]
    assert main(["--ledger", str(path), "--device", "cpu", "--workers", "1", *models]) == 2
    err = capsys.readouterr().err
    assert "missing columns" in err and "video_path" in err and "start_s" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "shards").exists()  # stopped before any work
    path.write_bytes(b"not parquet")
    assert main(["--ledger", str(path), "--device", "cpu", *models]) == 2
    assert "not a readable ledger" in capsys.readouterr().err


def test_a_bad_batch_size_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--ledger", str(tmp_path / "ledger.parquet"), "--out", str(tmp_path / "s"), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --batch-size: must be a whole number >= 1, got 0"
    assert not (tmp_path / "s").exists()


def test_a_plan_of_another_format_is_refused(dataset, tmp_path, capsys):
    import pyarrow.parquet as pq

    from augment.recipe import PLAN_META_KEY

    table = pq.read_table(dataset["plan"])
    meta = json.loads(table.schema.metadata[PLAN_META_KEY])
    assert meta["format"] == "v2a-plan/1"
    newer = tmp_path / "plan.parquet"
    pq.write_table(table.replace_schema_metadata({PLAN_META_KEY: json.dumps({**meta, "format": "v2a-plan/2"})}),
                   newer)
    assert main(["--ledger", str(dataset["ledger"]), "--plan", str(newer), "--out", str(tmp_path / "s"),
                 "--device", "cpu"]) == 2
    assert "v2a-plan/2" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_nothing_encoded_exits_nonzero(dataset, tiny_clip_dir, tiny_vae_dir, tmp_path, capsys):
    video = dataset["root"] / "video"
    ledger = write_ledger(tmp_path / "bad", [ledger_row("vggsound-gone-000000", video / "gone_000000.mp4"),
                                            ledger_row("vggsound-broken-000000", video / "broken_000000.mp4")])
    out = tmp_path / "bad" / "shards"
    assert main(["--ledger", str(ledger), "--out", str(out), "--clip-model", str(tiny_clip_dir), "--vae",
                 str(tiny_vae_dir), "--device", "cpu", "--workers", "1"]) == 1
    assert "nothing could be encoded" in capsys.readouterr().err
    assert [f["key"] for f in json.loads((out / "failed.json").read_text())] == dataset["failed"]
    assert json.loads((out / "index.json").read_text())["shards"] == []


def test_the_card_is_one_typed_record(encoded):
    from shards.card import CARD_FORMAT, CardError, DatasetCard

    text = (encoded / "card.json").read_text()
    card = DatasetCard.from_json(text)
    assert card.format == CARD_FORMAT and card.to_json() == text  # serialised once, read back the same
    assert card.members == ["audio.flac", "json", "latent.npy", "mel.npy", "text.npy", "vision-clip.npy"]
    assert card.vision_encoders["clip"]["dim"] == card.clip_dim and card.vision_encoders["clip"]["tokens"] == 20
    with pytest.raises(CardError, match="v2a-shards/9"):
        DatasetCard.from_json(json.dumps({**json.loads(text), "format": "v2a-shards/9"}))
