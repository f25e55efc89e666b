"""Typed configuration of ``gfn-dist train`` (OmegaConf structured configs).

One dataclass per section; every field has a one-line doc and, where it has
one, its unit in the name (``timeout_s``, ``sync_every`` in learner steps).
Defaults live here and only here: a YAML preset in ``configs/`` sets what its
experiment changes, and the command line overrides with ``key.sub=value``.

``load_config(path, overrides)`` merges the three layers onto the schema and
builds the dataclasses (``OmegaConf.to_object``), which runs every
``__post_init__``: a bad value raises ``ConfigError`` naming the key
(unknown key, wrong type, out of range). ``check_world_size`` is the one check
that needs the launcher (the global batch must split evenly over the learners).

Sections: ``env``, ``model``, ``loss``, ``sampler``, ``rollout``, ``replay``,
``learner``, ``eval``, ``run``, ``checkpoint``, ``logging``, ``cluster``; and the
top-level ``resume`` (false | true | auto, see ``gfn_dist.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gfn_dist.config_sections import (  # noqa: F401  (re-exported: the sections and their names)
    DEVICES,
    ENV_NAMES,
    LAUNCHERS,
    LOSS_NAMES,
    PB_NAMES,
    PLACEMENT_STRATEGIES,
    POLICY_NAMES,
    SAMPLER_NAMES,
    SUBTB_WEIGHTINGS,
    WANDB_MODES,
    BitSeqConfig,
    CheckpointConfig,
    ClusterConfig,
    EnvConfig,
    EvalConfig,
    HyperGridConfig,
    LearnerConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    PolicyKwargsConfig,
    ReplayConfig,
    RolloutConfig,
    RunConfig,
    SamplerConfig,
    WandbConfig,
    _builtin_or_path,
    _choice,
    _positive,
    is_import_path,
)
from gfn_dist.errors import ConfigError  # re-exported: every layer raises it


@dataclass
class TrainConfig:
    """The whole run."""

    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    resume: bool | str = False  # false | true (newest checkpoint, must exist) | auto (if one exists)

    def __post_init__(self) -> None:
        if not isinstance(self.resume, bool) and self.resume != "auto":
            raise ConfigError(f"resume: must be true, false or auto, got {self.resume!r}")
        if self.model.policy in ("lstm", "gru") and self.env.name in ("hypergrid", "nar_bitseq"):
            raise ConfigError(
                f"model.policy: a recurrent policy ({self.model.policy}) needs an autoregressive env "
                f"(env.name=bitseq), got env.name={self.env.name}"
            )
        if self.model.pb == "none" and self.env.name in ("hypergrid", "nar_bitseq"):
            raise ConfigError(f"model.pb: 'none' (P_B = 1) needs a tree DAG (env.name=bitseq), got {self.env.name}")
        if self.sampler.name == "local_search" and self.model.pb == "none":
            raise ConfigError("sampler.name: local_search needs a backward policy (model.pb learned | uniform)")
        if self.loss.is_relative and self.model.pb == "learned":
            raise ConfigError(
                f"model.pb: the relative loss {self.loss.name} does not use P_B; set model.pb=uniform (or none)"
            )
        if self.model.policy in ("lstm", "gru") and self.sampler.name == "local_search":
            raise ConfigError("sampler.name: local_search is not supported with a recurrent policy (model.policy)")
        if self.cluster.launcher == "ray" and self.learner.batch_size % self.cluster.num_learners != 0:
            raise ConfigError(
                f"learner.batch_size: {self.learner.batch_size} is not divisible by "
                f"cluster.num_learners={self.cluster.num_learners}"
            )


# ---------------------------------------------------------------------------- loading


def format_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def merge_config_layers(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML preset <- ``key.sub=value`` overrides, merged but not built.

    Keys and types are checked (OmegaConf's structured merge); the cross-key checks of the
    dataclasses' ``__post_init__`` are not (``load_config`` runs them). ``gfn_dist.resume``
    reads ``resume`` / ``run.dir`` from this before it knows which config a resumed run has.

    Raises:
        ConfigError: naming the key, for an unknown key, a wrong type, a malformed override or
            an unreadable preset (or one whose top level is not a mapping).
    """
    schema = OmegaConf.structured(TrainConfig)
    layers = [schema]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            preset = OmegaConf.load(p)
        except Exception as err:  # a YAML syntax error
            raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(preset, DictConfig):
            raise ConfigError(
                f"{p}: the top level must be a mapping of sections (env:, learner:, ...), "
                f"got a {type(preset).__name__.removesuffix('Config').lower()}"
            )
        layers.append(preset)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key.sub=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.merge(*layers)  # type: ignore[return-value]  # merging DictConfigs gives a DictConfig
    except OmegaConfBaseException as err:
        raise ConfigError(format_omegaconf_error(err)) from err


