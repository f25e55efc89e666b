"""The sections of the typed configuration (``gfn_dist.config``): one dataclass per section.

Every field has a one-line doc (the comment on its line, which ``gfn-dist config``
shows) and, where it has one, its unit in the name (``timeout_s``, ``sync_every``
in learner steps). Each ``__post_init__`` checks its own values and raises
``ConfigError`` naming the key. ``gfn_dist.config`` assembles them into
``TrainConfig`` and re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfn_dist.errors import ConfigError

ENV_NAMES = ("hypergrid", "bitseq", "nar_bitseq")
POLICY_NAMES = ("mlp", "lstm", "gru")
PB_NAMES = ("learned", "uniform", "none")
LOSS_NAMES = ("tb", "lpv", "rtb", "relative_lpv", "trust_pcl", "db", "modified_db", "subtb", "fm")
SUBTB_WEIGHTINGS = ("geometric_within", "equal_within", "equal", "TB", "ModifiedDB", "DB")
SAMPLER_NAMES = ("sampler", "local_search")
LAUNCHERS = ("auto", "local", "torchrun", "ray")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("disabled", "offline", "online")


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``"package.module:Attr"`` (both sides non-empty)."""
    module, sep, attr = str(name).partition(":")
    return bool(sep) and bool(module.strip()) and bool(attr.strip()) and ":" not in attr


