"""The models of ``python -m train.evaluate``: all resolved and loaded before the first clip is read."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from core.models import ModelUnavailable, file_sha256, resolve_pretrained
from core.registry import default_spec, entry, require
from filters.clap import ClapConfig, ClapModelUnavailable, ClapScorer
from metrics.cavp import Cavp, CavpScorer, CavpSize
from metrics.desync import DesyncScorer
from metrics.msclap import MsClap, MsClapSize
from metrics.pam import PamScorer, prompt_tokens
from metrics.panns import Cnn14, PannsScorer
from metrics.passt import Passt, PasstScorer
from metrics.synchformer import Synchformer, SynchformerSize
from metrics.vggish import Vggish, VggishScorer
from train.config import EvalConfig

log = logging.getLogger("train.evaluate")


@dataclass
class Models:
    """Everything loaded before the first clip; ``random`` names models with random weights."""

    clap: ClapScorer | None = None
    clap_reason: str = ""
    panns: PannsScorer | None = None
    vggish: VggishScorer | None = None
    passt: PasstScorer | None = None
    desync: DesyncScorer | None = None
    cavp: CavpScorer | None = None
    pam: PamScorer | None = None
    pam_reason: str = ""
    sha256: dict[str, str | None] = field(default_factory=dict)
    random: list[str] = field(default_factory=list)


# the demo's random Synchformer: the release's structure at a width the CPU runs in seconds per clip
RANDOM_SYNCHFORMER = SynchformerSize(dim=64, video_depth=2, video_heads=4, audio_depth=2, audio_heads=4,
                                     sync_depth=1, sync_heads=4)

# the demo's random CAVP: the release's structure, one block per stage, narrow
RANDOM_CAVP = CavpSize(base=8, blocks=(1, 1, 1, 1), audio_width=8)

# attribute, registry name, label, loader, random-weights builder
RELEASES = (("panns", "panns_cnn14_16k", "PANNs", PannsScorer.load, lambda dev: PannsScorer(Cnn14().eval().to(dev), dev)),
            ("vggish", "vggish", "VGGish", VggishScorer.load, lambda dev: VggishScorer(Vggish().eval().to(dev), dev)),
            ("passt", "passt", "PaSST", PasstScorer.load, lambda dev: PasstScorer(Passt().eval().to(dev), dev)),
            ("desync", "synchformer", "Synchformer", DesyncScorer.load,
             lambda dev: DesyncScorer(Synchformer(RANDOM_SYNCHFORMER).eval().to(dev), dev)),
            ("cavp", "cavp", "CAVP", CavpScorer.load, lambda dev: CavpScorer(Cavp(RANDOM_CAVP).eval().to(dev), dev)))

# the demo's random MS-CLAP: the release's structure (GPT-2's vocabulary) at a width the CPU runs quickly
RANDOM_MSCLAP = MsClapSize(audio_dim=16, audio_depths=(1, 1, 1, 1), audio_heads=(1, 2, 2, 4), text_dim=64,
                           text_layers=1, text_heads=4, proj_dim=64)


def _load_release(cfg: EvalConfig, models: Models, problems: list[str], release) -> None:
    attr, name, label, loader, random_model = release
    try:
        path = require({name: getattr(cfg, f"{attr}_weights") or None}, cfg.models_dir)[name].path
        setattr(models, attr, loader(path, cfg.device))
        models.sha256[attr] = file_sha256(path)
    except ModelUnavailable as e:
        if not cfg.allow_random_weights:
            problems.append(e.cause.split("\n", 1)[-1])
            return
        log.warning("%s weights missing (%s); --allow-random-weights: RANDOM %s", label, e.cause, label)
        setattr(models, attr, random_model(cfg.device))
        models.sha256[attr] = None
        models.random.append(label)
    except ValueError as e:
        problems.append(f"  - {name}: {e}")


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _tokenizer(cfg: EvalConfig):
    """GPT-2's tokenizer (the ``msclap_text`` registry entry; its weights are not needed: MS-CLAP holds them)."""
    from transformers import AutoTokenizer

    spec = cfg.msclap_text or default_spec("msclap_text")
    folder = resolve_pretrained(spec, patterns=("*.json", "*.txt"), require=entry("msclap_text").files,
                                weights=False).path
    return AutoTokenizer.from_pretrained(str(folder))


def _load_pam(cfg: EvalConfig, models: Models, problems: list[str]) -> None:
    """PAM's MS-CLAP and tokenizer; with --allow-random-weights a missing checkpoint becomes a small random
    MS-CLAP, but a missing tokenizer (no offline stand-in is honest) skips PAM with the reason."""
    tokens = None
    try:
        tokens = prompt_tokens(_tokenizer(cfg))
    except ModelUnavailable as e:
        if cfg.allow_random_weights:
            models.pam_reason = f"pam skipped: no GPT-2 tokenizer (msclap_text): {e.cause}"
            log.warning("%s", models.pam_reason)
            return
        problems.append(f"  - msclap_text (GPT-2 tokenizer for PAM): {e.cause} (or --msclap-text FOLDER, or --no-pam)")
    except (OSError, ValueError) as e:
        problems.append(f"  - msclap_text: {_short(e)}")
    try:
        path = require({"msclap": cfg.msclap_weights or None}, cfg.models_dir)["msclap"].path
        model, models.sha256["pam"] = MsClap.load(path), file_sha256(path)
    except ModelUnavailable as e:
        if not cfg.allow_random_weights:
            problems.append(e.cause.split("\n", 1)[-1])
            return
        log.warning("MS-CLAP weights missing (%s); --allow-random-weights: RANDOM MS-CLAP", e.cause)
        model, models.sha256["pam"] = MsClap(RANDOM_MSCLAP), None
        models.random.append("MS-CLAP")
    except ValueError as e:
        problems.append(f"  - msclap: {e}")
        return
    if tokens is not None:
        models.pam = PamScorer(model, *tokens, device=cfg.device)


def load_models(cfg: EvalConfig, clap_cfg: ClapConfig) -> Models:
    """Resolve and load every model the asked metrics need; raise one error naming all that are missing."""
    models, problems = Models(), []
    if clap_cfg.enabled:
        try:
            models.clap = ClapScorer(clap_cfg).load()
        except ClapModelUnavailable as e:
            problems.append(f"  - clap: {e.cause} (or --clap-model none)")
    else:
        models.clap_reason = "clap_disabled"
    for release in RELEASES:
        if getattr(cfg, release[0]):
            _load_release(cfg, models, problems, release)
    if cfg.pam:
        _load_pam(cfg, models, problems)
    if problems:
        raise ModelUnavailable("train.evaluate", "these models are needed and missing (nothing was scored):\n"
                               + "\n".join(problems) + "\n`python -m core.registry check` lists every model.")
    return models