def build_config(merged: DictConfig) -> TrainConfig:
    """The validated ``TrainConfig`` of merged layers (every ``__post_init__``, ``check_finite``).

    Raises:
        ConfigError: naming the key, for an out-of-range value, NaN or an infinity, or keys
            that do not go together.
    """
    try:
        cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]  # a structured config's object
    except OmegaConfBaseException as err:
        raise ConfigError(format_omegaconf_error(err)) from err
    check_finite(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Schema defaults <- YAML preset <- ``key.sub=value`` overrides, validated.

    Args:
        path: a YAML preset (``configs/*.yaml``) or None for the defaults.
        overrides: dotlist overrides, e.g. ``["learner.batch_size=128", "run.dir=/tmp/x"]``.

    Returns:
        the validated ``TrainConfig``.

    Raises:
        ConfigError: naming the key, for an unknown key, a wrong type, an out-of-range
            value, NaN or an infinity, a malformed override or an unreadable preset
            (or one whose top level is not a mapping).
    """
    return build_config(merge_config_layers(path, overrides))


#: Float keys for which an infinity is a meaningful setting (-inf: no clipping).
INFINITY_ALLOWED = {"loss.log_reward_clip_min": -math.inf}


def check_finite(cfg: TrainConfig) -> None:
    """Refuses NaN and +-inf in every float of the configuration (walks the dataclasses, dicts and lists).

    ``INFINITY_ALLOWED`` lists the keys that may be set to an infinity.

    Raises:
        ConfigError: naming the first key holding NaN or an infinity.
    """

    def walk(value, key: str) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value) and INFINITY_ALLOWED.get(key) != value:
            raise ConfigError(f"{key}: must be a finite number, got {value}")

    walk(cfg, "")


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """Checks what depends on the number of learners.

    Raises:
        ConfigError: if ``learner.batch_size`` is not divisible by ``world_size``.
    """
    if cfg.learner.batch_size % world_size != 0:
        raise ConfigError(
            f"learner.batch_size: {cfg.learner.batch_size} is not divisible by the world size {world_size}"
        )


def check_devices(cfg: TrainConfig, num_gpus: int | None = None) -> None:
    """Checks that the GPUs the configuration asks for exist (before anything starts).

    Ray GPUs (rollout actors' shares; with ``cluster.launcher=ray`` and ``learner.device=cuda``, one
    whole GPU per learner worker, which no actor can share) are checked only for an embedded Ray
    (``cluster.address`` unset): a cluster's GPUs are not this machine's. Asking an embedded Ray for
    more would leave the actors or learners waiting for resources forever.

    Args:
        cfg: the configuration.
        num_gpus: CUDA devices visible here (``torch.cuda.device_count()`` when None).

    Raises:
        ConfigError: naming ``learner.device``, ``cluster.num_learners`` or ``rollout.num_gpus_per_actor``.
    """
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.learner.device == "cuda" and num_gpus == 0:
        raise ConfigError(
            f"learner.device: 'cuda' requested but no CUDA GPU is visible; use one of "
            f"{[d for d in DEVICES if d != 'cuda']}"
        )
    if cfg.cluster.address:
        return
    learners = cfg.cluster.num_learners if cfg.cluster.launcher == "ray" and cfg.learner.device == "cuda" else 0
    if learners > num_gpus:
        raise ConfigError(
            f"cluster.num_learners: {learners} learner workers with learner.device=cuda take one GPU each "
            f"but {num_gpus} are visible; use at most {num_gpus} (or learner.device=cpu)"
        )
    need = cfg.rollout.num_actors * cfg.rollout.num_gpus_per_actor
    if need > 0 and need > num_gpus - learners + 1e-9:  # 3 x 0.1 is 0.30000000000000004
        beside = f" beside the learners' {learners}" if learners else ""
        raise ConfigError(
            f"rollout.num_gpus_per_actor: {cfg.rollout.num_actors} actors x "
            f"{cfg.rollout.num_gpus_per_actor:g} GPUs need {need:g} GPUs{beside} but {num_gpus} are visible; "
            f"set it to 0 (or at most {(num_gpus - learners) / cfg.rollout.num_actors:g})"
        )


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML (what ``RUN_DIR/config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict:
    """The configuration as plain nested dicts (e.g. for wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]  # a structured config's container is a dict


def from_dict(data: dict) -> TrainConfig:
    """Inverse of ``to_dict`` (validated)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), data))  # type: ignore[return-value]  # to_object of a structured config is the dataclass


def limiter_tolerance(cfg: TrainConfig, world_size: int = 1) -> float:
    """Rate-limiter tolerance in items (``replay.samples_per_insert_tolerance`` or its default).

    The default is the smallest value with which the limiter cannot stall on
    batched calls (``replay_shard`` module doc): ``spi * n_insert + n_sample``,
    with ``n_insert`` a push and ``n_sample`` a rank's whole share of a batch
    (the most one shard can be asked for at once).
    """
    r = cfg.replay
    if r.samples_per_insert_tolerance is not None:
        return float(r.samples_per_insert_tolerance)
    spi = float(r.samples_per_insert or 0.0)
    n_insert = cfg.rollout.trajectories_per_push * (1 + _local_search_loops(cfg))
    return spi * n_insert + cfg.learner.batch_size // world_size


def _local_search_loops(cfg: TrainConfig) -> int:
    return cfg.sampler.n_local_search_loops if cfg.sampler.name == "local_search" else 0


def resolve_on_policy(cfg: TrainConfig) -> TrainConfig:
    """With ``learner.on_policy``, sets replay so every trajectory is fresh and used ~once.

    Same code path as off-policy training; only the numbers change: weights are
    published every step, each shard holds one batch worth of trajectories
    (older ones are evicted) and serves only when full, and the rate limiter
    targets one sample per insert with the smallest stall-free tolerance, so
    each trajectory is used once on average and the actors run at most about
    one batch ahead (policy lag of a few steps; bound in tests/test_trainer_ray.py).
    """
    if not cfg.learner.on_policy:
        return cfg
    r, lrn = cfg.replay, cfg.learner
    per_push = cfg.rollout.trajectories_per_push * (1 + _local_search_loops(cfg))
    per_shard = max(per_push, -(-lrn.batch_size // r.num_shards))
    lrn.sync_every = 1
    r.capacity_per_shard = per_shard
    r.min_size_to_sample = per_shard
    r.samples_per_insert = 1.0
    # The smallest tolerance that cannot stall (replay_shard module doc:
    # spi * n_insert + n_sample <= spi * m + 2 * tolerance, n_sample <= batch_size).
    r.samples_per_insert_tolerance = max(1.0, (per_push + lrn.batch_size - per_shard) / 2)
    r.prioritized = False
    return cfg
