"""Plots of a run: ``gfn-dist plot RUN_DIR`` writes PNGs into ``RUN_DIR/plots/``.

* ``training_vs_trajectories.png`` / ``training_vs_time.png``: loss (log
  scale), logZ with the true log Z as a dashed line (enumerable environments;
  for the relative losses the tilted target's ``log Z_β``) and the exact L1
  distance between the model's P_T and the target, against trajectories
  consumed by the learners and against wall time since the run started (``elapsed_s``).
* ``throughput.png``: trajectories per second (consumed by the learners and
  produced by the actors), learner steps per second, policy lag (mean / max,
  in learner steps) and the time per learner step of each phase.
* ``p_t_heatmap.png`` (2-D HyperGrid): the learned P_T next to the target
  distribution and their difference. Other enumerable environments get
  ``p_t_vs_target.png`` (P_T and target over the terminal states, sorted by
  target). Both use the latest saved weights (``gfn_dist.evaluate.load_weights``:
  ``policy.pt`` or the newest checkpoint); without any, they are skipped with
  a warning.

Drawn with matplotlib's Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from gfn_dist.metrics import read_jsonl

logger = logging.getLogger(__name__)

# ``elapsed_s`` counts from the start of the run (start-up included), not from the first learner step.
WALL_TIME_LABEL = "wall time since run start (s)"
PHASES = ("time/sample_s", "time/loss_s", "time/backward_s", "time/sync_s")


def _figure(nrows: int, ncols: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins: a layout engine (constrained / tight) measures every text
    # extent and costs more than drawing the figure.
    fig = Figure(figsize=(width * ncols, height * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(
        left=0.7 / (width * ncols),
        right=1 - 0.25 / (width * ncols),
        bottom=0.55 / (height * nrows),
        top=1 - 0.4 / (height * nrows),
        wspace=0.3,
        hspace=0.45,
    )
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def elapsed_seconds(rows: Sequence[dict]) -> list[float | None]:
    """Wall time of each row: ``elapsed_s``, else rebuilt from ``learner_steps_per_s`` (older runs).

    A resumed run restarts its clock; its rows are shifted to continue the curve.
    """
    out: list[float | None] = []
    t, prev_step, offset = 0.0, 0, 0.0
    for r in rows:
        if "elapsed_s" in r:
            if float(r["elapsed_s"]) + offset < t:  # the clock restarted (resume)
                offset = t
            t = float(r["elapsed_s"]) + offset
        elif r.get("learner_steps_per_s"):
            t += (r["step"] - prev_step) / r["learner_steps_per_s"]
        else:
            out.append(None)
            continue
        prev_step = r["step"]
        out.append(t)
    return out


def series(rows: Sequence[dict], key: str, xs: Sequence) -> tuple[list, list]:
    """``(x, y)`` of the rows holding ``key`` (and an x)."""
    pts = [(x, r[key]) for r, x in zip(rows, xs, strict=True) if key in r and x is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _compact_xticks(ax) -> None:
    """At most 5 x ticks with SI prefixes (``20k``, not ``20000``): long counts ran together on a 5-inch panel."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=3))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _positive_log_scale(ax, ys) -> None:
    """Log y-axis for positive series that span more than a decade."""
    if ys and min(ys) > 0 and max(ys) > 10 * min(ys):
        ax.set_yscale("log")


def true_log_z(run_dir: Path) -> float | None:
    """log Z of the run's target (``builders.target_distribution``), None if not enumerable / no config."""
    from gfn_dist.builders import build_env, is_enumerable, target_distribution
    from gfn_dist.config import load_config

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        cfg = load_config(cfg_path)
        env = build_env(cfg)
        if not is_enumerable(env):
            return None
        return float(target_distribution(cfg, env)[1])
    except Exception as err:  # a plot without the reference line beats no plot
        logger.warning("true log Z unavailable (%s): %s", cfg_path, err)
        return None


def plot_training(rows: Sequence[dict], x_key: str, path: Path, log_z_true: float | None) -> Path:
    """Loss, logZ (and true log Z) and exact L1 against ``x_key`` (``trajectories`` or ``elapsed_s``)."""
    return _save(training_figure(rows, x_key, log_z_true), path)


