"""Replay shard: a ``ReplayBuffer`` behind a rate limiter, served as a Ray actor.

``ReplayShard`` is a plain class (usable and testable in-process); the helpers
``create_replay_shard`` / ``create_replay_shards`` wrap it with ``ray.remote``
and create (optionally named) actors, and ``get_replay_shards`` looks named ones
up (e.g. from torchrun ranks other than 0). Actors are built from a
``ReplayShardConfig`` (plain data), never from live objects.

Rate limiter (in the spirit of DeepMind Reverb's sample-to-insert ratio). With
``I = num_inserts``, ``S = num_samples`` (both in items), target ratio
``spi = samples_per_insert``, tolerance ``eb = error_buffer`` and
``m = min_size_to_sample``:

* a sample of n items is allowed iff ``len >= m`` and (when spi is enabled)
  ``S + n <= spi * I + eb`` -- learners may not run ahead of the actors;
* an insert of n items is allowed iff spi is disabled or
  ``S >= spi * (I + n - m) - eb`` -- actors may not run ahead of the learners.
  The first ``m`` inserts are a free warm-up (the ``- m``): without it no insert
  could happen before sampling starts and sampling cannot start before ``m``
  inserts.

Both checks look at the state *after* the call, so the realized ratio stays
within ``spi * m + 2 * eb`` items of the target. With batched calls the limiter
can only stall (both sides refused) if ``spi * n_insert + n_sample > spi * m + 2 *
eb``; keep ``error_buffer`` large enough for your insert / sample batch sizes
(the default ``error_buffer = spi * m`` is safe when ``spi * n_insert + n_sample
<= 3 * spi * m``).

Ray actor calls do not block: ``try_add`` / ``try_sample`` answer at once
(accepted / refused), and ``ReplayClient`` waits and retries with backoff.

Fault tolerance: with ``state_dir`` a shard journals its insert count and keeps
snapshots there, and a shard that Ray restarts (``max_restarts``) comes back
from its latest snapshot, reporting as lost the items it held at its death
beyond those restored (``gfn_dist.distributed.shard_persistence``). A snapshot
that meets a full disk is a warning: the shard keeps serving.

Counters reported by ``stats()``:

* ``num_inserts`` / ``num_samples``: items inserted / sampled (the limiter's I, S);
* ``num_rejected``: items refused by validation (wrong schema, NaN reward ...);
  these are dropped for good. Refusals by the rate limiter are *not* rejections
  (the client retries them); they are counted, per refused call, in
  ``num_add_throttled`` / ``num_sample_throttled``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import ray
import torch
from tensordict import TensorDict

from gfn_dist.containers.replay_buffer import ReplayBuffer
from gfn_dist.distributed.shard_persistence import ShardPersistence
from gfn_dist.distributed.wire import pack_wire, td_from_wire, td_to_wire

logger = logging.getLogger(__name__)

DEFAULT_NAME_PREFIX = "gfn_dist_replay_shard"


@dataclass
class ReplayShardConfig:
    """Configuration of one replay shard (buffer + rate limiter).

    Attributes:
        capacity: items (trajectories) the shard holds; FIFO eviction beyond.
        prioritized: reward-prioritized sampling, ``P(i) ∝ exp(alpha * log_reward_i)``.
        alpha: prioritization exponent (>= 0); ignored when ``prioritized`` is False.
        min_size_to_sample: items the shard must hold before any sample is served.
        samples_per_insert: target ratio of sampled to inserted items; None or 0
            disables the ratio limiter (only ``min_size_to_sample`` applies).
        error_buffer: tolerance of the ratio, in sampled items; None means
            ``samples_per_insert * min_size_to_sample`` (see module doc).
        seed: seed of the shard's sampling RNG; None draws from the OS.
        state_dir: directory of the shard's insert journal and restart snapshots
            (``gfn_dist.distributed.shard_persistence.ShardPersistence``); None keeps no state on disk.
        snapshot_every_inserts: with ``state_dir``, snapshot every this many inserted
            items (0: only when ``snapshot()`` or ``restore()`` is called).
    """

    capacity: int = 100_000
    prioritized: bool = False
    alpha: float = 1.0
    min_size_to_sample: int = 1
    samples_per_insert: float | None = None
    error_buffer: float | None = None
    seed: int | None = None
    state_dir: str | None = None
    snapshot_every_inserts: int = 0

    def __post_init__(self) -> None:
        if int(self.capacity) < 1:
            raise ValueError(f"ReplayShardConfig: 'capacity' must be >= 1, got {self.capacity}")
        if not 0 <= int(self.min_size_to_sample) <= int(self.capacity):
            raise ValueError(
                f"ReplayShardConfig: 'min_size_to_sample' must be in [0, capacity={self.capacity}], "
                f"got {self.min_size_to_sample}"
            )
        if self.samples_per_insert is not None and float(self.samples_per_insert) < 0:
            raise ValueError(
                f"ReplayShardConfig: 'samples_per_insert' must be >= 0 or None, got {self.samples_per_insert}"
            )
        if self.error_buffer is not None and float(self.error_buffer) < 0:
            raise ValueError(f"ReplayShardConfig: 'error_buffer' must be >= 0 or None, got {self.error_buffer}")
        if float(self.alpha) < 0:
            raise ValueError(f"ReplayShardConfig: 'alpha' must be >= 0, got {self.alpha}")

    @property
    def ratio_enabled(self) -> bool:
        """True when the samples-per-insert limiter is on."""
        return bool(self.samples_per_insert)

    @property
    def effective_error_buffer(self) -> float:
        """The tolerance in items actually used (resolves the None default)."""
        if self.error_buffer is not None:
            return float(self.error_buffer)
        return float(self.samples_per_insert or 0.0) * int(self.min_size_to_sample)


class RateLimiter:
    """Pure decision logic of the limiter (see module doc); holds no counters itself."""

    def __init__(self, min_size_to_sample: int, samples_per_insert: float | None, error_buffer: float) -> None:
        self.min_size_to_sample = int(min_size_to_sample)
        self.samples_per_insert = float(samples_per_insert or 0.0)
        self.error_buffer = float(error_buffer)

    def sample_blocker(self, n: int, size: int, num_inserts: int, num_samples: int) -> str | None:
        """Returns None if a sample of ``n`` items is allowed, else the violated condition (a sentence)."""
        if size < self.min_size_to_sample or size == 0:
            return f"min_size_to_sample: size {size} < min_size_to_sample {max(self.min_size_to_sample, 1)}"
        if self.samples_per_insert > 0:
            budget = self.samples_per_insert * num_inserts + self.error_buffer
            if num_samples + n > budget:
                return (
                    f"samples_per_insert (learners ahead of actors): num_samples {num_samples} + n {n} > "
                    f"samples_per_insert {self.samples_per_insert:g} * num_inserts {num_inserts} "
                    f"+ error_buffer {self.error_buffer:g} = {budget:g}"
                )
        return None

    def insert_blocker(self, n: int, num_inserts: int, num_samples: int) -> str | None:
        """Returns None if an insert of ``n`` items is allowed, else the violated condition (a sentence)."""
        if self.samples_per_insert > 0:
            floor = self.samples_per_insert * (num_inserts + n - self.min_size_to_sample) - self.error_buffer
            if num_samples < floor:
                return (
                    f"samples_per_insert (actors ahead of learners): num_samples {num_samples} < "
                    f"samples_per_insert {self.samples_per_insert:g} * (num_inserts {num_inserts} + n {n} "
                    f"- min_size_to_sample {self.min_size_to_sample}) - error_buffer {self.error_buffer:g} "
                    f"= {floor:g}"
                )
        return None


class ReplayShard:
    """One replay shard: ``ReplayBuffer`` + ``RateLimiter`` + counters; wrap with ``create_replay_shard``.

    Args:
        config: a ``ReplayShardConfig``; or None and ``ReplayShardConfig`` fields as kwargs.
        **kwargs: fields of ``ReplayShardConfig`` (only when ``config`` is None).

    Raises:
        ValueError: on an invalid configuration (see ``ReplayShardConfig``), or
            when both ``config`` and kwargs are given.
    """

    def __init__(self, config: ReplayShardConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError(f"ReplayShard: pass either config or kwargs, got both (kwargs {sorted(kwargs)})")
        self.config = config if config is not None else ReplayShardConfig(**kwargs)
        cfg = self.config
        self.buffer = ReplayBuffer(cfg.capacity, prioritized=cfg.prioritized, alpha=cfg.alpha)
        self.limiter = RateLimiter(cfg.min_size_to_sample, cfg.samples_per_insert, cfg.effective_error_buffer)
        self.generator = torch.Generator()
        if cfg.seed is not None:
            self.generator.manual_seed(int(cfg.seed))
        else:
            self.generator.seed()
        self.num_rejected = 0
        self.num_add_throttled = 0
        self.num_sample_throttled = 0
        self.persistence = None  # set last: restoring after a Ray restart must not write back
        if cfg.state_dir is not None:
            persistence = ShardPersistence(cfg.state_dir, cfg.snapshot_every_inserts)
            persistence.start(self)  # after a Ray restart: restores the latest snapshot, reports the items lost
            self.persistence = persistence

    # ------------------------------------------------------------------ limiter queries

    def check_sample(self, n: int) -> str | None:
        """None if ``try_sample(n)`` would succeed now, else the blocking condition."""
        b = self.buffer
        return self.limiter.sample_blocker(int(n), len(b), b.num_inserts, b.num_samples)

    def check_add(self, n: int) -> str | None:
        """None if an insert of ``n`` items would pass the rate limiter now, else the blocking condition."""
        return self.limiter.insert_blocker(int(n), self.buffer.num_inserts, self.buffer.num_samples)

    # ------------------------------------------------------------------ data path

    def try_add(self, td: TensorDict) -> dict[str, Any]:
        """Inserts a batch if it is valid and the rate limiter allows it; never blocks.

        Args:
            td: TensorDict ``(N,)`` in the replay format (``gfn_dist.containers.replay_buffer``).

        Returns:
            dict with ``accepted`` (bool), ``status`` ("ok" | "rate_limited" |
            "invalid"), ``num_items`` (N), ``reason`` (None, the blocking limiter
            condition, or the validation error message) and ``size`` (after the call).
            Invalid batches count N in ``num_rejected``; rate-limited calls count
            one in ``num_add_throttled`` and may be retried.
        """
        n = 0
        try:
            td = td_from_wire(td)  # actors send packed numpy dicts (distributed/wire.py); a TensorDict passes
            n = int(td.batch_size[0]) if td.batch_dims >= 1 else 0
            n = self.buffer.validate(td)
        except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: TensorDict shape checks
            self.num_rejected += n
            logger.warning("ReplayShard: rejected %d items: %s", n, err)
            return {
                "accepted": False,
                "status": "invalid",
                "num_items": n,
                "reason": str(err),
                "size": len(self.buffer),
            }
        blocker = self.check_add(n)
        if blocker is not None:
            self.num_add_throttled += 1
            return {
                "accepted": False,
                "status": "rate_limited",
                "num_items": n,
                "reason": blocker,
                "size": len(self.buffer),
            }
        self.buffer.add(td)
        if self.persistence is not None:
            self.persistence.after_insert(self)  # journal; periodic snapshot
        return {"accepted": True, "status": "ok", "num_items": n, "reason": None, "size": len(self.buffer)}

    def try_sample(self, n: int, wire: bool = False) -> TensorDict | bytes | None:
        """Samples ``n`` items if the rate limiter allows it; never blocks.

        Args:
            n: number of items (>= 1).
            wire: return the batch in the packed numpy wire format (``pack_wire`` of
                ``distributed/wire.py``: bytes), which crosses a Ray call ~100x cheaper
                than a TensorDict; ``td_from_wire`` turns it back.

        Returns:
            TensorDict ``(n,)`` (a copy), or None when the limiter refuses (the
            refusal counts in ``num_sample_throttled``; see ``check_sample`` for why).

        Raises:
            ValueError: if ``n < 1``.
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"ReplayShard.try_sample: n must be >= 1, got {n}")
        if self.check_sample(n) is not None:
            self.num_sample_throttled += 1
            return None
        batch = self.buffer.sample(n, generator=self.generator)
        return pack_wire(td_to_wire(batch)) if wire else batch

    # ------------------------------------------------------------------ reporting / state

    def size(self) -> int:
        """Number of items held."""
        return len(self.buffer)

    def stats(self) -> dict[str, Any]:
        """Counters and sizes (plain Python numbers); see module doc for their meaning.

        Returns:
            dict with ``size``, ``capacity``, ``num_inserts``, ``num_samples``,
            ``num_rejected``, ``num_add_throttled``, ``num_sample_throttled``,
            ``samples_per_insert`` (observed ``num_samples / num_inserts``, 0.0
            before any insert), ``target_samples_per_insert`` (None if disabled)
            and ``min_size_to_sample``; with a ``state_dir`` also ``ShardPersistence.stats()``
            (``num_restarts``, ``items_lost``, ``last_items_lost``, ``restored_size``, ...).
        """
        b = self.buffer
        extra = self.persistence.stats() if self.persistence is not None else {}
        return {
            **extra,
            "size": len(b),
            "capacity": b.capacity,
            "num_inserts": b.num_inserts,
            "num_samples": b.num_samples,
            "num_rejected": self.num_rejected,
            "num_add_throttled": self.num_add_throttled,
            "num_sample_throttled": self.num_sample_throttled,
            "samples_per_insert": b.num_samples / b.num_inserts if b.num_inserts else 0.0,
            "target_samples_per_insert": self.limiter.samples_per_insert or None,
            "min_size_to_sample": self.limiter.min_size_to_sample,
        }

    def snapshot(self) -> dict[str, Any]:
        """State of the shard as plain tensors (``torch.load(weights_only=True)``-safe).

        With a ``state_dir`` the state also becomes the shard's restart point
        (so every checkpoint is one).

        Returns:
            dict: ``buffer`` (``ReplayBuffer.state_dict()``), ``rng_state`` (uint8
            tensor), and int64 scalar tensors ``num_rejected``,
            ``num_add_throttled``, ``num_sample_throttled``.
        """
        state = {
            "buffer": self.buffer.state_dict(),
            "rng_state": self.generator.get_state(),
            "num_rejected": torch.tensor(self.num_rejected, dtype=torch.int64),
            "num_add_throttled": torch.tensor(self.num_add_throttled, dtype=torch.int64),
            "num_sample_throttled": torch.tensor(self.num_sample_throttled, dtype=torch.int64),
        }
        if self.persistence is not None:
            self.persistence.save(state)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Restores contents, counters and RNG from ``snapshot()`` output.

        Raises:
            ValueError: if a key is missing or the buffer state does not fit (see
                ``ReplayBuffer.load_state_dict``).
        """
        for k in ("buffer", "rng_state", "num_rejected", "num_add_throttled", "num_sample_throttled"):
            if k not in state:
                raise ValueError(f"ReplayShard.restore: missing key '{k}'")
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["rng_state"])
        self.num_rejected = int(state["num_rejected"])
        self.num_add_throttled = int(state["num_add_throttled"])
        self.num_sample_throttled = int(state["num_sample_throttled"])
        if self.persistence is not None:
            self.persistence.save(state)  # the restored state is the new restart point


# ---------------------------------------------------------------------- Ray helpers


def shard_name(index: int, name_prefix: str = DEFAULT_NAME_PREFIX) -> str:
    """Ray actor name of shard ``index``: ``f"{name_prefix}_{index}"``."""
    return f"{name_prefix}_{int(index)}"


def create_replay_shard(
    config: ReplayShardConfig | None = None,
    *,
    name: str | None = None,
    namespace: str | None = None,
    lifetime: str | None = None,
    num_cpus: float | None = None,
    max_restarts: int = 0,
    task_events: bool = False,
):
    """Creates one ``ReplayShard`` Ray actor (Ray must be initialized).

    Args:
        config: shard configuration (plain data); defaults to ``ReplayShardConfig()``.
        name: Ray actor name, so other processes can find it with ``ray.get_actor``.
        namespace: Ray namespace of the named actor (the job's namespace if None).
        lifetime: Ray actor lifetime: None (fate-shared with the creating job) or "detached".
        num_cpus: CPUs the actor reserves (Ray's actor default if None).
        max_restarts: times Ray restarts the shard if its process dies (-1: unlimited);
            a restarted shard restores its latest snapshot when ``config.state_dir`` is set.
        task_events: whether Ray records the shard's calls as task events in the GCS
            (``ray list tasks``, the dashboard's timeline); off by default, as for every
            hot-path actor of a run (``cluster.task_events``, ``topology`` module doc).

    Returns:
        the actor handle (``ray.actor.ActorHandle``).
    """
    options: dict[str, Any] = {"enable_task_events": bool(task_events)}
    if name is not None:
        options["name"] = name
    if namespace is not None:
        options["namespace"] = namespace
    if lifetime is not None:
        options["lifetime"] = lifetime
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    if max_restarts:
        options["max_restarts"] = int(max_restarts)  # calls in flight at a death fail; later ones wait for it
    actor_cls = ray.remote(ReplayShard)
    return actor_cls.options(**options).remote(config if config is not None else ReplayShardConfig())


def create_replay_shards(
    num_shards: int,
    config: ReplayShardConfig | None = None,
    *,
    name_prefix: str | None = DEFAULT_NAME_PREFIX,
    namespace: str | None = None,
    lifetime: str | None = None,
    num_cpus: float | None = None,
    max_restarts: int = 0,
    task_events: bool = False,
) -> list[Any]:
    """Creates ``num_shards`` shard actors named ``shard_name(i, name_prefix)``.

    Shard i's sampling seed is ``config.seed + i`` (when a seed is set) so shards
    draw independent streams; its state directory is ``config.state_dir/shard_<i>``.

    Args:
        num_shards: number of shards (>= 1).
        config: configuration shared by all shards.
        name_prefix: actor name prefix; None creates anonymous actors.
        namespace, lifetime, num_cpus, max_restarts, task_events: as in ``create_replay_shard``.

    Returns:
        list of actor handles, shard 0 first.

    Raises:
        ValueError: if ``num_shards < 1``.
    """
    if int(num_shards) < 1:
        raise ValueError(f"create_replay_shards: num_shards must be >= 1, got {num_shards}")
    config = config if config is not None else ReplayShardConfig()
    handles = []
    for i in range(int(num_shards)):
        state_dir = None if config.state_dir is None else f"{config.state_dir}/shard_{i}"
        cfg_i = ReplayShardConfig(
            **{**asdict(config), "seed": None if config.seed is None else config.seed + i, "state_dir": state_dir}
        )
        name = shard_name(i, name_prefix) if name_prefix is not None else None
        handles.append(
            create_replay_shard(
                cfg_i,
                name=name,
                namespace=namespace,
                lifetime=lifetime,
                num_cpus=num_cpus,
                max_restarts=max_restarts,
                task_events=task_events,
            )
        )
    return handles


def get_replay_shards(
    num_shards: int, *, name_prefix: str = DEFAULT_NAME_PREFIX, namespace: str | None = None
) -> list[Any]:
    """Looks up named shard actors created by ``create_replay_shards`` (e.g. on torchrun rank > 0).

    Raises:
        ValueError: naming the shard actor that does not exist (from ``ray.get_actor``).
    """
    return [ray.get_actor(shard_name(i, name_prefix), namespace=namespace) for i in range(int(num_shards))]
