"""The configuration of a resumed run: the checkpoint's, with the command line's overrides on top.

``gfn-dist train [PRESET] resume=true run.dir=DIR [key=value ...]`` continues
the run in ``DIR`` with the configuration it was trained with: the newest
intact checkpoint's ``config.yaml`` (``RUN_DIR/config.yaml`` when the
checkpoint has none), then the command line's ``key=value`` overrides. The
preset, if given, only names the run (``runs/<preset>-*`` when ``run.dir`` is
not set): its values are not applied again, so the overrides of earlier
starts are kept. Every key that changes is logged as one line,
``resume: key: old -> new``. ``check_resumable`` (the ``Trainer``'s check,
after the run lock) and ``resume_run_dir`` (which run, without ``run.dir``) live
here too; ``gfn_dist.checkpoint`` re-exports them.

``resolve_train_config`` is what ``gfn_dist.train.run_train`` calls before
anything of the run is touched (no lock, no file written, no Ray):

* ``resume=false`` (the default): ``load_config(preset, overrides)``, as always;
* a checkpoint to continue: the merged configuration, or a ``ConfigError`` naming
  every key that cannot change on resume (``COMPAT_KEYS``:
  ``env``, ``model``, ``loss.name``, the replay shards' shapes);
* a run already at its budget (the checkpoint's step >= ``learner.total_steps``):
  ``ResolvedConfig.finished``, which the CLI reports in one line (exit 0);
* ``resume=auto`` without a checkpoint: a fresh run from the preset and overrides.

Under torchrun every rank resolves the same files. A rank > 0 that cannot see
the checkpoint (a node without ``RUN_DIR``) keeps the command line's
configuration, as before: rank 0 decides the resume (``Trainer``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gfn_dist.config import (
    ConfigError,
    TrainConfig,
    build_config,
    format_omegaconf_error,
    load_config,
    merge_config_layers,
    resolve_on_policy,
    to_dict,
)

logger = logging.getLogger(__name__)

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
#: Configuration keys a checkpoint must share with the run that resumes it (shapes of
#: the model, the environment and the replay snapshots). A section name covers all its keys.
COMPAT_KEYS = ("env", "model", "loss.name", "replay.num_shards", "replay.capacity_per_shard")
#: Keys not reported as changes: ``resume`` itself differs from the first start's by design.
UNREPORTED_KEYS = ("resume",)


@dataclass
class ResolvedConfig:
    """What ``gfn-dist train`` runs with.

    Attributes:
        cfg: the validated configuration (on-policy settings resolved).
        run_dir: the run continued (absolute), or None for a fresh run.
        step: the checkpoint's step, or None for a fresh run.
        checkpoint: the checkpoint directory continued, or None.
        changes: ``(key, old, new)`` for every key the command line changed against the checkpoint's.
    """

    cfg: TrainConfig
    run_dir: Path | None = None
    step: int | None = None
    checkpoint: Path | None = None
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """The checkpoint is at (or past) the run's budget: nothing is left to train."""
        return self.step is not None and self.step >= self.cfg.learner.total_steps

    def finished_message(self) -> str:
        """One line: the run is finished, where its results are, how to train further."""
        assert self.run_dir is not None and self.checkpoint is not None, "only a resumed run is finished"
        where, ckpt = self.run_dir, self.checkpoint
        results = [n for n in ("metrics.jsonl", "policy.pt", "plots") if (where / n).exists()]
        results.append(str(ckpt.relative_to(where) if ckpt.is_relative_to(where) else ckpt))  # checkpoint.dir elsewhere
        return (
            f"run {where} is finished (step {self.step} of {self.cfg.learner.total_steps}); its results are in "
            f"{where} ({', '.join(results)}): gfn-dist plot / gfn-dist eval read them; "
            f"to train further, resume with learner.max_steps > {self.step}"
        )


# ---------------------------------------------------------------------------- locating a run, what may change


def _newest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    """``checkpoint_files.latest_intact_checkpoint(root)`` (torn newer ones skipped with a warning).

    Imported here, not at the top: ``checkpoint_files`` imports torch (1.5 s, far more on a busy
    node), and ``gfn_dist.train`` imports this module for every run, whose config errors must stay
    quick; only a resume looks for a checkpoint (``gfn_dist.train`` defers Ray the same way).
    """
    from gfn_dist.checkpoint_files import latest_intact_checkpoint

    return latest_intact_checkpoint(root)