def _builtin_or_path(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed and not is_import_path(value):
        raise ConfigError(
            f"{key}: must be one of {list(allowed)} or an import path 'package.module:Attr', got {value!r}"
        )


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ---------------------------------------------------------------------------- env


@dataclass
class HyperGridConfig:
    """``HyperGrid(ndim, height, R0, R1, R2)`` (arXiv:2106.04399, "original" reward)."""

    ndim: int = 2  # D, number of dimensions
    height: int = 8  # H, side length of the grid
    R0: float = 0.1  # base reward (> 0)
    R1: float = 0.5  # bonus of the outer ring
    R2: float = 2.0  # bonus of the modes

    def __post_init__(self) -> None:
        if self.ndim < 1:
            raise ConfigError(f"env.hypergrid.ndim: must be >= 1, got {self.ndim}")
        if self.height < 2:
            raise ConfigError(f"env.hypergrid.height: must be >= 2, got {self.height}")
        _positive("env.hypergrid.R0", self.R0)


@dataclass
class BitSeqConfig:
    """``BitSequence`` / ``NonAutoregressiveBitSequence`` parameters (arXiv:2201.13259, Sec. 5.3)."""

    word_size: int = 1  # bits per word (n_words = 2 ** word_size)
    seq_size: int = 8  # bits per sequence, a multiple of word_size
    n_modes: int = 4  # number of mode sequences of the reward
    temperature: float = 1.0  # reward temperature: log R = -min Hamming / temperature
    seed: int = 0  # seed of the modes
    mode_radius: int = 0  # eval/modes_found: a mode counts as found by a sample within this Hamming distance (bits)

    def __post_init__(self) -> None:
        _positive("env.bitseq.mode_radius", self.mode_radius, allow_zero=True)
        _positive("env.bitseq.word_size", self.word_size)
        _positive("env.bitseq.seq_size", self.seq_size)
        if self.seq_size % self.word_size != 0:
            raise ConfigError(
                f"env.bitseq.seq_size: must be a multiple of word_size={self.word_size}, got {self.seq_size}"
            )
        _positive("env.bitseq.n_modes", self.n_modes)
        _positive("env.bitseq.temperature", self.temperature)


@dataclass
class EnvConfig:
    """Which environment: a built-in name (parameters in its sub-section) or an import path
    ``"package.module:ClassName"`` of a ``DiscreteEnv`` subclass, built as ``ClassName(**env.kwargs,
    device=...)`` (``gfn_dist.builders.build_env``; docs/your_own_task.md)."""

    name: str = "hypergrid"  # hypergrid | bitseq | nar_bitseq | package.module:ClassName (a DiscreteEnv subclass)
    hypergrid: HyperGridConfig = field(default_factory=HyperGridConfig)  # used when name = hypergrid
    bitseq: BitSeqConfig = field(default_factory=BitSeqConfig)  # used when name = bitseq | nar_bitseq
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments of an import-path env

    def __post_init__(self) -> None:
        _builtin_or_path("env.name", self.name, ENV_NAMES)
        if self.kwargs and not self.is_import_path:
            raise ConfigError(
                f"env.kwargs: only for an env given by import path; built-in env.name={self.name} "
                f"takes env.{'hypergrid' if self.name == 'hypergrid' else 'bitseq'}.*"
            )

    @property
    def is_import_path(self) -> bool:
        """Whether ``name`` is an import path (a user's environment)."""
        return self.name not in ENV_NAMES


# ---------------------------------------------------------------------------- model / loss


@dataclass
class ModelConfig:
    """Policy networks (P_F, and P_B when learned): built-in names or import paths
    ``"package.module:factory"`` called as ``factory(env, **model.kwargs)`` (P_B: ``**model.pb_kwargs``),
    returning an ``nn.Module`` (``gfn_dist.builders.build_pf`` / ``build_pb``; docs/your_own_task.md)."""

    policy: str = "mlp"  # mlp | lstm | gru (recurrent: autoregressive envs) | package.module:factory
    hidden_dim: int = 256  # width of hidden layers / recurrent state (built-in policies)
    n_hidden_layers: int = 2  # hidden layers of the MLP (recurrent: stacked RNN layers) (built-in policies)
    pb: str = "learned"  # learned (MLP) | uniform | none (tree DAG: P_B = 1) | package.module:factory
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the policy factory (import paths)
    pb_kwargs: dict[str, Any] | None = None  # keyword arguments of the P_B factory; null = model.kwargs

    def __post_init__(self) -> None:
        _builtin_or_path("model.policy", self.policy, POLICY_NAMES)
        _builtin_or_path("model.pb", self.pb, PB_NAMES)
        if (self.kwargs or self.pb_kwargs) and not (is_import_path(self.policy) or is_import_path(self.pb)):
            raise ConfigError(
                "model.kwargs: only for a policy given by import path (model.policy / model.pb); "
                "built-in policies take model.hidden_dim / model.n_hidden_layers"
            )
        _positive("model.hidden_dim", self.hidden_dim)
        _positive("model.n_hidden_layers", self.n_hidden_layers)


@dataclass
class LossConfig:
    """The GFlowNet objective and its parameters."""

    name: str = "tb"  # tb | lpv | rtb | relative_lpv | trust_pcl | db | modified_db | subtb | fm
    init_logZ: float = 0.0  # initial learned logZ (tb, rtb, trust_pcl)
    beta: float = 1.0  # reward exponent of the relative losses: target ∝ prior * R ** beta
    alpha: float = 1.0  # Trust-PCL regularisation weight (alpha = 1 / beta)
    log_reward_clip_min: float = -math.inf  # log-rewards are clamped from below to this
    prior_checkpoint: str | None = None  # relative losses: prior P_F from a file saved by a run (policy.pt)
    prior_seed: int = 1234  # relative losses without a checkpoint: prior = the model's P_F initialised with this seed
    subtb_weighting: str = "geometric_within"  # subtb: sub-trajectory weights (arXiv:2209.12782; torchgfn's names)
    subtb_lamda: float = 0.9  # subtb: geometric weight λ^(length - 1) of a sub-trajectory (> 0)
    forward_looking: bool = False  # db / subtb: flows log F(s) + log R(s) (arXiv:2302.01687); learners compute R(s)
    fm_alpha: float = 1.0  # fm: weight of the reward-matching term (>= 0)

    def __post_init__(self) -> None:
        _choice("loss.name", self.name, LOSS_NAMES)
        _choice("loss.subtb_weighting", self.subtb_weighting, SUBTB_WEIGHTINGS)
        _positive("loss.subtb_lamda", self.subtb_lamda)
        _positive("loss.fm_alpha", self.fm_alpha, allow_zero=True)
        _positive("loss.beta", self.beta)
        _positive("loss.alpha", self.alpha)
        if self.prior_checkpoint and not Path(self.prior_checkpoint).is_file():
            raise ConfigError(f"loss.prior_checkpoint: file not found: {self.prior_checkpoint}")

    @property
    def is_relative(self) -> bool:
        """Whether the loss fine-tunes against a frozen prior policy."""
        return self.name in ("rtb", "relative_lpv", "trust_pcl")

    @property
    def has_state_flow(self) -> bool:
        """Whether the loss learns a log-state-flow network (part of the learner's model only)."""
        return self.name in ("db", "subtb")


# ---------------------------------------------------------------------------- sampling


@dataclass
class PolicyKwargsConfig:
    """Exploration of the behaviour policy (``policy_kwargs`` of the sampler)."""

    temperature: float = 1.0  # softmax temperature of P_F (> 0)
    sf_bias: float = 0.0  # subtracted from the exit logit
    epsilon: float = 0.0  # weight of the uniform mixture, in [0, 1]

    def __post_init__(self) -> None:
        _positive("sampler.policy_kwargs.temperature", self.temperature)
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"sampler.policy_kwargs.epsilon: must be in [0, 1], got {self.epsilon}")


