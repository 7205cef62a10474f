"""``python -m pipeline.demo`` (what ``make demo`` runs): every stage end to end on the sample.

It runs the real command-line tools, exactly as a user types them (each command is printed),
on the bundled synthetic dataset: clean (on local Ray), augment (plan + two renders), encode
(WebDataset shards), train (a few steps of the tiny UNet under torchrun) and sample (one
soundtrack). Where pretrained weights cannot be loaded here (no cache, no network) it says so
loudly and uses ``--clap-model none`` and tiny random-weight encoders; their output is
plumbing, not sound.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

BANNER = "!" * 78


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def _loud(message: str) -> None:
    print(f"\n{BANNER}\n{message}\n{BANNER}", flush=True)


def _clap_model() -> str:
    from filters.clap import ClapConfig, ClapModelUnavailable, check_available

    try:
        check_available(ClapConfig())
        return ClapConfig().model
    except ClapModelUnavailable as e:
        _loud("CLAP weights (laion/clap-htsat-unfused) are not available here, so this demo cleans with "
              f"--clap-model none: no semantic filter, clap_score is missing.\n({str(e).splitlines()[0]})")
        return "none"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--data", type=Path, default=Path("data/sample"))
    p.add_argument("--runner", default="ray", choices=("local", "ray", "beam"))
    p.add_argument("--train-steps", type=int, default=6)
    args = p.parse_args(argv)
    py = sys.executable
    out, clean_out = args.out, args.out / "clean"

    if not (args.data / "sample_manifest.json").exists():
        _run([py, "-m", "pipeline.sample", "--out", str(args.data)])
    clap_model = _clap_model()
    _run([py, "-m", "pipeline.clean", "--dataset", "sample", "--root", str(args.data), "--out", str(clean_out),
          "--runner", args.runner, "--workers", "2", "--clap-model", clap_model])

    plan = clean_out / "plan.parquet"
    _run([py, "-m", "pipeline.augment", "plan", "--ledger", str(clean_out / "ledger.parquet"), "--out", str(plan)])
    renders = {}
    for kind in ("concat", "stretch"):
        renders[kind] = out / "augment" / f"{kind}.mp4"
        _run([py, "-m", "pipeline.augment", "render", "--plan", str(plan), "--kind", kind, "--out", str(renders[kind])])

    shards = out / "shards"
    _loud("ENCODE: pretrained CLIP / AudioLDM VAE weights are used when they can be loaded; otherwise the demo "
          "builds TINY RANDOM-WEIGHT encoders (--allow-random-weights, recorded in card.json). Such features "
          "only prove the plumbing.")
    _run([py, "-m", "pipeline.encode", "--ledger", str(clean_out / "ledger.parquet"), "--plan", str(plan),
          "--out", str(shards), "--allow-random-weights", "--shard-size", "8", "--workers", "2"])
    card = json.loads((shards / "card.json").read_text())

    run_dir = out / "train"
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
          "--shards", str(shards), "--out", str(run_dir), "--unet-config", str(Path(__file__).parents[1] / "train" / "configs" / "tiny_unet.json"),
          "--batch-size", "2", "--max-steps", str(args.train_steps), "--ckpt-every", str(args.train_steps),
          "--warmup-steps", "2", "--val-every", str(args.train_steps), "--val-samples", "8", "--workers", "0",
          "--log-every", "1", "--lr", "1e-3"])

    ledger = pd.read_parquet(clean_out / "ledger.parquet")
    video = ledger.loc[ledger["status"] == "ok", "video_path"].iloc[0]
    wav, muxed = out / "generated" / "soundtrack.wav", out / "generated" / "with_sound.mp4"
    _loud("SAMPLE: the model was trained for a few steps on random-weight features"
          if card.get("random_weights") else "SAMPLE: a few training steps only: expect noise, not sound")
    sample_cmd = [py, "-m", "train.sample", "--ckpt", str(run_dir), "--video", str(video), "--out", str(wav),
                  "--mux", str(muxed), "--steps", "10"]
    _run(sample_cmd + (["--allow-random-weights"] if card.get("random_weights") else []))

    print("\n== demo outputs")
    for name, path in [("ledger", clean_out / "ledger.parquet"), ("report", clean_out / "report.html"),
                       ("plan", plan), ("concat render", renders["concat"]), ("stretch render", renders["stretch"]),
                       ("shards", shards), ("dataset card", shards / "card.json"), ("training run", run_dir),
                       ("soundtrack", wav), ("video with sound", muxed), ("evaluation", wav.parent / "eval")]:
        print(f"   {name:17s} {path}")
    _loud("EVALUATE: PANNs / VGGish / PaSST / Synchformer / CAVP / MS-CLAP weights are used when MODELS_DIR has them (python -m core.registry check); "
          "otherwise RANDOM weights (--allow-random-weights), flagged in the table and summary.json.")
    _run([py, "-m", "train.evaluate", "--generated", str(wav.parent), "--clap-model", clap_model,
          "--cavp", "--allow-random-weights", "--is-splits", "1"])  # the demo ends with the evaluation table
    return 0


if __name__ == "__main__":
    sys.exit(main())
