"""Checks before anything starts: every bad value refused in seconds, before Ray.

``validate_before_start(cfg)`` is what ``gfn-dist train`` runs right after
``load_config`` and before Ray, actors or files of the run: each problem is a
``ConfigError`` with one line naming the key (the CLI exits 2). The checks:

* ``check_finite``: no NaN / infinity in any float key (``gfn_dist.config``;
  ``load_config`` runs it too);
* ``check_run_dir``: ``run.dir`` (and ``checkpoint.dir``) is a directory this
  user can create or write: not a regular file, not on a read-only filesystem
  or in a directory without write permission;
* ``check_memory``: replay + batch memory, estimated from the environment's
  shapes, fits the memory available to this process (``run.skip_memory_check``
  skips it).

Pure functions: they create nothing (``check_run_dir`` looks at permissions
with ``os.access``, which also reports a read-only filesystem to root).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from gfn_dist.config import ConfigError, TrainConfig, check_finite

logger = logging.getLogger(__name__)

GiB = 1 << 30
#: Bytes of one stored element: replay keeps states / actions / counters as int64 (``ReplayBuffer``).
_INT, _FLOAT = 8, 4
#: The live replay and one copy of it: a checkpoint snapshots every shard and gathers the copies in the driver.
REPLAY_COPIES = 2
#: Activations kept for the backward pass, their gradients and the optimizer's view of them, per float.
BACKWARD_FACTOR = 3


# ---------------------------------------------------------------------------- run directory


def check_run_dir(path: str | Path | None, key: str = "run.dir") -> None:
    """Checks that ``path`` is, or can be created as, a directory this user can write.

    Args:
        path: the directory (None: ``runs``, where the default run directories go).
        key: the configuration key, for the message.

    Raises:
        ConfigError: naming ``key`` if ``path`` is a regular file (or lies under one), a
            dangling symbolic link, or is (or would be created in) a directory without
            write permission or on a read-only filesystem.
    """
    p = Path(path if path is not None else "runs").expanduser()
    if p.is_symlink() and not p.exists():
        raise ConfigError(f"{key}: {p} is a dangling symbolic link")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} exists and is not a directory")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: cannot create {p}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"{p} is not writable" if existing == p else f"cannot create {p}: {existing} is not writable"
        raise ConfigError(f"{key}: {what} (read-only filesystem or no write permission)")


# ---------------------------------------------------------------------------- memory


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _cgroup_limit_bytes() -> int | None:
    """Memory left under this process's cgroup limit (SLURM jobs, containers), or None if unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            d = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit_file, usage_file = d / "memory.max", d / "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            d = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            limit_file, usage_file = d / "memory.limit_in_bytes", d / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 writes a huge number for "no limit"
            return max(int(limit) - usage, 0)
    return None


def available_memory_bytes() -> int:
    """Memory this process can still allocate: the machine's available memory (psutil, else
    ``sysconf``), lowered to what the cgroup limit leaves when there is one."""
    try:
        import psutil  # a Ray dependency

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_limit_bytes()
    return min(avail, limit) if limit is not None else avail


def bytes_per_trajectory(state_shape: tuple, max_traj_len: int) -> int:
    """Bytes of one trajectory in replay (``ReplayBuffer`` layout: int64 states ``(T+1, *state_shape)``,
    int64 actions ``(T, 1)``, terminating_idx, float32 log_reward, policy_version, actor_id)."""
    t = int(max_traj_len)
    return (t + 1) * math.prod(state_shape) * _INT + t * _INT + 3 * _INT + _FLOAT