@dataclass
class SamplerConfig:
    """How rollout actors sample (``Sampler`` or ``LocalSearchSampler``, arXiv:2310.02710)."""

    name: str = "sampler"  # sampler | local_search
    n_local_search_loops: int = 1  # local_search: refinement loops per batch (batch grows n * (1 + loops))
    back_ratio: float = 0.5  # local_search: fraction of each trajectory undone by the backward policy
    use_metropolis_hastings: bool = False  # local_search: MH acceptance (else: keep the higher reward)
    compile: bool = False  # sampler: torch.compile-d rollout chunks (gfn_dist.samplers; ~15 s to compile per actor)
    policy_kwargs: PolicyKwargsConfig = field(default_factory=PolicyKwargsConfig)  # exploration

    def __post_init__(self) -> None:
        _choice("sampler.name", self.name, SAMPLER_NAMES)
        _positive("sampler.n_local_search_loops", self.n_local_search_loops, allow_zero=True)
        if not 0.0 < self.back_ratio <= 1.0:
            raise ConfigError(f"sampler.back_ratio: must be in (0, 1], got {self.back_ratio}")


@dataclass
class RolloutConfig:
    """Rollout actors (Ray actors)."""

    num_actors: int = 1  # number of rollout actors
    trajectories_per_push: int = 64  # trajectories pushed to replay at once (one Ray call)
    # Most trajectories per sampler call (None: trajectories_per_push). A smaller value splits a push
    # into ceil(trajectories_per_push / sampler_batch_size) calls (the last one smaller when it does not
    # divide), each with the newest weights known (fresher data), while the per-push transport cost
    # (~0.3 ms of Ray call) is paid once.
    sampler_batch_size: int | None = None
    num_cpus_per_actor: float = 1.0  # Ray CPUs reserved per actor (fractional ok)
    num_gpus_per_actor: float = 0.0  # Ray GPUs per actor (fractional ok); > 0 samples on CUDA
    weight_poll_every: int = 1  # batches between checks for newer published weights
    synchronous: bool = (
        False  # rank 0 samples in-process before each step (deterministic; distributed.synchronous_rollout)
    )
    max_restarts: int = 3  # Ray restarts of a dead actor process (-1: unlimited; gfn_dist.distributed.health)
    max_consecutive_failures: int = 3  # the run fails when one actor fails this many times without pushing between
    # An actor that pushes nothing for this long (hung reward call, stopped process) is reported (metric
    # actors/stalls), killed and restarted; 0 disables. Pushes come every few ms to ~0.1 s here, a first
    # compiled rollout after 10-30 s: 120 s is far above both.
    stall_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        _positive("rollout.num_actors", self.num_actors)
        _positive("rollout.trajectories_per_push", self.trajectories_per_push)
        _positive("rollout.sampler_batch_size", self.sampler_batch_size)
        _positive("rollout.num_cpus_per_actor", self.num_cpus_per_actor, allow_zero=True)
        _positive("rollout.num_gpus_per_actor", self.num_gpus_per_actor, allow_zero=True)
        _positive("rollout.weight_poll_every", self.weight_poll_every)
        if self.max_restarts < -1:
            raise ConfigError(f"rollout.max_restarts: must be >= 0, or -1 for unlimited, got {self.max_restarts}")
        _positive("rollout.max_consecutive_failures", self.max_consecutive_failures)
        _positive("rollout.stall_timeout_s", self.stall_timeout_s, allow_zero=True)


