"""Evaluation of a saved policy: ``gfn-dist eval CHECKPOINT_OR_RUN_DIR``.

Rebuilds the environment, the policies and the loss module from the run's
resolved config (``RUN_DIR/config.yaml``, or the one a checkpoint directory
holds), loads the saved weights (``weights_only=True``) and measures:

* exact metrics, on enumerable environments (the model's exact P_T by flow
  propagation through the DAG, ``DiscreteEnv.exact_terminating_distribution``):
  ``l1_exact = Σ_x |P_T(x) - target(x)|``, ``kl_exact = KL(target || P_T)`` in
  nats, the learned ``logZ`` against the true ``logZ_true`` (``logZ_err``), and
  the mass P_T puts on the modes (``mode_mass``) against the target's
  (``mode_mass_target``). The target is ``R(x)/Z``, or ``prior(x) R(x)^β / Z_β``
  for the relative losses (``builders.target_distribution``), the same as the
  trainer's evaluation.
* the sampled metrics of training (``eval/reward_mean``, ``eval/logZ_elbo``, ...,
  ``gfn_dist.sampled_eval``), for every environment, from ``n_samples`` trajectories;
* sample metrics, from ``n_samples`` on-policy trajectories (no exploration):
  ``mean_log_reward``, ``n_unique``, ``n_modes_found`` out of ``n_modes`` (modes:
  terminal states of maximal reward) and, when enumerable, the empirical
  ``l1_sampled`` (noisy: its floor is about ``sqrt(n_states / n_samples)``).

It writes ``metrics.json``, ``samples.pt`` (``states`` int64
``(n_samples, *state_shape)``, ``log_rewards`` float ``(n_samples,)``) and
``samples.csv`` (one row per sample: state coordinates, log-reward) into
``RUN_DIR/eval/step_<N>/`` unless told otherwise (for a checkpoint directory too: beside
``checkpoints/``, not inside the checkpoint; ``run_dir_of``).

Which weights. A file is used as is. A checkpoint directory
(``RUN_DIR/checkpoints/step_N/``, ``gfn_dist.checkpoint``) is read from its
``learner.pt`` (else the first ``*.pt`` with model state), and its own
``config.yaml``. A run directory uses the latest of ``RUN_DIR/policy.pt``
(written at the end of training) and the checkpoints (``checkpoint.dir``,
default ``RUN_DIR/checkpoints``; the largest N; at equal steps the
checkpoint, which also holds logZ: ``policy.pt`` has the policies only, so
``logZ`` / ``logZ_err`` are reported only from a learner state). Checkpoints
are verified against their manifest: a torn newest one is skipped with a
warning (``gfn_dist.checkpoint_files``), and so is a corrupt ``policy.pt``
when a checkpoint is left; an unreadable file given directly is one error
line naming it.
A weight file holds ``{"policies": ModuleDict state}`` (policy.pt) or a learner
state ``{"gflownet": loss-module state (policies + logZ), "step": N, ...}``,
possibly nested one or two levels down (e.g. ``{"learner": {...}}``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfn_dist.builders import (
    build_env,
    build_gflownet,
    build_policies,
    exact_terminating_distribution,
    is_enumerable,
    logz_of,
    target_distribution,
)
from gfn_dist.checkpoint_files import MANIFEST, load_torch_file, newest_intact, verify_checkpoint
from gfn_dist.config import TrainConfig, load_config
from gfn_dist.sampled_eval import ModesTracker, sample_for_eval, sampled_metrics  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_SKIP_FILES = ("replay", "shard", "optim", "rng", "actors")  # checkpoint parts without model weights


@dataclass
class LoadedPolicy:
    """A run's model rebuilt from its config and saved weights.

    Attributes:
        cfg: the run's resolved configuration.
        env: the environment (on ``device``).
        policies: ``ModuleDict(pf, [pb])`` with the saved weights.
        gflownet: the loss module over ``policies`` (its logZ loaded when saved).
        step: learner steps behind the weights (None if the file does not say).
        weights: the file the weights came from.
        run_dir: the run directory (``run_dir_of``: for a checkpoint, the run it belongs to).
        has_logz: whether the file held the learned logZ (``policy.pt`` holds only the policies).
    """

    cfg: TrainConfig
    env: Any
    policies: nn.ModuleDict
    gflownet: nn.Module
    step: int | None
    weights: Path
    run_dir: Path
    has_logz: bool = False

    @property
    def pf(self) -> nn.Module:
        return self.policies["pf"]


# ---------------------------------------------------------------------------- finding files


def find_config(path: str | Path) -> Path:
    """The ``config.yaml`` of ``path`` (a run dir, a checkpoint dir or a weight file): the nearest one up.

    Raises:
        FileNotFoundError: if neither ``path`` nor a parent (up to three levels) holds one.
    """
    p = Path(path).resolve()
    start = p if p.is_dir() else p.parent
    for d in [start, *start.parents][:4]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    raise FileNotFoundError(f"{path}: no config.yaml here or in the parent directories (not a gfn-dist run?)")


def run_dir_of(config_path: Path, cfg: TrainConfig) -> Path:
    """The run a ``config.yaml`` belongs to: its own directory, or for a checkpoint's copy
    (``.../step_N/config.yaml``) the run directory, so that ``eval/`` goes beside ``checkpoints/``.

    A checkpoint under ``RUN_DIR/checkpoints/`` (the default layout, also after the run was
    moved) gives ``RUN_DIR``; one under ``checkpoint.dir`` elsewhere gives ``run.dir`` when that
    directory exists here, else the directory holding the ``step_N`` directories.
    """
    d = config_path.parent
    if not _STEP_DIR.match(d.name):
        return d
    if d.parent.name == "checkpoints":
        return d.parent.parent
    if cfg.run.dir and Path(cfg.run.dir).is_dir():
        return Path(cfg.run.dir)
    return d.parent


def checkpoint_dirs(run_dir: str | Path, cfg: TrainConfig | None = None) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the run's ``step_N/`` checkpoints (``cfg.checkpoint.dir`` or ``RUN_DIR/checkpoints``),
    by increasing step."""
    ckpt_dir = getattr(getattr(cfg, "checkpoint", None), "dir", None)
    root = Path(ckpt_dir) if ckpt_dir else Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _STEP_DIR.match(d.name))]
    return sorted(found)


