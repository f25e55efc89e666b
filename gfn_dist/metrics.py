"""One metric logger, several sinks: JSONL (always), wandb and TensorBoard (optional).

``MetricLogger.log(row)`` takes a flat dict of Python numbers (metric names
carry their units: ``time/sample_s``, ``traj_per_s``, ...) with an integer
``step`` and hands it to every sink. Only the driver / rank 0 writes:
``MetricLogger.for_rank(rank, ...)`` returns a no-op logger on other ranks.

* ``JsonlSink``: one JSON object per line in ``RUN_DIR/metrics.jsonl``, flushed per row.
* ``WandbSink``: ``wandb.init(mode=offline|online, dir=RUN_DIR)``, imported lazily.
  Offline (the default of ``logging.wandb.mode``) needs no account and makes no
  network call: the run lands in ``RUN_DIR/wandb/offline-run-*`` (upload later
  with ``wandb sync``). A resumed run reuses the wandb run id kept in
  ``RUN_DIR/wandb/run_id``.
* ``TensorBoardSink``: ``torch.utils.tensorboard.SummaryWriter`` under ``RUN_DIR/tb``, imported lazily.

``MetricLogger.from_config(cfg, run_dir, rank)`` builds the sinks a
``TrainConfig``'s ``logging`` section asks for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
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
    """Weights & Biases run under ``RUN_DIR/wandb``.

    Args:
        run_dir: the run directory (wandb's ``dir``: what ``WANDB_DIR`` would set).
        mode: ``offline`` (local files only) or ``online``.
        project: wandb project.
        config: the resolved configuration (plain dicts), recorded with the run.
        entity: wandb team / user (online), None for the account's default.
        name: run name, None for the run directory's name.
    """

    def __init__(
        self,
        run_dir: str | Path,
        mode: str,
        project: str,
        config: Optional[dict] = None,
        entity: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        if mode not in ("offline", "online"):
            raise ValueError(f"logging.wandb.mode: WandbSink needs offline | online, got {mode!r}")
        os.environ.setdefault("WANDB_SILENT", "true")  # no banners / login prompts on the driver's terminal
        if mode == "offline":  # nothing leaves the machine, not even crash reports
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb  # lazy: only when enabled

        run_dir = Path(run_dir).resolve()
        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)  # before init: wandb infers the git root from dir
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self._run = wandb.init(
            project=project, entity=entity, name=name or run_dir.name, id=run_id, resume="allow", mode=mode,
            dir=str(run_dir), config=config, reinit="create_new", settings=wandb.Settings(silent=True),
        )

    @property
    def run_dir(self) -> Path:
        """This run's wandb directory (``RUN_DIR/wandb/offline-run-*`` offline)."""
        return Path(self._run.dir).parent

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
        wandb_entity: Optional[str] = None,
        wandb_name: Optional[str] = None,
    ) -> "MetricLogger":
        """Rank 0: JSONL (+ optional wandb / TensorBoard); other ranks: no sinks."""
        if rank != 0:
            return cls([])
        run_dir = Path(run_dir)
        out = cls([JsonlSink(run_dir / "metrics.jsonl")])
        try:
            if wandb_mode != "disabled":
                out.sinks.append(WandbSink(run_dir, wandb_mode, project, config, wandb_entity, wandb_name))
            if tensorboard:
                out.sinks.append(TensorBoardSink(run_dir))
        except BaseException:
            out.close()  # the sinks opened so far
            raise
        return out

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path, rank: int = 0) -> "MetricLogger":
        """The sinks ``cfg.logging`` (of a ``TrainConfig``) asks for; no sinks on ranks > 0."""
        from gfn_dist.config import to_dict

        w = cfg.logging.wandb
        return cls.for_rank(rank, run_dir, w.mode, cfg.logging.tensorboard, w.project,
                            to_dict(cfg) if rank == 0 else None, w.entity, w.name)

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
