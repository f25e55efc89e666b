"""gfn_dist.progress: a bar on a terminal (log lines above it), text lines elsewhere; plot labels."""

import io
import logging
import sys

import pytest

from gfn_dist.progress import Progress, bar_wanted

ROW = {"step": 20, "trajectories": 1280, "loss": 0.01234, "l1_exact": 0.0151, "traj_per_s": 5012.0, "logZ": 2.1}


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_bar_only_on_a_terminal_outside_slurm(no_slurm, monkeypatch):
    assert bar_wanted(True, FakeTTY())
    assert not bar_wanted(False, FakeTTY())  # logging.progress_bar=false
    assert not bar_wanted(True, io.StringIO())  # a file or a pipe
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert not bar_wanted(True, FakeTTY())  # a SLURM job's log


def test_text_line_per_log_step_without_a_tty(no_slurm, caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="gfn_dist.progress"):
        with Progress(total=400, initial=0, enabled=True, desc="train", stream=stream) as progress:
            assert not progress.use_bar
            progress.update(19)  # not a log step: nothing
            progress.update(20, ROW)
            progress.update(40, {"step": 40, "trajectories": 2560, "loss": 2e-5, "eval/reward_mean": 0.4,
                                 "eval/num_unique": 12, "traj_per_s": 800.0})
    lines = [r.getMessage() for r in caplog.records if r.name == "gfn_dist.progress"]
    assert lines == [
        "train step 20/400  traj 1,280  loss 0.01234  l1_exact 0.0151  5.0k traj/s",
        "train step 40/400  traj 2,560  loss 2.000e-05  eval/reward_mean 0.4  eval/num_unique 12  800 traj/s",
    ]
    assert stream.getvalue() == ""  # no bar characters


def test_log_lines_print_above_the_bar(no_slurm, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)  # logging_redirect_tqdm redirects handlers writing to stderr / stdout
    handler = logging.StreamHandler(tty)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers, root.level = [handler], logging.INFO
    try:
        with Progress(total=100, initial=0, enabled=True) as progress:
            assert progress.use_bar
            progress.update(10, ROW)
            logging.getLogger("gfn_dist.checkpoint").info("checkpoint (end) written")
            progress.update(20)
        assert root.handlers == [handler]  # restored
    finally:
        root.handlers, root.level = old_handlers, old_level
    out = tty.getvalue()
    before, sep, _ = out.partition("INFO: checkpoint (end) written\n")
    assert sep, out
    # The bar was cleared (carriage return) right before the line: the line does not continue the bar.
    assert before.endswith("\r") or before.endswith("\n"), repr(before[-80:])
    assert "train" in before and "20/100" in out


def test_training_plot_labels_and_ticks():
    from gfn_dist.plot import WALL_TIME_LABEL, training_figure

    rows = [{"step": s, "trajectories": 64 * s, "loss": 1.0 / s, "logZ": 2.0, "elapsed_s": 5.0 + s / 70,
             **({"l1_exact": 1.0 / s} if s % 50 == 0 else {})} for s in range(10, 2010, 10)]
    for x_key in ("trajectories", "elapsed_s"):
        fig = training_figure(rows, x_key, 2.3)
        fig.canvas.draw()
        ax_loss, ax_z, ax_l1 = fig.axes[:3]
        assert ax_loss.get_ylabel() and ax_l1.get_ylabel() and ax_z.get_ylabel()
        if x_key == "elapsed_s":
            assert ax_l1.get_xlabel() == WALL_TIME_LABEL
        renderer = fig.canvas.get_renderer()
        for ax in (ax_loss, ax_z, ax_l1):
            boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
            boxes.sort(key=lambda b: b.x0)
            assert len(boxes) >= 3
            assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in ax.get_xticklabels()]
