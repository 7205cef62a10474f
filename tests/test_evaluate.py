"""``python -m train.evaluate``: per-clip and set metrics in one run, models resolved before any work."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_panns import _random_release  # noqa: E402
from test_passt import _tiny_release as _tiny_passt  # noqa: E402
from test_vggish import TINY as TINY_VGGISH  # noqa: E402
from test_msclap import KEYS as MSCLAP_KEYS, TINY as TINY_MSCLAP, _tokenizer_dir  # noqa: E402

from core.models import file_sha256  # noqa: E402
from metrics.divergence import kl_sigmoid, kl_softmax  # noqa: E402
from metrics.frechet import frechet_distance_of  # noqa: E402
from metrics.panns import PannsScorer  # noqa: E402
from metrics.vggish import Vggish, VggishScorer  # noqa: E402
from metrics.desync import DesyncScorer, sync_request  # noqa: E402
from metrics.passt import PasstScorer  # noqa: E402
from metrics.msclap import MsClap, release_to_project, size_of  # noqa: E402
from metrics.pam import PamScorer, prompt_tokens  # noqa: E402
from metrics.synchformer import Synchformer, SynchformerSize  # noqa: E402
from core.decode import decode  # noqa: E402
from train.evaluate import main, metric_audio, read_audio  # noqa: E402

VIDEOS = sorted((Path(__file__).parent / "data" / "vggsound" / "video").glob("*.mp4"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Four generated outputs (16 kHz wav + sidecar), references for three of them (two wav, one real
    video), one extra reference, and a tiny PANNs checkpoint in the released layout."""
    base = tmp_path_factory.mktemp("evaluate")
    gen, ref = base / "generated", base / "reference"
    gen.mkdir()
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        t = np.arange(16000 * 2) / 16000
        audio = (0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        sf.write(gen / f"clip{i}.wav", audio, 16000)
        (gen / f"clip{i}.json").write_text(json.dumps({"video": str(VIDEOS[i % len(VIDEOS)]), "caption": "a dog barking",
                                                       "random_weights": []}))
    for i in (0, 1):  # references at 44.1 kHz stereo: resampled and mixed like any user file
        stereo = (0.2 * rng.standard_normal((44100 * 2, 2))).astype(np.float32)
        sf.write(ref / f"clip{i}.wav", stereo, 44100)
    (ref / "clip2.mp4").symlink_to(VIDEOS[0])  # a real video: its audio track is the reference
    sf.write(ref / "extra.flac", (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32), 16000)
    _random_release(base / "Cnn14_16k_mAP=0.438.pth", seed=3)
    g = torch.Generator().manual_seed(4)
    torch.save({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in Vggish(**TINY_VGGISH).state_dict().items()},
               base / "vggish-tiny.pth")
    _tiny_passt(base / "passt-tiny.pt", seed=5)
    return gen, ref, base / "Cnn14_16k_mAP=0.438.pth"


def _run(setup, tmp_path, *extra):
    gen, ref, weights = setup
    return main(["--generated", str(gen), "--reference", str(ref), "--out", str(tmp_path / "eval"),
                 "--panns-weights", str(weights), "--vggish-weights", str(weights.with_name("vggish-tiny.pth")),
                 "--passt-weights", str(weights.with_name("passt-tiny.pt")),
                 "--no-av-align", "--no-desync", "--no-pam", "--clap-model", "none", "--is-splits", "2", *extra])


def test_set_and_clip_metrics_reproduce_their_definitions(setup, tmp_path, capsys):
    gen, ref, weights = setup
    assert _run(setup, tmp_path) == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "eval" / "eval.csv"))}
    assert set(rows) == {"clip0", "clip1", "clip2", "clip3"}
    scorer = PannsScorer.load(weights)
    g = {n: scorer.embed(metric_audio(gen / f"{n}.wav", 16000, 10.0)) for n in rows}
    r = {p.stem: scorer.embed(metric_audio(p, 16000, 10.0)) for p in ref.iterdir()}
    assert set(r) == {"clip0", "clip1", "clip2", "extra"}
    for n in ("clip0", "clip1", "clip2"):
        assert float(rows[n]["kl_softmax_panns"]) == pytest.approx(kl_softmax(g[n][1], r[n][1])[0], rel=1e-6)
        assert float(rows[n]["kl_sigmoid_panns"]) == pytest.approx(kl_sigmoid(g[n][1], r[n][1])[0], rel=1e-6)
    assert rows["clip3"]["kl_softmax_panns"] == "" and "no reference clip" in rows["clip3"]["reason"]

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    m = summary["metrics"]
    fd = frechet_distance_of(np.stack([g[n][0] for n in sorted(g)]), np.stack([r[n][0] for n in sorted(r)]))
    assert m["fd_panns"]["value"] == pytest.approx(fd, rel=1e-6) and m["fd_panns"]["n"] == 4
    assert m["fd_panns"]["settings"]["reference_clips"] == 4
    assert m["kl_softmax_panns"]["n"] == 3
    assert m["kl_softmax_panns"]["value"] == pytest.approx(
        np.mean([float(rows[n]["kl_softmax_panns"]) for n in ("clip0", "clip1", "clip2")]))
    assert m["is_panns"]["value"] >= 1.0 and m["is_panns"]["settings"]["splits"] == 2
    for name in ("fd_panns", "kl_softmax_panns", "kl_sigmoid_panns", "is_panns"):
        assert m[name]["weights_sha256"] == file_sha256(weights) and "PANNs CNN14" in m[name]["model"]
    vgg = VggishScorer.load(weights.with_name("vggish-tiny.pth"))
    gen_ex = np.concatenate([vgg.embed(metric_audio(gen / f"{n}.wav", 16000, 10.0)) for n in sorted(rows)])
    ref_ex = np.concatenate([vgg.embed(metric_audio(p, 16000, 10.0)) for p in sorted(ref.iterdir(), key=lambda p: p.stem)])
    assert m["fad_vggish"]["value"] == pytest.approx(frechet_distance_of(gen_ex, ref_ex), rel=1e-6)
    assert m["fad_vggish"]["settings"]["generated_examples"] == len(gen_ex) == 8  # 2 s clips: 2 examples each
    assert m["fad_vggish"]["weights_sha256"] == file_sha256(weights.with_name("vggish-tiny.pth"))
    passt = PasstScorer.load(weights.with_name("passt-tiny.pt"))
    pg = {n: passt.embed(metric_audio(gen / f"{n}.wav", 32000, 10.0)) for n in rows}
    pr = {p.stem: passt.embed(metric_audio(p, 32000, 10.0)) for p in ref.iterdir()}
    assert float(rows["clip2"]["kl_softmax_passt"]) == pytest.approx(kl_softmax(pg["clip2"][1], pr["clip2"][1])[0],
                                                                     rel=1e-5)
    fd_passt = frechet_distance_of(np.stack([pg[n][0] for n in sorted(pg)]), np.stack([pr[n][0] for n in sorted(pr)]))
    assert m["fd_passt"]["value"] == pytest.approx(fd_passt, rel=1e-5)
    assert m["is_passt"]["value"] >= 1.0 and m["fd_passt"]["settings"]["sample_rate"] == 32000
    assert m["clap"]["value"] is None and m["clap"]["reason"] == "clap_disabled"
    assert summary["random_weights"] == []
    table = capsys.readouterr().out
    for name in ("fd_panns", "fad_vggish", "fd_passt", "kl_softmax_panns", "kl_sigmoid_panns", "kl_softmax_passt",
                 "is_panns", "is_passt", "clap"):
        assert name in table
    assert f"{m['fd_panns']['value']:.4f}" in table


