"""gfn_dist: distributed GFlowNet training (Ray rollout actors, sharded replay, DDP learners).

``gfn_dist.run(config, overrides)`` runs the job of ``gfn-dist train`` from Python
and returns its last metrics row. Importing ``gfn_dist`` stays light: torch and
Ray are imported on the first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["__version__", "run"]


def _config_path(config: str | Path) -> Path:
    """A path to a YAML preset as given, or a preset name (``hypergrid_tb``) looked up in the
    repository's ``configs/`` (``configs/hypergrid_tb.yaml``).

    Raises:
        ConfigError: neither names a file (the message names both places looked at).
    """
    from gfn_dist.errors import ConfigError

    p = Path(config)
    if p.is_file():
        return p
    name = str(config)
    if p.suffix == "" and "/" not in name and "\\" not in name and name:
        preset = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
        if preset.is_file():
            return preset
        raise ConfigError(f"config: {name!r} is neither a file nor a preset in {preset.parent}")
    raise ConfigError(f"config file not found: {p}")


def run(config: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Runs the job of ``gfn-dist train CONFIG [overrides...]`` in this process; returns the last metrics row.

    The same assembly as the CLI (``gfn_dist.train.run_train``): ``load_config`` (schema
    defaults <- preset <- overrides; when resuming, the checkpoint's config <- overrides,
    ``gfn_dist.resume``), ``resolve_on_policy``, ``gfn_dist.trainer.Trainer``,
    ``train()``, and ``close()`` in ``finally`` (actors killed, an embedded Ray shut down,
    the run directory's lock released). Unlike the CLI it installs no SIGTERM / SIGINT
    handlers (an embedding program keeps its own; ``gfn_dist.preemption.request_preemption``
    stops a run at the next step with a checkpoint) and does not configure logging.

    Args:
        config: a YAML preset path (``configs/hypergrid_tb.yaml``) or a preset name
            (``hypergrid_tb``, looked up in the repository's ``configs/``).
        overrides: ``key.sub=value`` strings, e.g. ``["learner.max_steps=200", "run.dir=/tmp/r"]``.

    Returns:
        the last metrics row logged (a dict: ``step``, ``loss``, ``eval/*``, ``l1_exact``
        on enumerable environments, ...); ``{}`` on a non-owner torchrun rank that logged none.
        Resuming a run already at its budget trains nothing and returns the last row of its
        ``metrics.jsonl``.

    Raises:
        ConfigError: bad input (unknown key, wrong type, an ``env.name`` that does not import,
            ...), naming the key, before any actor starts.
        ReplayStalled, DiskFullError, ClusterUnreachableError: as the CLI's exit code 1 cases.
    """
    import logging

    from gfn_dist.metrics import read_jsonl
    from gfn_dist.preemption import clear_preemption
    from gfn_dist.resume import log_changes, resolve_train_config

    path = _config_path(config)
    resolved = resolve_train_config(str(path), list(overrides))  # resume: the checkpoint's config + overrides
    if resolved.finished:  # nothing left to train: the run's last row, no Ray
        logging.getLogger("gfn_dist").info(resolved.finished_message())
        assert resolved.run_dir is not None  # a finished run is a resumed one
        metrics = resolved.run_dir / "metrics.jsonl"
        rows = read_jsonl(metrics) if metrics.is_file() else []
        return dict(rows[-1]) if rows else {}
    log_changes(resolved)
    cfg = resolved.cfg
    from gfn_dist.trainer import Trainer  # heavy imports (Ray) only for a valid config

    clear_preemption()  # a flag left by an earlier run in this process would stop this one at once
    trainer = None
    try:
        trainer = Trainer(cfg, preset=path.stem)
        return dict(trainer.train())
    finally:
        if trainer is not None:
            trainer.close()
