"""One metric logger, several sinks: JSONL (always), wandb and TensorBoard (optional).

``MetricLogger.log(row)`` takes a flat dict of Python numbers (metric names
carry their units: ``time/sample_s``, ``traj_per_s``, ...) with an integer
``step`` and hands it to every sink. Only the driver / rank 0 writes:
``MetricLogger.for_rank(rank, ...)`` returns a no-op logger on other ranks.

* ``JsonlSink``: one JSON object per line in ``RUN_DIR/metrics.jsonl``, flushed per row.
* ``WandbSink``: ``wandb.init(mode=offline|online)``, imported lazily.
* ``TensorBoardSink``: ``torch.utils.tensorboard.SummaryWriter`` under ``RUN_DIR/tb``, imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)


def _clean(row: Mapping[str, Any]) -> dict:
    """Plain JSON-safe numbers; non-finite floats are dropped (JSON has no NaN)."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


class JsonlSink:
    """Appends rows to ``path`` as JSON lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class WandbSink:
    """Weights & Biases run (``mode`` offline or online)."""

    def __init__(self, run_dir: Path, mode: str, project: str, config: Optional[dict]) -> None:
        import wandb  # lazy: only when enabled

        self._wandb = wandb
        self._run = wandb.init(project=project, mode=mode, dir=str(run_dir), config=config, reinit=True)

    def write(self, row: dict) -> None:
        self._run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink:
    """TensorBoard event files under ``RUN_DIR/tb``."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: needs the tensorboard package

        self._writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def write(self, row: dict) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


class MetricLogger:
    """Fans rows out to sinks.

    Args:
        sinks: objects with ``write(row)`` and ``close()``.
    """

    def __init__(self, sinks: Optional[list] = None) -> None:
        self.sinks = list(sinks or [])
        self.last_row: dict = {}

    @classmethod
    def for_rank(
        cls,
        rank: int,
        run_dir: str | Path,
        wandb_mode: str = "disabled",
        tensorboard: bool = False,
        project: str = "gfn_dist",
        config: Optional[dict] = None,
    ) -> "MetricLogger":
        """Rank 0: JSONL (+ optional wandb / TensorBoard); other ranks: no sinks."""
        if rank != 0:
            return cls([])
        run_dir = Path(run_dir)
        sinks: list = [JsonlSink(run_dir / "metrics.jsonl")]
        if wandb_mode != "disabled":
            sinks.append(WandbSink(run_dir, wandb_mode, project, config))
        if tensorboard:
            sinks.append(TensorBoardSink(run_dir))
        return cls(sinks)

    def log(self, row: Mapping[str, Any]) -> None:
        """Writes ``row`` (must hold ``step``) to every sink.

        Raises:
            ValueError: if ``row`` has no ``step``.
        """
        if "step" not in row:
            raise ValueError("MetricLogger.log: the row needs a 'step'")
        clean = _clean(row)
        self.last_row = clean
        for sink in self.sinks:
            sink.write(clean)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # a sink failing to close must not hide the run's result
                logger.warning("metric sink %s failed to close: %s", type(sink).__name__, err)
        self.sinks = []


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