def memory_estimate(cfg: TrainConfig, env=None) -> dict[str, int]:
    """Estimated bytes of the run's large allocations (a lower bound: Python, Ray and model weights excluded).

    Args:
        cfg: the configuration.
        env: its environment (built on the CPU from ``cfg`` when None; only shapes are read).

    Returns:
        ``{"replay": ..., "batch": ..., "rollout": ..., "bytes_per_trajectory": ...}``: ``replay`` =
        ``REPLAY_COPIES x replay.num_shards x replay.capacity_per_shard x bytes per trajectory``;
        ``batch`` = the learner batch and its activations (``learner.batch_size`` x (T+1) x
        (input + hidden layers + output) floats x ``BACKWARD_FACTOR``); ``rollout`` = every actor's
        sampling batch and activations.
    """
    if env is None:
        from gfn_dist.builders import build_env

        env = build_env(cfg, "cpu")
    t = int(env.max_traj_len)
    bpt = bytes_per_trajectory(tuple(env.state_shape), t)
    m = cfg.model
    widths = env.preprocessor.output_dim + m.hidden_dim * m.n_hidden_layers + env.n_actions
    per_traj_act = (t + 1) * widths * _FLOAT
    loops = cfg.sampler.n_local_search_loops if cfg.sampler.name == "local_search" else 0
    per_push = cfg.rollout.trajectories_per_push * (1 + loops)
    return {
        "replay": REPLAY_COPIES * cfg.replay.num_shards * cfg.replay.capacity_per_shard * bpt,
        "batch": cfg.learner.batch_size * (bpt + BACKWARD_FACTOR * per_traj_act),
        "rollout": (0 if cfg.rollout.synchronous else cfg.rollout.num_actors) * per_push * (bpt + per_traj_act),
        "bytes_per_trajectory": bpt,
    }


def check_memory(cfg: TrainConfig, env=None, available: int | None = None) -> None:
    """Refuses a run whose replay + batches cannot fit this machine's memory (``memory_estimate``).

    With ``cluster.address`` (an existing cluster) the shards and actors run on other
    nodes: only one shard and the learner batch are checked, assuming nodes like this one.

    Args:
        cfg: the configuration (``run.skip_memory_check=true`` skips the check).
        env: its environment (built from ``cfg`` when None).
        available: bytes available (``available_memory_bytes()`` when None).

    Raises:
        ConfigError: naming the dominant key (``replay.capacity_per_shard`` or
            ``learner.batch_size``), the estimate and the memory available.
    """
    if cfg.run.skip_memory_check:
        return
    est = memory_estimate(cfg, env)
    replay = est["replay"] // cfg.replay.num_shards if cfg.cluster.address else est["replay"]
    rollout = 0 if cfg.cluster.address else est["rollout"]
    need = replay + est["batch"] + rollout
    available = available_memory_bytes() if available is None else available
    if need <= available:
        logger.debug("memory estimate %s of %s available", _size(need), _size(available))
        return
    r = cfg.replay
    if replay >= est["batch"] + rollout:
        key = "replay.capacity_per_shard"
        detail = (
            f"replay needs ~{_size(replay)} ({REPLAY_COPIES} copies x replay.num_shards={r.num_shards} x "
            f"replay.capacity_per_shard={r.capacity_per_shard} x {est['bytes_per_trajectory']} bytes per "
            f"trajectory)"
        )
        fix = "lower replay.capacity_per_shard or replay.num_shards"
    else:
        key = "learner.batch_size"
        detail = (
            f"learner.batch_size={cfg.learner.batch_size} and the actors' batches need ~{_size(est['batch'] + rollout)}"
        )
        fix = "lower learner.batch_size or rollout.trajectories_per_push"
    raise ConfigError(
        f"{key}: {detail}, {_size(need)} in all, but {_size(available)} of memory is "
        f"available; {fix}, or set run.skip_memory_check=true"
    )


# ---------------------------------------------------------------------------- all of them


def validate_before_start(cfg: TrainConfig) -> None:
    """Every check that needs neither Ray nor the launcher (module doc); call before Ray starts.

    Raises:
        ConfigError: one line naming the key, for the first problem found.
    """
    check_finite(cfg)
    check_run_dir(cfg.run.dir, "run.dir")
    if cfg.checkpoint.dir:
        check_run_dir(cfg.checkpoint.dir, "checkpoint.dir")
    check_memory(cfg)