def training_figure(rows: Sequence[dict], x_key: str, log_z_true: float | None):
    """The figure of ``plot_training`` (a matplotlib ``Figure`` with the three panels)."""
    xs = elapsed_seconds(rows) if x_key == "elapsed_s" else [r.get(x_key) for r in rows]
    xlabel = WALL_TIME_LABEL if x_key == "elapsed_s" else "trajectories consumed"
    fig, axes = _figure(1, 3)
    ax_loss, ax_z, ax_l1 = axes[0]
    x, y = series(rows, "loss", xs)
    ax_loss.plot(x, y, color="C0")
    _positive_log_scale(ax_loss, y)
    ax_loss.set(title="loss", ylabel="loss (per-batch mean)")
    x, y = series(rows, "logZ", xs)
    if y:
        ax_z.plot(x, y, color="C1", label="learned logZ")
    else:
        _empty(ax_z, "no learned logZ")
    if log_z_true is not None:
        ax_z.axhline(log_z_true, color="k", ls="--", lw=1, label=f"true log Z = {log_z_true:.3f}")
    if y or log_z_true is not None:
        ax_z.legend(loc="best", fontsize=8)
    ax_z.set(title="logZ", ylabel="logZ")
    x, y = series(rows, "l1_exact", xs)
    if y:
        ax_l1.plot(x, y, "o-", color="C2", ms=3)
        _positive_log_scale(ax_l1, y)
        ax_l1.set_title(f"exact L1(P_T, target), last {y[-1]:.4f}")
    else:
        _empty(ax_l1, "no exact evaluation")
        ax_l1.set_title("exact L1(P_T, target)")
    ax_l1.set_ylabel("L1 distance")
    for ax in axes[0]:
        ax.set_xlabel(xlabel)
        _compact_xticks(ax)
        ax.grid(alpha=0.3)
    return fig


def plot_throughput(rows: Sequence[dict], path: Path) -> Path:
    """Trajectories/s, learner steps/s, policy lag and per-phase step time."""
    ts = elapsed_seconds(rows)
    traj = [r.get("trajectories") for r in rows]
    fig, axes = _figure(2, 2)
    (ax_tps, ax_sps), (ax_lag, ax_phase) = axes
    for key, label in (("traj_per_s", "consumed (learners)"), ("traj_per_s/produced", "produced (actors)")):
        x, y = series(rows, key, ts)
        if y:
            ax_tps.plot(x, y, label=label)
    ax_tps.set(title="trajectories per second", xlabel=WALL_TIME_LABEL, ylabel="traj/s")
    ax_tps.legend(loc="best", fontsize=8)
    x, y = series(rows, "learner_steps_per_s", ts)
    ax_sps.plot(x, y, color="C3")
    ax_sps.set(title="learner steps per second", xlabel=WALL_TIME_LABEL, ylabel="steps/s")
    for key, label in (("policy_lag_steps_mean", "mean"), ("policy_lag_steps_max", "max")):
        x, y = series(rows, key, traj)
        if y:
            ax_lag.plot(x, y, label=label)
    ax_lag.set(title="policy lag", xlabel="trajectories consumed", ylabel="learner steps")
    ax_lag.legend(loc="best", fontsize=8)
    phases = [(k, series(rows, k, traj)) for k in PHASES]
    phases = [(k, xy) for k, xy in phases if xy[1]]
    if phases:
        x = phases[0][1][0]
        ys = [[1e3 * v for v in xy[1]] for _, xy in phases if len(xy[1]) == len(x)]
        labels = [k.removeprefix("time/").removesuffix("_s") for k, xy in phases if len(xy[1]) == len(x)]
        ax_phase.stackplot(x, *ys, labels=labels, alpha=0.8)
        ax_phase.legend(loc="upper left", fontsize=8)
    else:
        _empty(ax_phase, "no phase times")
    ax_phase.set(title="time per learner step by phase", xlabel="trajectories consumed", ylabel="ms")
    for ax in axes.flat:
        _compact_xticks(ax)
        ax.grid(alpha=0.3)
    return _save(fig, path)


@torch.no_grad()
def distributions(run_dir: Path):
    """``(loaded policy, P_T, target)`` of the latest weights (float64, ``env.terminating_states`` order)."""
    from gfn_dist.builders import exact_terminating_distribution, target_distribution
    from gfn_dist.evaluate import load_policy

    lp = load_policy(run_dir)
    target, _ = target_distribution(lp.cfg, lp.env, getattr(lp.gflownet, "prior_pf", None))
    return lp, exact_terminating_distribution(lp.env, lp.pf).cpu(), target.cpu()


