"""The models of ``python -m train.evaluate``: all resolved and loaded before the first clip is read."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from core.models import ModelUnavailable, file_sha256
from core.registry import require
from filters.clap import ClapConfig, ClapModelUnavailable, ClapScorer
from metrics.cavp import Cavp, CavpScorer, CavpSize
from metrics.desync import DesyncScorer
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
    if problems:
        raise ModelUnavailable("train.evaluate", "these models are needed and missing (nothing was scored):\n"
                               + "\n".join(problems) + "\n`python -m core.registry check` lists every model.")
    return models
