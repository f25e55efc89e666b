"""Training progress on the driver: a tqdm bar on a terminal, text lines elsewhere.

``Progress`` is what the driver (the in-driver learner's loop, or the Ray
launcher's driver) reports to, once per learner step and with the metric row
on log steps::

    with Progress(total=cfg.learner.total_steps, initial=step, enabled=cfg.logging.progress_bar) as progress:
        for ...:
            progress.update(step, row if is_log_step else None)

* On a terminal (stderr is a TTY, not under SLURM) it draws a tqdm bar with
  the last row's loss / L1 / traj/s as postfix. While the bar is open,
  ``tqdm.contrib.logging.logging_redirect_tqdm`` routes the root logger's and
  Ray's console handlers through ``tqdm.write``, so a log line is printed above
  the bar instead of inside it.
* Elsewhere (a file, a pipe, a SLURM log, where a bar would be one growing line
  of ``\\r`` updates), or with ``enabled=False``, there is no bar: each metric
  row becomes one ``INFO`` line of the ``gfn_dist.progress`` logger
  (``step 200/400  traj 12,800  loss 1.23e-02  l1_exact 0.0150  5.0k traj/s``).

``bar_wanted()`` is that decision on its own (e.g. to tell Ray workers).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("gfn_dist.progress")

# Sampled evaluation metrics shown when there is no exact L1 (non-enumerable environments).
SAMPLED_KEYS = ("eval/reward_mean", "eval/num_unique", "eval/modes_found", "eval/logZ_elbo")


def bar_wanted(enabled: bool = True, stream: TextIO | None = None) -> bool:
    """Whether to draw a bar: asked for, ``stream`` (stderr) a terminal, and not a SLURM job's log."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        tty = False
    return bool(enabled) and tty and "SLURM_JOB_ID" not in os.environ


def _fmt(value: float) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value) or value == 0.0:
        return f"{value:g}"
    return f"{value:.3e}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4g}"


def _rate(value: float) -> str:
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def row_fields(row: Mapping) -> list[tuple[str, str]]:
    """The few metrics of a row worth a glance: ``[(name, text), ...]`` (trajectories, loss, L1 or sampled, traj/s)."""
    out: list[tuple[str, str]] = []
    if "trajectories" in row:
        out.append(("traj", f"{int(row['trajectories']):,}"))
    if "loss" in row:
        out.append(("loss", _fmt(row["loss"])))
    if "l1_exact" in row:
        out.append(("l1_exact", f"{row['l1_exact']:.4f}"))
    else:
        out.extend((k, _fmt(row[k])) for k in SAMPLED_KEYS if k in row)
    if "traj_per_s" in row:
        out.append(("traj/s", _rate(row["traj_per_s"])))
    return out


def _console_loggers() -> list[logging.Logger]:
    """Root (gfn_dist's lines) and Ray's logger when it has its own console handler (it does not propagate).

    ``logging_redirect_tqdm`` adds a handler to each logger it is given: a
    logger without a console handler of its own would print twice.
    """
    out: list[logging.Logger] = [logging.root]
    ray_logger = logging.getLogger("ray")
    if any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
        for h in ray_logger.handlers
    ):
        out.append(ray_logger)
    return out


class Progress:
    """Progress bar or text lines (module doc). Only the driver / rank 0 makes one.

    Args:
        total: the budget in learner steps.
        initial: the step the run starts from (a resumed run's).
        enabled: ``logging.progress_bar``; False never draws a bar (text lines still).
        desc: the bar's label and the text lines' prefix.
        stream: where the bar goes (default stderr); its TTY-ness decides bar or text.
    """

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train", stream: TextIO | None = None
    ):
        self.total, self.step, self.desc = int(total), int(initial), desc
        self.use_bar = bar_wanted(enabled, stream)
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()
        if self.use_bar:
            self._redirect.enter_context(logging_redirect_tqdm(loggers=_console_loggers()))
            self._bar = tqdm(
                total=self.total,
                initial=self.step,
                desc=desc,
                unit="step",
                mininterval=1.0,
                dynamic_ncols=True,
                file=stream if stream is not None else sys.stderr,
            )

    def update(self, step: int, row: Mapping | None = None) -> None:
        """Moves to learner step ``step``; ``row``: the metric row of a log step (None between log steps)."""
        step = int(step)
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            if row:
                self._bar.set_postfix(dict(row_fields(row)), refresh=False)
        elif row:
            fields = "  ".join(f"{v} {k}" if k == "traj/s" else f"{k} {v}" for k, v in row_fields(row))
            logger.info("%s step %d/%d  %s", self.desc, step, self.total, fields)
        self.step = step

    def close(self) -> None:
        """Closes the bar and restores the log handlers (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