def plot_distributions(run_dir: Path, out_dir: Path) -> Path | None:
    """``p_t_heatmap.png`` (2-D HyperGrid) or ``p_t_vs_target.png`` (other enumerable envs); None if impossible."""
    from gfn_dist.builders import build_env, is_enumerable
    from gfn_dist.config import load_config

    try:
        if not is_enumerable(build_env(load_config(run_dir / "config.yaml"))):
            return None
        lp, p_t, target = distributions(run_dir)
    except (OSError, ValueError) as err:  # no / unreadable weights: the metric plots still come
        logger.warning("no P_T plot: %s", err)
        return None
    l1 = float((p_t - target).abs().sum())
    step = f"step {lp.step}" if lp.step is not None else lp.weights.name
    hg = lp.cfg.env.hypergrid
    if lp.cfg.env.name == "hypergrid" and hg.ndim == 2:
        shape = (hg.height, hg.height)  # row-major: index = x0 * H + x1
        fig, axes = _figure(1, 3, width=4.6, height=4.0)
        vmax = float(max(p_t.max(), target.max()))
        for ax, p, title in ((axes[0, 0], p_t, f"learned P_T ({step})"), (axes[0, 1], target, "target R(x)/Z")):
            im = ax.imshow(p.reshape(shape).numpy(), origin="lower", cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set(title=title, xlabel="x[1]", ylabel="x[0]")
            fig.colorbar(im, ax=ax, shrink=0.8)  # same scale on both
        diff = (p_t - target).reshape(shape).numpy()
        lim = float(abs(diff).max()) or 1.0
        im = axes[0, 2].imshow(diff, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, 2].set(title=f"P_T - target (L1 = {l1:.4f})", xlabel="x[1]", ylabel="x[0]")
        fig.colorbar(im, ax=axes[0, 2], shrink=0.8, format="%.2g")  # no offset text over the title
        return _save(fig, out_dir / "p_t_heatmap.png")
    order = torch.argsort(target, descending=True)
    fig, axes = _figure(1, 1, width=8.0)
    ax = axes[0, 0]
    ax.plot(target[order].numpy(), color="k", lw=1.5, label="target")
    ax.plot(p_t[order].numpy(), color="C0", lw=1, alpha=0.8, label=f"learned P_T ({step})")
    ax.set(
        title=f"{lp.cfg.env.name}: P_T vs target, L1 = {l1:.4f}",
        xlabel="terminal states, by target probability",
        ylabel="probability",
        yscale="log",
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out_dir / "p_t_vs_target.png")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, distributions_plot: bool = True) -> list[Path]:
    """Writes the run's PNGs (module doc) and returns their paths.

    Args:
        run_dir: a run directory holding ``metrics.jsonl`` (and ``config.yaml``).
        out_dir: where to write; default ``RUN_DIR/plots``.
        distributions_plot: also draw P_T against the target (loads the latest weights).

    Raises:
        FileNotFoundError: if ``RUN_DIR/metrics.jsonl`` is missing.
        ValueError: if it holds no rows.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a gfn-dist run directory?)")
    # A resumed run re-logs the steps after its checkpoint: the later row of a step wins.
    rows = sorted({r["step"]: r for r in read_jsonl(path)}.values(), key=lambda r: r["step"])
    if not rows:
        raise ValueError(f"{path}: no metric rows yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    log_z = true_log_z(run_dir)
    written = [
        plot_training(rows, "trajectories", out / "training_vs_trajectories.png", log_z),
        plot_training(rows, "elapsed_s", out / "training_vs_time.png", log_z),
        plot_throughput(rows, out / "throughput.png"),
    ]
    if distributions_plot:
        p = plot_distributions(run_dir, out)
        if p is not None:
            written.append(p)
    for p in written:
        logger.info("wrote %s", p)
    return written


# ---------------------------------------------------------------------------- command line


def run_plot(ns) -> int:
    """``gfn-dist plot``: writes the PNGs, prints their paths; exit code 0, or 2 without metrics."""
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    try:
        paths = plot_run(ns.run_dir, ns.out, distributions_plot=not ns.no_distributions)
    except (OSError, ValueError) as err:  # a missing / unreadable file: one line naming it
        sys.stderr.write(f"gfn-dist plot: {err}\n")
        return 2
    sys.stdout.write("".join(f"{p}\n" for p in paths))
    return 0