def test_missing_models_stop_before_any_work_and_are_all_named(setup, tmp_path, capsys):
    gen, ref, _ = setup
    rc = main(["--generated", str(gen), "--reference", str(ref), "--out", str(tmp_path / "eval"),
               "--models-dir", str(tmp_path / "no-models"), "--clap-model", str(tmp_path / "no-clap"),
               "--msclap-text", str(tmp_path / "no-gpt2")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "panns_cnn14_16k" in err and "zenodo.org/record/3987831" in err
    assert "vggish" in err and "torchvggish/releases" in err and "passt" in err and "kkoutini/PaSST" in err
    assert "clap" in err and str(tmp_path / "no-clap") in err and "core.registry check" in err
    assert "synchformer" in err and "synchformer_state_dict.pth" in err
    assert "msclap:" in err and "CLAP_weights_2023.pth" in err and "--msclap-weights" in err
    assert "msclap_text" in err and str(tmp_path / "no-gpt2") in err
    assert not (tmp_path / "eval").exists()  # nothing was scored or written


def test_too_few_clips_leave_is_empty_with_the_reason(setup, tmp_path):
    assert _run(setup, tmp_path, "--is-splits", "10") == 0
    m = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]
    assert m["is_panns"]["value"] is None and "--is-splits=10" in m["is_panns"]["reason"]


@pytest.mark.slow  # builds the full-size CNN14 (80 M parameters) with random weights
def test_random_weights_are_flagged(setup, tmp_path, capsys):
    gen, _, _ = setup
    rc = main(["--generated", str(gen), "--out", str(tmp_path / "eval"), "--models-dir", str(tmp_path / "none"),
               "--allow-random-weights", "--no-av-align", "--clap-model", "none", "--is-splits", "2",
               "--msclap-text", str(tmp_path / "no-gpt2")])
    assert rc == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["random_weights"] == ["PANNs", "PaSST", "Synchformer", "VGGish"]
    assert "RANDOM WEIGHTS" in summary["metrics"]["desync"]["model"]
    assert "RANDOM WEIGHTS" in summary["metrics"]["fad_vggish"]["model"]
    assert "RANDOM WEIGHTS" in summary["metrics"]["is_panns"]["model"]
    assert summary["metrics"]["fd_panns"]["value"] is None  # no --reference
    pam = summary["metrics"]["pam"]  # no offline stand-in for GPT-2's tokenizer: skipped, saying why
    assert pam["value"] is None and "no GPT-2 tokenizer" in pam["reason"] and str(tmp_path / "no-gpt2") in pam["reason"]
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.out and "RANDOM WEIGHTS" in captured.err


def test_desync_per_clip_and_set_as_av_benchmark(tmp_path, capsys):
    """Two 5 s outputs on real videos (one starting 2 s in) and one of 3 s (too short: empty, with
    the reason); a tiny Synchformer in the release's layout (32 px input)."""
    gen = tmp_path / "generated"
    gen.mkdir()
    rng = np.random.default_rng(0)
    for name, seconds, video, start in (("a", 5.0, VIDEOS[0], 0.0), ("b", 5.0, VIDEOS[4], 2.0), ("c", 3.0, VIDEOS[1], 0.0)):
        sf.write(gen / f"{name}.wav", (0.1 * rng.standard_normal(int(22050 * seconds))).astype(np.float32), 22050)
        (gen / f"{name}.json").write_text(json.dumps({"video": str(video), "start_s": start, "caption": "x"}))
    size = SynchformerSize(dim=32, video_depth=1, video_heads=2, audio_depth=1, audio_heads=2, sync_depth=1,
                           sync_heads=2, image_size=32)
    g = torch.Generator().manual_seed(7)
    weights = tmp_path / "synchformer_state_dict.pth"
    torch.save({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in Synchformer(size).state_dict().items()},
               weights)
    rc = main(["--generated", str(gen), "--out", str(tmp_path / "eval"), "--desync-weights", str(weights),
               "--no-panns", "--no-vggish", "--no-passt", "--no-pam", "--no-av-align", "--clap-model", "none"])
    assert rc == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "eval" / "eval.csv"))}
    scorer = DesyncScorer.load(weights)
    for name, start in (("a", 0.0), ("b", 2.0)):
        meta = json.loads((gen / f"{name}.json").read_text())
        frames = decode(meta["video"], sync_request(start, audio=False, duration_s=5.0, size=32)).rgb
        assert frames.shape == (125, 32, 32, 3)  # the 5 s of the wav, at 25 fps (the tiny model's 32 px)
        expected = scorer.score(frames, read_audio(gen / f"{name}.wav", 16000, resampler="torchaudio"))
        assert float(rows[name]["desync"]) == pytest.approx(expected.desync)
        assert float(rows[name]["desync_first_s"]) == pytest.approx(expected.first_s)
        assert float(rows[name]["desync_last_s"]) == pytest.approx(expected.last_s)
    assert rows["c"]["desync"] == "" and "desync: needs 4.8 s" in rows["c"]["reason"]
    m = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]["desync"]
    assert m["n"] == 2 and m["value"] == pytest.approx((float(rows["a"]["desync"]) + float(rows["b"]["desync"])) / 2)
    assert m["weights_sha256"] == file_sha256(weights) and m["settings"]["fps"] == 25.0
    assert "desync" in capsys.readouterr().out