def checkpoint_root(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """``checkpoint.dir``, or ``run_dir/checkpoints``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def resume_run_dir(cfg: TrainConfig, preset: str, runs_root: str | Path = "runs") -> str | None:
    """The run directory to continue when ``run.dir`` is not given, else None: ``resume=true`` takes the
    newest ``runs_root/<preset>-*`` holding a checkpoint; ``auto`` does so only on a torchrun restart.

    Raises:
        ConfigError: if ``resume=true`` and no ``runs_root/<preset>-*`` run holds a checkpoint.
    """
    if cfg.resume is False or cfg.run.dir or cfg.checkpoint.dir:
        return None
    if cfg.resume == "auto" and int(os.environ.get(RESTART_ENV, "0")) == 0:
        return None
    for d in sorted(Path(runs_root).glob(f"{preset}-*"), reverse=True):  # names end in a sortable timestamp
        if _newest_checkpoint(checkpoint_root(cfg, d)) is not None:
            logger.info("resume: continuing the latest %s run with a checkpoint: %s", preset, d)
            return str(d)
    if cfg.resume is True:
        raise ConfigError(
            f"resume: true, but run.dir is not set and no {runs_root}/{preset}-*/checkpoints/step_* "
            "exists (set run.dir to the run to continue)"
        )
    return None


def check_resumable(cfg: TrainConfig, run_dir: str | Path) -> int | None:
    """The step a run in ``run_dir`` resumes from, checked before anything of the run is touched.

    Reads only the newest intact checkpoint's ``config.yaml`` (torn newer ones are skipped
    with a warning), so a refused resume leaves every file of the run as it was.

    Returns:
        the checkpoint's step, or None when the run starts fresh (``resume=false``, or ``auto``
        without a checkpoint).

    Raises:
        ConfigError: ``resume=true`` without a checkpoint, or the checkpoint's configuration
            differs in a ``COMPAT_KEYS`` key (every such key named).
    """
    if cfg.resume is False:
        return None
    root = checkpoint_root(cfg, run_dir)
    found = _newest_checkpoint(root)
    if found is None:
        if cfg.resume is True:
            raise ConfigError(f"resume: true, but there is no checkpoint in {root}")
        return None
    step, path = found
    saved = OmegaConf.to_container(OmegaConf.create((path / "config.yaml").read_text()))
    diffs = config_differences(saved, cfg)  # type: ignore[arg-type]  # the saved config.yaml is a mapping
    if diffs:
        raise ConfigError(f"resume: checkpoint {path} is incompatible with this configuration: " + "; ".join(diffs))
    return step


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<missing>"
        tree = tree[part]
    return tree


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """``COMPAT_KEYS`` whose values differ between a checkpoint's config and ``cfg``, as
    ``"key: checkpoint X, config Y"`` lines (empty when compatible)."""
    current = to_dict(cfg)
    diffs = []
    for key in COMPAT_KEYS:
        a, b = flatten(_lookup(saved, key), key), flatten(_lookup(current, key), key)
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                diffs.append(f"{k}: checkpoint {a.get(k, '<missing>')!r}, config {b.get(k, '<missing>')!r}")
    return diffs


# ---------------------------------------------------------------------------- the configuration of a resumed run


def split_preset(config: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``gfn-dist train resume=true run.dir=D``: argparse takes the first override for the preset.

    Returns:
        ``(preset or None, overrides)``: a first argument holding ``=`` that is not a file is an override.
    """
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, list(overrides)


def is_global_rank0() -> bool:
    """This process is global rank 0 under torchrun, or not under torchrun (the one that logs)."""
    return os.environ.get("RANK", "0") == "0"


def config_changes(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every leaf key whose value differs (``UNREPORTED_KEYS`` left out), sorted by key."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    missing = "<missing>"
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if k not in UNREPORTED_KEYS and a.get(k, missing) != b.get(k, missing)
    ]


def _where_to_resume(first: DictConfig, preset_name: str | None) -> tuple[Path | None, Path | None]:
    """``(run_dir, checkpoint root)`` a resume reads, from the command line's ``resume``, ``run.dir``,
    ``checkpoint.dir`` (``checkpoint.dir`` from ``RUN_DIR/config.yaml`` when the command line has none).

    Raises:
        ConfigError: ``resume=true`` without ``run.dir`` and no run of the preset to continue.
    """
    probe = TrainConfig()  # the three keys that locate a run, as checkpoint.resume_run_dir reads them
    probe.resume, probe.run.dir, probe.checkpoint.dir = first.resume, first.run.dir, first.checkpoint.dir
    run_dir = probe.run.dir
    if run_dir is None:
        if preset_name is None:
            if probe.resume is True:
                raise ConfigError("resume: true without a preset needs run.dir (the run to continue)")
            return None, None
        run_dir = resume_run_dir(probe, preset_name)
        if run_dir is None:
            return None, None
    run_path = Path(run_dir).expanduser().absolute()
    ckpt_dir = probe.checkpoint.dir
    saved = run_path / "config.yaml"
    if ckpt_dir is None and saved.is_file():
        try:
            ckpt_dir = OmegaConf.select(OmegaConf.load(saved), "checkpoint.dir")
        except Exception as err:  # an unreadable config.yaml: the checkpoints' own copies still count
            logger.warning("resume: %s not readable (%s); looking in %s/checkpoints", saved, err, run_path)
    probe.checkpoint.dir = ckpt_dir
    return run_path, checkpoint_root(probe, run_path)