@dataclass
class ReplayConfig:
    """Replay shards (Ray actors) and their Reverb-style rate limiter."""

    num_shards: int = 1  # shards; actor i inserts into shard i % num_shards
    capacity_per_shard: int = 10_000  # trajectories held per shard (FIFO eviction)
    prioritized: bool = False  # reward-prioritized sampling, P(i) ∝ R_i ** priority_alpha
    priority_alpha: float = 1.0  # prioritization exponent
    min_size_to_sample: int = 64  # items a shard holds before it serves samples
    samples_per_insert: float | None = 1.0  # target sampled / inserted items; null disables the limiter
    samples_per_insert_tolerance: float | None = None  # limiter tolerance in items; null = stall-free minimum
    timeout_s: float = 120.0  # learners / actors give up waiting on the rate limiter after this
    max_restarts: int = 3  # Ray restarts of a dead shard, restored from its latest snapshot (-1: unlimited)
    snapshot_every_inserts: int = 0  # snapshot shards to RUN_DIR/replay every this many items (0: checkpoints only)

    def __post_init__(self) -> None:
        _positive("replay.num_shards", self.num_shards)
        if self.max_restarts < -1:
            raise ConfigError(f"replay.max_restarts: must be >= 0, or -1 for unlimited, got {self.max_restarts}")
        _positive("replay.snapshot_every_inserts", self.snapshot_every_inserts, allow_zero=True)
        _positive("replay.capacity_per_shard", self.capacity_per_shard)
        _positive("replay.priority_alpha", self.priority_alpha, allow_zero=True)
        if not 1 <= self.min_size_to_sample <= self.capacity_per_shard:
            raise ConfigError(
                f"replay.min_size_to_sample: must be in [1, capacity_per_shard={self.capacity_per_shard}], "
                f"got {self.min_size_to_sample}"
            )
        _positive("replay.samples_per_insert", self.samples_per_insert, allow_zero=True)
        _positive("replay.samples_per_insert_tolerance", self.samples_per_insert_tolerance, allow_zero=True)
        _positive("replay.timeout_s", self.timeout_s)