_HTSAT = "audio_encoder.base.htsat."
_TO_RELEASE = ((r"^batch_norm\.", "bn0."), (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
               (r"\.attention\.self\.relative_position_", ".attn.relative_position_"),
               (r"\.attention\.output\.dense\.", ".attn.proj."), (r"\.intermediate\.dense\.", ".mlp.fc1."),
               (r"\.output\.dense\.", ".mlp.fc2."))


def _release_layout(model: MsClap) -> dict[str, torch.Tensor]:
    """A model's state dict under CLAP_weights_2023.pth's names: HTSAT's Swin names, query/key/value as one qkv."""
    out, qkv = {}, {}
    for key, value in model.state_dict().items():
        if not key.startswith(_HTSAT + "encoder."):
            out[key] = value
            continue
        name = key[len(_HTSAT + "encoder."):]
        m = re.match(r"(.*)\.attention\.self\.(query|key|value)\.(weight|bias)$", name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _TO_RELEASE:
            name = re.sub(pattern, repl, name)
        out[_HTSAT + name] = value
    for (block, kind), parts in qkv.items():
        out[f"{_HTSAT}{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    out[_HTSAT + "head.weight"] = torch.zeros(527, 527)  # the AudioSet head the loader drops
    return out


def test_pam_per_clip_and_set_from_a_release_layout_checkpoint(tmp_path, capsys):
    """A tiny random MS-CLAP saved under the release's key names (its size read back from the shapes) and a
    GPT-2-style tokenizer folder: each clip's PAM is metrics.pam's scorer on the same 44.1 kHz audio
    (two short outputs, one stereo at 22.05 kHz, one mono at 16 kHz: each one tiled 7 s window)."""
    gen = tmp_path / "generated"
    gen.mkdir()
    rng = np.random.default_rng(5)
    sf.write(gen / "s.wav", (0.1 * rng.standard_normal((22050 * 2, 2))).astype(np.float32), 22050)
    sf.write(gen / "m.wav", np.sin(np.arange(16000 * 1.5) * 0.05).astype(np.float32) * 0.3, 16000)
    for name in ("s", "m"):
        (gen / f"{name}.json").write_text(json.dumps({"video": str(VIDEOS[0]), "caption": "x"}))
    torch.manual_seed(11)
    model = MsClap(TINY_MSCLAP).eval()
    state = _release_layout(model)
    assert size_of(state) == TINY_MSCLAP
    assert set(release_to_project(state)) == set(model.state_dict())
    general = {re.sub(r"\.\d+\.", ".N.", k) for k in json.loads(MSCLAP_KEYS.read_text())}
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in state} <= general  # only names the release has
    weights = tmp_path / "CLAP_weights_2023.pth"
    torch.save({"model": state}, weights)
    (tmp_path / "gpt2").mkdir()
    tok = _tokenizer_dir(tmp_path / "gpt2")
    rc = main(["--generated", str(gen), "--out", str(tmp_path / "eval"), "--msclap-weights", str(weights),
               "--msclap-text", str(tok), "--no-panns", "--no-vggish", "--no-passt", "--no-desync", "--no-av-align",
               "--clap-model", "none"])
    assert rc == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "eval" / "eval.csv"))}
    scorer = PamScorer(model, *prompt_tokens(AutoTokenizer.from_pretrained(str(tok))))  # the model as saved
    for name, row in rows.items():
        expected = scorer.score(read_audio(gen / f"{name}.wav", 44100, resampler="torchaudio")).score
        assert float(row["pam"]) == pytest.approx(expected, rel=1e-6) and 0 < expected < 1
    m = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]["pam"]
    assert set(rows) == {"s", "m"} and m["n"] == 2
    assert m["value"] == pytest.approx(np.mean([float(r["pam"]) for r in rows.values()]))
    assert m["weights_sha256"] == file_sha256(weights) and "MS-CLAP 2023" in m["model"]
    assert "RANDOM" not in m["model"]
    assert m["settings"]["sample_rate"] == 44100 and m["settings"]["window_s"] == 7
    assert m["settings"]["prompts"][0] == "the sound is clear and clean."
    assert m["settings"]["scale"] == pytest.approx(1 / 0.07)
    assert "pam" in capsys.readouterr().out


