"""One metric logger, several sinks: JSONL (always), wandb and TensorBoard (optional).

``MetricLogger.log(row)`` takes a flat dict of Python numbers (metric names
carry their units: ``time/sample_s``, ``traj_per_s``, ...) with an integer
``step`` and hands it to every sink. Only the driver / rank 0 writes:
``MetricLogger.for_rank(rank, ...)`` returns a no-op logger on other ranks.

* ``JsonlSink``: one JSON object per line in ``RUN_DIR/metrics.jsonl``, each row one
  ``write`` of a whole line; on a full disk the row is skipped and ``DiskFullError``
  raised. ``read_metrics`` skips a torn last line; ``truncate_metrics_after``
  drops rows past a checkpoint's step on resume.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfn_dist.files import DISK_FULL_ERRNOS, DiskFullError, atomic_write_bytes

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
    """Appends rows to ``path`` as JSON lines, each whole or not at all.

    Each row is one ``os.write`` of a complete line on a file opened with
    ``O_APPEND`` (no user-space buffer to flush): a reader never sees half a
    row unless the process dies inside that one system call. If the write
    fails part-way (disk full), the file is truncated back to its previous end.
    A torn last line left by an earlier crash is cut off when the file is
    opened, so appended rows start on a line of their own.

    Args:
        path: the JSONL file (created, mode 0600, with missing parents).
        stop_on_disk_full: on ENOSPC / EDQUOT, skip the row with a warning and
            raise ``DiskFullError``; False keeps going, skipping rows (one warning).

    Raises:
        OSError: if the file cannot be opened.
    """

    def __init__(self, path: str | Path, stop_on_disk_full: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stop_on_disk_full = stop_on_disk_full
        self.rows_skipped = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        _cut_torn_tail(self.path, self._fd)

    def write(self, row: dict) -> None:
        """Appends ``row`` as one line.

        Raises:
            DiskFullError: the disk is full and ``stop_on_disk_full`` (the row is skipped).
            OSError: any other write error.
        """
        data = (json.dumps(row) + "\n").encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            done = 0
            while done < len(data):  # a regular file takes it in one call unless the disk fills up
                done += os.write(self._fd, data[done:])
        except OSError as err:
            if done:
                os.ftruncate(self._fd, start)  # no torn row
            if err.errno not in DISK_FULL_ERRNOS:
                raise
            self.rows_skipped += 1
            msg = f"disk full: cannot write {self.path} (row of step {row.get('step')} skipped)"
            if self.stop_on_disk_full:
                logger.warning("metrics: %s", msg)
                raise DiskFullError(err.errno, msg) from None
            if self.rows_skipped == 1:
                logger.warning("metrics: %s; later rows are skipped while it stays full", msg)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _cut_torn_tail(path: Path, fd: int) -> None:
    """Truncates a last line without its newline (a row torn by a crash), with a warning."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as f:
        pos = size
        while pos > 0:  # find the last newline, reading backwards
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == size and chunk.endswith(b"\n"):
                return
            i = chunk.rfind(b"\n")
            if i >= 0:
                pos = pos - step + i + 1
                break
            pos -= step
    logger.warning("%s: dropped a torn last line (%d bytes) left by an earlier crash", path, size - pos)
    os.ftruncate(fd, pos)


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
        config: dict | None = None,
        entity: str | None = None,
        name: str | None = None,
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
            project=project,
            entity=entity,
            name=name or run_dir.name,
            id=run_id,
            resume="allow",
            mode=mode,  # type: ignore[arg-type]  # wandb's Literal; the config checks the mode
            dir=str(run_dir),
            config=config,
            reinit="create_new",
            settings=wandb.Settings(silent=True),
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

    def __init__(self, sinks: list | None = None) -> None:
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
        config: dict | None = None,
        wandb_entity: str | None = None,
        wandb_name: str | None = None,
    ) -> MetricLogger:
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
    def from_config(cls, cfg, run_dir: str | Path, rank: int = 0) -> MetricLogger:
        """The sinks ``cfg.logging`` (of a ``TrainConfig``) asks for; no sinks on ranks > 0."""
        from gfn_dist.config import to_dict

        w = cfg.logging.wandb
        return cls.for_rank(
            rank,
            run_dir,
            w.mode,
            cfg.logging.tensorboard,
            w.project,
            to_dict(cfg) if rank == 0 else None,
            w.entity,
            w.name,
        )

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

    def warn(self, message: str) -> None:
        """A warning from rank 0 for the run's log (this logger lives in the driver / rank 0's process)."""
        logger.warning("%s", message)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # a sink failing to close must not hide the run's result
                logger.warning("metric sink %s failed to close: %s", type(sink).__name__, err)
        self.sinks = []


def _parse_lines(path: Path) -> tuple[list[dict], int]:
    """Rows of ``path`` and the number of lines skipped (each with a warning).

    A last line without its newline is a row torn by a crash or a full disk;
    a line that is not a JSON object (a torn row that an older writer then
    appended to) is skipped too, naming its line number.

    Raises:
        OSError: if the file cannot be read.
    """
    lines = Path(path).read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: b"" unless the last row is torn
    rows, bad = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i)
    if bad:
        logger.warning("%s: skipped %d corrupt line(s) (line %s)", path, len(bad), ", ".join(map(str, bad[:5])))
    if tail.strip():
        logger.warning("%s: skipped a torn last line (%d bytes, no newline)", path, len(tail))
    return rows, len(bad) + (1 if tail.strip() else 0)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file, skipping a torn last line (a crash or full disk mid-write)
    and corrupt lines, each with a warning naming the file.

    Raises:
        OSError: if the file cannot be read (FileNotFoundError if missing).
    """
    return _parse_lines(Path(path))[0]


def read_jsonl(path: str | Path) -> list[dict]:
    """``read_metrics`` (the older name)."""
    return read_metrics(path)


def truncate_metrics_after(path: str | Path, step: int) -> int:
    """Drops the rows of ``path`` with ``row["step"] > step`` (and a torn last line), for a resume.

    A resumed run continues after the checkpoint's ``step``; rows written past
    it by the interrupted run would otherwise appear twice. The file is
    replaced atomically (temporary file, fsync, rename, directory fsync): a
    crash leaves the old or the new content. Call it before the metrics sink
    opens the file. A missing file is left missing.

    Args:
        path: ``RUN_DIR/metrics.jsonl``.
        step: the learner step of the checkpoint resumed from.

    Returns:
        the number of rows dropped.

    Raises:
        OSError: if the file cannot be read or replaced (e.g. disk full: it is then unchanged).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    rows, skipped = _parse_lines(path)
    kept = [r for r in rows if not (isinstance(r.get("step"), (int, float)) and r["step"] > step)]
    if len(kept) == len(rows) and not skipped:
        return 0
    mode = path.stat().st_mode & 0o777
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"), mode)
    logger.info("%s: dropped %d rows past step %d (resumed from it)", path, len(rows) - len(kept), step)
    return len(rows) - len(kept)