def _load(path: Path):
    """``torch.load(weights_only=True)``; raises ``CorruptCheckpointError`` (a ValueError) naming a corrupt file."""
    return load_torch_file(path)


def _extract_state(obj, depth: int = 0) -> dict | None:
    """The dict holding ``"gflownet"`` or ``"policies"`` state, searched up to two levels down."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("gflownet"), dict) or isinstance(obj.get("policies"), dict):
        return obj
    if depth >= 2:
        return None
    for v in obj.values():
        found = _extract_state(v, depth + 1)
        if found is not None:
            return found
    return None


def _state_step(state: dict, fallback: int | None) -> int | None:
    step = state.get("step", fallback)
    return int(step) if isinstance(step, (int, torch.Tensor)) else fallback


def _load_weight_dir(d: Path, step: int | None) -> tuple[dict, Path]:
    """The model state of a checkpoint directory (searched over its ``*.pt`` files), verified
    against its manifest when it has one."""
    if (d / MANIFEST).is_file():
        verify_checkpoint(d)
    files = sorted(d.rglob("*.pt"), key=lambda f: (f.name != "learner.pt", len(f.relative_to(d).parts), f.name))
    files = [f for f in files if not any(s in f.name.lower() for s in _SKIP_FILES)]
    for f in files:
        state = _extract_state(_load(f))
        if state is not None:
            return state, f
    raise FileNotFoundError(f"{d}: no model weights (a .pt file with 'gflownet' or 'policies' state)")


def load_weights(path: str | Path, cfg: TrainConfig | None = None) -> tuple[dict, Path, int | None]:
    """The model state to evaluate at ``path`` (module doc: "Which weights"); ``cfg`` locates the checkpoints.

    Returns:
        ``(state, file, step)``: ``state`` holds ``"gflownet"`` and/or ``"policies"``.

    Raises:
        FileNotFoundError: if ``path`` holds no weights.
    """
    p = Path(path)
    if p.is_file():
        state = _extract_state(_load(p))
        if state is None:
            raise FileNotFoundError(f"{p}: no 'gflownet' or 'policies' state in this file")
        return state, p, _state_step(state, None)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    m = _STEP_DIR.match(p.name)
    if m:  # one checkpoint
        state, f = _load_weight_dir(p, int(m.group(1)))
        return state, f, _state_step(state, int(m.group(1)))
    found = newest_intact(checkpoint_dirs(p, cfg))  # a torn newest checkpoint is skipped with a warning
    ckpts = [found] if found else []
    policy = None
    if (p / "policy.pt").is_file():
        try:
            state = _extract_state(_load(p / "policy.pt"))
        except ValueError as err:
            if not ckpts:
                raise
            logger.warning("%s; using the newest checkpoint instead", err)
            state = None
        if state is not None:
            policy = (state, p / "policy.pt", _state_step(state, None))
    # At equal steps the checkpoint wins: it also holds logZ.
    if ckpts and (policy is None or (policy[2] is not None and ckpts[-1][0] >= policy[2])):
        step, d = ckpts[-1]
        state, f = _load_weight_dir(d, step)
        return state, f, _state_step(state, step)
    if policy is None:
        raise FileNotFoundError(f"{p}: neither policy.pt nor checkpoints/step_N/ with model weights")
    return policy


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> LoadedPolicy:
    """Rebuilds env / policies / loss module from the run's config and loads the weights at ``path``.

    Args:
        path: a run directory, a checkpoint directory, or a weight file inside a run.
        device: where to build the model.

    Raises:
        FileNotFoundError: no config.yaml or no weights.
        ValueError: the weights do not fit the model the config describes.
    """
    cfg_path = find_config(path)
    cfg = load_config(cfg_path)
    state, weights, step = load_weights(path, cfg)
    env = build_env(cfg, device)
    torch.manual_seed(cfg.run.seed)  # deterministic placeholders until the weights load
    policies = build_policies(cfg, env).to(device)
    gflownet = build_gflownet(cfg, env, policies).to(device)
    has_logz = isinstance(state.get("gflownet"), dict)
    try:
        if has_logz:
            gflownet.load_state_dict(state["gflownet"])
        else:
            policies.load_state_dict(state["policies"])
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not fit the model of {cfg_path}: {str(err).splitlines()[0]}") from err
    policies.eval()
    has_logz = has_logz and logz_of(gflownet) is not None
    return LoadedPolicy(cfg, env, policies, gflownet, step, Path(weights), run_dir_of(cfg_path, cfg), has_logz)


# ---------------------------------------------------------------------------- metrics


@torch.no_grad()
def exact_metrics(lp: LoadedPolicy) -> dict:
    """Exact metrics of an enumerable environment (module doc); ``{}`` otherwise."""
    if not is_enumerable(lp.env):
        return {}
    target, log_z_true = target_distribution(lp.cfg, lp.env, getattr(lp.gflownet, "prior_pf", None))
    p_t = exact_terminating_distribution(lp.env, lp.pf)
    target = target.to(p_t.device)
    modes = mode_mask(lp.env).to(p_t.device)
    pos = target > 0
    out = {
        "l1_exact": float((p_t - target).abs().sum()),
        "kl_exact": float((target[pos] * (target[pos].log() - p_t[pos].clamp_min(1e-300).log())).sum()),
        "logZ_true": float(log_z_true),
        "mode_mass": float(p_t[modes].sum()),
        "mode_mass_target": float(target[modes].sum()),
    }
    if lp.has_logz:
        out["logZ"] = float(logz_of(lp.gflownet))  # type: ignore[arg-type]  # has_logz: the loss module has logZ
        out["logZ_err"] = abs(out["logZ"] - out["logZ_true"])
    return out


def mode_mask(env, states=None) -> torch.Tensor:
    """Bool ``(n,)``: the terminal state has the maximal reward (a mode); all terminating states by default.

    Uses ``env.mode_mask`` when the environment defines it, else the maximum of
    log R over the terminating states.
    """
    if hasattr(env, "mode_mask"):
        return env.mode_mask(states) if states is not None else env.mode_mask()
    log_r_all = env.log_reward(env.terminating_states)
    log_r = log_r_all if states is None else env.log_reward(states)
    return log_r >= log_r_all.max() - 1e-6


@torch.no_grad()
def sample_terminal_states(
    lp: LoadedPolicy, n_samples: int, seed: int = 0, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_samples`` terminal states from the learned P_F (on-policy, no exploration).

    Returns:
        ``(states int64 (n_samples, *state_shape), log_rewards float (n_samples,))`` on the CPU.
    """
    from gfn_dist.samplers import Sampler

    sampler = Sampler(lp.pf)
    states, log_r = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        left = n_samples
        while left > 0:
            traj = sampler.sample_trajectories(lp.env, n=min(batch_size, left))
            states.append(traj.terminating_states.tensor.cpu())
            log_r.append(traj.log_rewards.cpu())
            left -= len(traj)
    return torch.cat(states), torch.cat(log_r)