def test_text_to_audio_outputs_get_the_audio_metrics_only(setup, tmp_path):
    """train.sample --caption writes "video": null: the video metrics are skipped, not crashed on."""
    import shutil

    gen, ref, weights = setup
    tta = tmp_path / "tta"
    tta.mkdir()
    for i in (0, 1):
        shutil.copy(gen / f"clip{i}.wav", tta / f"clip{i}.wav")
    (tta / "clip0.json").write_text(json.dumps({"video": None, "caption": "a dog barking", "random_weights": []}))
    (tta / "clip1.json").write_text(json.dumps({"video": str(VIDEOS[0]), "caption": "x", "random_weights": []}))
    rc = main(["--generated", str(tta), "--reference", str(ref), "--out", str(tmp_path / "eval"),
               "--panns-weights", str(weights), "--vggish-weights", str(weights.with_name("vggish-tiny.pth")),
               "--passt-weights", str(weights.with_name("passt-tiny.pt")),
               "--no-desync", "--no-pam", "--clap-model", "none", "--is-splits", "1"])
    assert rc == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "eval" / "eval.csv"))}
    assert rows["clip0"]["av_align_fast"] == "" and "text-to-audio: no video" in rows["clip0"]["reason"]
    assert rows["clip0"]["kl_softmax_panns"] != ""  # the audio metrics still ran
    assert rows["clip1"]["av_align_fast"] != ""
