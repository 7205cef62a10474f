"""DeSync as an optional ``pipeline.clean`` score: Synchformer's offset of each clip's own sound.

The stage only records ``desync`` (mean |offset| s of the first and last 4.8 s) and the two
offsets; ``--desync-max`` decides later from the stored scores (``filters.rules``), so the
threshold can change without rescoring. A clip under 4.8 s keeps the score empty (never filtered).
It decodes the clip a second time at 25 fps / 224 px / 16 kHz (the AV-Align decode is 64 px greyscale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.cli_config import ConfigError
from core.decode import DecodeError, decode
from core.device import wants_gpu
from core.stage import OK, Resources, Row, Stage, mark_failed

if TYPE_CHECKING:  # metrics.desync imports torch: only the workers that score need it, not `--help`
    from metrics.desync import DesyncScorer

COLUMNS = ("desync", "desync_first_s", "desync_last_s")


@dataclass(frozen=True)
class DesyncConfig:
    """DeSync scoring in ``pipeline.clean`` (off by default; ``--desync-max`` turns it on)."""

    score: bool = field(default=False, metadata={
        "help": "score DeSync (Synchformer, needs its weights) into the ledger without filtering on it"})
    weights: str = field(default="", metadata={
        "help": "synchformer_state_dict.pth (default: MODELS_DIR/synchformer/, see python -m core.registry check)"})
    models_dir: str = field(default="", metadata={
        "help": "folder of release checkpoints (default: $V2A_MODELS or ~/.cache/v2a/models)"})
    device: str = field(default="cpu", metadata={"help": "device of the Synchformer (cpu, cuda, cuda:N)"})
    chunk: int = field(default=8, metadata={"help": "segments per Synchformer forward pass"})

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ConfigError("chunk", f"must be >= 1, got {self.chunk}")


class DesyncStage(Stage):
    """Synchformer's predicted offset of every decoded row (status ok) against its own video."""

    name = "desync"
    uses_model = True
    reads = ("video_path", "start_s", "duration_s")
    writes = COLUMNS

    def __init__(self, config: DesyncConfig, weights_path: str):
        self.config, self.path = config, weights_path
        self.scorer: DesyncScorer | None = None
        self.resources = Resources(cpus=1.0, gpus=1.0 if wants_gpu(config.device) else 0.0, batch_size=1)

    def setup(self) -> None:
        from metrics.desync import DesyncScorer
        self.scorer = DesyncScorer.load(self.path, self.config.device)
        self.scorer.chunk = self.config.chunk

    def teardown(self) -> None:
        self.scorer = None

    def _score(self, row: Row) -> None:
        from metrics.desync import DURATION_S, SAMPLE_RATE, sync_request
        duration = row.get("duration_s")
        seconds = DURATION_S if duration is None or not math.isfinite(duration) else float(duration)
        try:
            clip = decode(row["video_path"], sync_request(float(row.get("start_s") or 0.0), duration_s=seconds,
                                                          size=self.scorer.model.size.image_size))
        except DecodeError as e:
            mark_failed(row, f"desync_error: {e.ledger_reason}")
            return
        try:
            result = self.scorer.score(clip.rgb, clip.audio[SAMPLE_RATE])
        except ValueError:  # under 4.8 s of video or sound: no score, never filtered
            return
        row.update(desync=result.desync, desync_first_s=result.first_s, desync_last_s=result.last_s)

    def process_batch(self, rows: list[Row]) -> list[Row]:
        if self.scorer is None:
            self.setup()
        for row in rows:
            if row.get("status") == OK:
                self._score(row)
        return rows