@dataclass
class LearnerConfig:
    """Learners (torch DDP ranks): optimisation and budget."""

    batch_size: int = 64  # global trajectories per learner step (split evenly over ranks)
    lr: float = 1e-3  # Adam learning rate of the networks
    lr_logz: float = 0.1  # Adam learning rate of logZ
    grad_clip: float | None = 10.0  # max global gradient norm; null disables clipping
    sync_every: int = 1  # learner steps between weight publications to the actors
    max_steps: int | None = 1000  # budget in learner steps (the smaller of the two budgets applies)
    max_trajectories: int | None = None  # budget in consumed trajectories (rounded up to whole steps)
    on_policy: bool = False  # fresh trajectories only: each used once on average, a few steps old at most
    prefetch: bool = True  # draw the next batch from replay while the current step computes (one step older)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda

    def __post_init__(self) -> None:
        _positive("learner.batch_size", self.batch_size)
        _positive("learner.lr", self.lr)
        _positive("learner.lr_logz", self.lr_logz, allow_zero=True)
        _positive("learner.grad_clip", self.grad_clip)
        _positive("learner.sync_every", self.sync_every)
        _positive("learner.max_steps", self.max_steps)
        _positive("learner.max_trajectories", self.max_trajectories)
        if self.max_steps is None and self.max_trajectories is None:
            raise ConfigError("learner.max_steps: set a budget (learner.max_steps or learner.max_trajectories)")
        _choice("learner.device", self.device, DEVICES)

    @property
    def total_steps(self) -> int:
        """The budget in learner steps (max_trajectories rounded up to whole global batches)."""
        budgets = []
        if self.max_steps is not None:
            budgets.append(self.max_steps)
        if self.max_trajectories is not None:
            budgets.append(-(-self.max_trajectories // self.batch_size))
        return min(budgets)


@dataclass
class EvalConfig:
    """Evaluation on rank 0."""

    interval_steps: int = 100  # learner steps between evaluations (0 disables; the last step always evaluates)
    exact: bool = True  # exact L1 / logZ error by enumeration (enumerable envs only)
    num_samples: int = 1000  # sampled metrics (every env): trajectories drawn from the current P_F; 0 disables
    top_k: int = 100  # eval/reward_top{k}_mean: mean reward of the k best distinct terminal states sampled

    def __post_init__(self) -> None:
        _positive("eval.interval_steps", self.interval_steps, allow_zero=True)
        _positive("eval.num_samples", self.num_samples, allow_zero=True)
        _positive("eval.top_k", self.top_k)


@dataclass
class RunConfig:
    """Output and seeding."""

    dir: str | None = None  # run directory; null = runs/<preset>-<timestamp>
    seed: int = 0  # base seed: learner = seed, rollout actor i = seed + i
    save_policy: bool = True  # write RUN_DIR/policy.pt (pf / pb state dicts) at the end
    # Permission bits of a run directory gfn_dist creates (an existing one keeps its own): 0700 = owner
    # only. Octal in YAML (0750) or a string ('0o750', '750').
    dir_mode: int | str = 0o700
    skip_memory_check: bool = False  # experts: start even if replay + batch look larger than this machine's memory

    def __post_init__(self) -> None:
        mode = self.dir_mode
        try:
            mode = int(mode.removeprefix("0o"), 8) if isinstance(mode, str) else int(mode)
        except ValueError:
            raise ConfigError(
                f"run.dir_mode: expected octal permission bits such as 0700, got {self.dir_mode!r}"
            ) from None
        if not 0 <= mode <= 0o777 or not mode & 0o700 == 0o700:
            raise ConfigError(f"run.dir_mode: must be within 0o777 and give the owner rwx (0o7xx), got {mode:#o}")
        self.dir_mode = mode


@dataclass
class CheckpointConfig:
    """Checkpoints ``step_N/`` (layout, resume and preemption: ``gfn_dist.checkpoint``)."""

    interval_steps: int = 500  # learner steps between checkpoints (0: only at the end and on preemption)
    keep_last: int | None = 3  # newest checkpoints kept; null keeps all
    dir: str | None = None  # checkpoint directory; null = RUN_DIR/checkpoints

    def __post_init__(self) -> None:
        _positive("checkpoint.interval_steps", self.interval_steps, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class WandbConfig:
    """Weights & Biases sink. Offline by default: files under RUN_DIR/wandb, no account, no network
    (upload later with ``wandb sync RUN_DIR/wandb/offline-run-*``)."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "gfn_dist"  # wandb project
    entity: str | None = None  # wandb team / user (online); null = the account's default
    name: str | None = None  # run name; null = the run directory's name

    def __post_init__(self) -> None:
        _choice("logging.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggingConfig:
    """Metric sinks (rank 0 only). JSONL is always written."""

    log_every: int = 10  # learner steps between metric rows
    wandb: WandbConfig = field(default_factory=WandbConfig)  # wandb sink (offline by default)
    tensorboard: bool = False  # also write TensorBoard event files under RUN_DIR/tb
    progress_bar: bool = True  # tqdm bar on the driver's terminal

    def __post_init__(self) -> None:
        _positive("logging.log_every", self.log_every)


@dataclass
class ClusterConfig:
    """Where Ray runs and how learners are launched."""

    address: str | None = None  # Ray address to connect to; null starts an embedded local Ray
    launcher: str = "auto"  # auto (torchrun if its env vars are set) | local | torchrun | ray (Ray Train workers)
    num_cpus: float | None = None  # CPUs of the embedded Ray; null = what the actors (and learners) reserve (>= 1)
    connect_timeout_s: float = 30.0  # give up on an unreachable cluster.address after this
    num_learners: int = 1  # launcher=ray: learner workers forming the DDP group (world size)
    num_cpus_per_learner: float = 1.0  # launcher=ray: Ray CPUs per learner worker (also its torch threads)
    placement_strategy: str = "PACK"  # launcher=ray: learners' placement group (PACK | SPREAD | STRICT_*)
    # launcher=ray: Ray Train restarts of the learner group after a learner failed (a worker died or
    # raised); each restart resumes from the newest checkpoint while the actors keep running
    # (0: a failed learner fails the run; -1: unlimited)
    learner_max_restarts: int = 0
    # Ray task events of the run's actors (shards, weight store, rollout actors, driver channel); false keeps
    # their calls out of `ray list tasks`, the dashboard timeline and the GCS's memory (~3.5 KB a call, up to
    # ~330 MB); true shows them again for debugging (gfn_dist.distributed.topology)
    task_events: bool = False
    # User code on Ray workers (gfn_dist.imports.runtime_env_of -> ray.init(runtime_env=...)):
    working_dir: str | None = None  # directory (or URI) Ray uploads; workers start in it and import from it
    py_modules: list[str] = field(default_factory=list)  # package dirs / .whl / .zip / URIs / importable names
    runtime_env: dict[str, Any] = field(default_factory=dict)  # further Ray runtime_env fields (env_vars, pip, ...)

    def __post_init__(self) -> None:
        _choice("cluster.launcher", self.launcher, LAUNCHERS)
        _positive("cluster.num_cpus", self.num_cpus)
        _positive("cluster.connect_timeout_s", self.connect_timeout_s)
        _positive("cluster.num_learners", self.num_learners)
        _positive("cluster.num_cpus_per_learner", self.num_cpus_per_learner, allow_zero=True)
        _choice("cluster.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        if self.learner_max_restarts < -1:
            raise ConfigError(
                f"cluster.learner_max_restarts: must be >= 0, or -1 for unlimited, got {self.learner_max_restarts}"
            )