@torch.no_grad()
def sample_metrics(lp: LoadedPolicy, states: torch.Tensor, log_rewards: torch.Tensor) -> dict:
    """Metrics of sampled terminal states (module doc)."""
    n = states.shape[0]
    out = {
        "n_samples": n,
        "mean_log_reward": float(log_rewards.mean()),
        "n_unique": int(torch.unique(states.flatten(1), dim=0).shape[0]),
    }
    if not is_enumerable(lp.env):
        return out
    env = lp.env
    dev_states = states.to(env.device)
    idx = env.get_terminating_states_indices(dev_states).cpu()
    is_mode = mode_mask(env, env.States(dev_states)).cpu()
    out["n_modes"] = int(mode_mask(env).sum())
    out["n_modes_found"] = int(torch.unique(idx[is_mode]).numel())
    target, _ = target_distribution(lp.cfg, env, getattr(lp.gflownet, "prior_pf", None))
    counts = torch.bincount(idx, minlength=target.numel()).double()
    out["l1_sampled"] = float((counts / n - target.cpu()).abs().sum())
    return out


def write_samples(out_dir: str | Path, states: torch.Tensor, log_rewards: torch.Tensor, **meta) -> None:
    """``samples.pt`` (``states``, ``log_rewards`` and ``meta``) and ``samples.csv`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"states": states, "log_rewards": log_rewards, **meta}, out_dir / "samples.pt")
    flat = states.flatten(1).tolist()
    with open(out_dir / "samples.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*(f"x{i}" for i in range(states.flatten(1).shape[1])), "log_reward"])
        for row, lr in zip(flat, log_rewards.tolist(), strict=True):
            w.writerow([*row, repr(float(lr))])


def evaluate(
    path: str | Path,
    n_samples: int = 10_000,
    seed: int = 0,
    out_dir: str | Path | None = None,
    exact: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[dict, Path]:
    """Evaluates the policy at ``path``; writes ``metrics.json`` and the samples.

    Args:
        path: a run directory, a checkpoint directory or a weight file.
        n_samples: terminal states to sample (0: exact metrics only).
        seed: seed of the sampling.
        out_dir: output directory; default ``RUN_DIR/eval/step_<N>`` (``latest`` if unknown).
        exact: compute the exact metrics (enumerable environments).
        device: where to run.

    Returns:
        ``(metrics, out_dir)``.

    Raises:
        ValueError: if ``n_samples < 0``; see ``load_policy`` for the others.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples: must be >= 0, got {n_samples}")
    lp = load_policy(path, device)
    metrics: dict = {"step": lp.step, "weights": str(lp.weights), "env": lp.cfg.env.name, "loss": lp.cfg.loss.name}
    if exact:
        metrics.update(exact_metrics(lp))
    out = (
        Path(out_dir)
        if out_dir is not None
        else lp.run_dir / "eval" / (f"step_{lp.step}" if lp.step is not None else "latest")
    )
    out.mkdir(parents=True, exist_ok=True)
    if n_samples > 0:
        states, log_r = sample_terminal_states(lp, n_samples, seed)
        metrics.update(sample_metrics(lp, states, log_r))
        write_samples(out, states, log_r, step=lp.step, seed=seed)
        pb = lp.policies["pb"] if "pb" in lp.policies else None
        tracker = ModesTracker(lp.env) if ModesTracker.supported(lp.env) else None
        log_z = float(logz_of(lp.gflownet)) if lp.has_logz else None  # type: ignore[arg-type]  # has_logz: the loss module has logZ
        metrics.update(sampled_metrics(lp.env, lp.pf, pb, n_samples, lp.cfg.eval.top_k, log_z, tracker, seed))
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("eval of %s written to %s", lp.weights, out)
    return metrics, out


# ---------------------------------------------------------------------------- command line


def run_eval(ns) -> int:
    """``gfn-dist eval``: prints the metrics; exit code 0, or 2 on a bad path / config (one line on stderr)."""
    import sys

    from gfn_dist.config import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    try:
        metrics, out = evaluate(ns.path, ns.n_samples, ns.seed, ns.out, not ns.no_exact, ns.device)
    except (OSError, ValueError, ConfigError) as err:  # a missing / unreadable / corrupt file: one line naming it
        sys.stderr.write(f"gfn-dist eval: {err}\n")
        return 2
    if ns.json:
        sys.stdout.write(json.dumps(metrics) + "\n")
        return 0
    lines = [f"eval of {metrics.pop('weights')} (step {metrics.pop('step')})"]
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        lines.append(f"  {k:<{width}}  {v:.6g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    lines.append(
        f"written: {out / 'metrics.json'}"
        + (f", {out / 'samples.pt'}, {out / 'samples.csv'}" if ns.n_samples > 0 else "")
    )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