def _saved_config(ckpt: Path, run_dir: Path) -> tuple[Path, DictConfig]:
    """The checkpoint's ``config.yaml`` (else ``RUN_DIR/config.yaml``), parsed."""
    path = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else run_dir / "config.yaml"
    try:
        saved = OmegaConf.load(path)
    except Exception as err:  # missing or not YAML
        raise ConfigError(f"resume: cannot read the run's config {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(saved, DictConfig):
        raise ConfigError(f"resume: {path}: the top level must be a mapping of sections")
    return path, saved


def _fresh(preset: str | None, overrides: Sequence[str]) -> ResolvedConfig:
    if preset is None:
        raise ConfigError("config: a preset or a YAML file is needed unless resuming a run (resume=true run.dir=DIR)")
    return ResolvedConfig(resolve_on_policy(load_config(preset, overrides)))


def resolve_train_config(
    preset: str | None, overrides: Sequence[str], preset_name: str | None = None
) -> ResolvedConfig:
    """The configuration ``gfn-dist train`` runs with (module doc); reads files only.

    Args:
        preset: the preset's YAML file, or None (allowed when resuming).
        overrides: the command line's ``key.sub=value`` overrides.
        preset_name: names the run (``runs/<preset_name>-*``); default the preset file's stem.

    Returns:
        the ``ResolvedConfig`` (``finished`` when the checkpoint is at the budget).

    Raises:
        ConfigError: one line naming the key: a bad value, a key that cannot change on
            resume, ``resume=true`` without a checkpoint, an unreadable saved config.
    """
    if preset_name is None and preset is not None:
        preset_name = Path(preset).stem
    first = merge_config_layers(preset, overrides)
    if first.resume is False:
        return _fresh(preset, overrides)
    run_dir, root = _where_to_resume(first, preset_name)
    found = _newest_checkpoint(root) if root is not None else None  # torn newer ones: a warning
    if run_dir is None or root is None or found is None:
        if first.resume is True and is_global_rank0():
            raise ConfigError(f"resume: true, but there is no checkpoint in {root}")
        return _fresh(preset, overrides)  # auto: a fresh run; torchrun rank > 0 without RUN_DIR: rank 0 decides
    step, ckpt = found
    saved_path, saved = _saved_config(ckpt, run_dir)
    try:
        base = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except OmegaConfBaseException as err:  # e.g. a key this version of gfn_dist does not know
        raise ConfigError(f"resume: {saved_path}: {format_omegaconf_error(err)}") from err
    old = build_config(base)  # type: ignore[arg-type]  # merging onto a structured config gives a DictConfig
    try:  # the overrides' keys and types were checked in `first`: this merge fails only on odd saved values
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        merged.resume = first.resume
        merged.run.dir = str(run_dir)
    except OmegaConfBaseException as err:
        raise ConfigError(format_omegaconf_error(err)) from err
    cfg = resolve_on_policy(build_config(merged))  # type: ignore[arg-type]  # a DictConfig
    diffs = config_differences(OmegaConf.to_container(saved), cfg)  # type: ignore[arg-type]  # a mapping (checked above)
    if diffs:
        raise ConfigError(
            f"resume: {'; '.join(diffs)}: cannot change when resuming {ckpt} (start a new run.dir to change it)"
        )
    return ResolvedConfig(cfg, run_dir, step, ckpt, config_changes(old, cfg))


def log_changes(resolved: ResolvedConfig) -> None:
    """One INFO line per changed key (global rank 0 only), and which checkpoint the run continues."""
    if resolved.checkpoint is None or not is_global_rank0():
        return
    logger.info("resume: the configuration of %s, with the command line's overrides on top", resolved.checkpoint)
    for key, old, new in resolved.changes:
        logger.info("resume: %s: %s -> %s", key, old, new)
