"""The run's Ray topology: the one place that creates or looks up its actors.

A run's actors live in one Ray namespace, named from it:

* ``replay.num_shards`` replay shards ``<ns>_replay_<i>`` (``ReplayShard``; Ray
  restarts a dead one ``replay.max_restarts`` times, and it restores its snapshot);
* the weight store ``<ns>_weights`` (``WeightStore``; restarted without limit);
* ``rollout.num_actors`` rollout actors ``<ns>_rollout_<i>`` (``RolloutActor``;
  restarted ``rollout.max_restarts`` times), unless rollouts are synchronous;
* the ``ActorSupervisor`` that watches the rollout actors (a driver-side thread).

``Topology.create`` (the process that owns the run: the driver, or torchrun rank 0)
creates them; ``Topology.lookup`` (torchrun ranks > 0, Ray Train workers) finds the
shards, the store and the actors by name. Every launcher goes through these two
calls, so every launcher gets the same actors with the same options.

Ray task events are off for these actors (and for the Ray Train driver channel,
``learner_group``) unless ``cluster.task_events`` is set: Ray's actor option
``enable_task_events=False``. With them on, the GCS keeps every call's task
events -- ~3.5 KB per actor call, measured (``benchmarks/gcs_growth.py``) --
until its cap of ~100,000 tasks (Ray's ``task_events_max_num_task_in_gcs``):
a run making ~8 actor calls per learner step grew the embedded GCS by ~30 KB
per step, ~330 MB in all at the cap. The option acts in the caller's core
worker, so it holds on an external cluster too. What it costs: these actors'
calls are missing from ``ray list tasks`` / ``ray summary tasks``, the state API
and the dashboard's task timeline (the actors themselves still show in ``ray
list actors``, and failures still surface as exceptions in the caller). Set
``cluster.task_events=true`` to see them again while debugging.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from gfn_dist.distributed.health import ActorSupervisor
from gfn_dist.distributed.replay_client import ReplayClient
from gfn_dist.distributed.replay_shard import ReplayShardConfig, create_replay_shards, get_replay_shards
from gfn_dist.distributed.rollout_actor import RolloutBuilder, create_rollout_actors, rollout_actor_name
from gfn_dist.distributed.weight_store import WeightPublisher, create_weight_store

if TYPE_CHECKING:  # the run layer's config, read through its attributes only
    from gfn_dist.config import TrainConfig

logger = logging.getLogger(__name__)


class Topology:
    """Handles to the run's actors (see module doc); build with ``create`` or ``lookup``.

    Attributes:
        namespace: the run's Ray namespace.
        shards: replay shard handles, shard 0 first.
        store: the weight store handle.
        actors: rollout actor handles, actor 0 first (empty for synchronous rollouts).
        owner: whether this process created the actors (and kills them at ``kill``).
    """

    def __init__(self, cfg: TrainConfig, namespace: str, shards: list, store: Any, actors: list, owner: bool) -> None:
        self.cfg = cfg
        self.namespace = namespace
        self.shards = list(shards)
        self.store = store
        self.actors = list(actors)
        self.owner = owner

    # ------------------------------------------------------------------ names

    @staticmethod
    def replay_prefix(namespace: str) -> str:
        return f"{namespace}_replay"

    @staticmethod
    def store_name(namespace: str) -> str:
        return f"{namespace}_weights"

    # ------------------------------------------------------------------ building

    @classmethod
    def create(
        cls, cfg: TrainConfig, namespace: str, shard_config: ReplayShardConfig, build: RolloutBuilder
    ) -> Topology:
        """Creates the shards, the weight store and (unless ``rollout.synchronous``) the rollout actors.

        Waits until the shards and the store answer (so other processes can look them
        up); the rollout actors start in the background (an actor that fails to start
        fails its first ``run`` call, which the supervisor reports).

        Args:
            cfg: the run's configuration.
            namespace: the run's Ray namespace.
            shard_config: what every shard is built from (the run layer derives it from ``replay.*``).
            build: how each rollout actor builds its env, policies and sampler.
        """
        prefix, store_name = cls.replay_prefix(namespace), cls.store_name(namespace)
        shards = create_replay_shards(
            cfg.replay.num_shards,
            shard_config,
            name_prefix=prefix,
            namespace=namespace,
            num_cpus=0,
            max_restarts=cfg.replay.max_restarts,
            task_events=cfg.cluster.task_events,
        )
        store = create_weight_store(name=store_name, namespace=namespace, task_events=cfg.cluster.task_events)
        actors = (
            []
            if cfg.rollout.synchronous
            else create_rollout_actors(cfg, build, prefix, store_name, name_prefix=namespace, namespace=namespace)
        )
        topology = cls(cfg, namespace, shards, store, actors, owner=True)
        ray.get([s.size.remote() for s in shards] + [store.latest_version.remote()])  # up and named
        return topology

    @classmethod
    def lookup(cls, cfg: TrainConfig, namespace: str) -> Topology:
        """Finds the actors ``create`` made in ``namespace`` (any process of the run).

        Raises:
            ValueError: (from ``ray.get_actor``) naming an actor that does not exist.
        """
        shards = get_replay_shards(cfg.replay.num_shards, name_prefix=cls.replay_prefix(namespace), namespace=namespace)
        store = ray.get_actor(cls.store_name(namespace), namespace=namespace)
        actors = (
            []
            if cfg.rollout.synchronous
            else [
                ray.get_actor(rollout_actor_name(namespace, i), namespace=namespace)
                for i in range(cfg.rollout.num_actors)
            ]
        )
        return cls(cfg, namespace, shards, store, actors, owner=False)

    # ------------------------------------------------------------------ clients

    def replay_client(self) -> ReplayClient:
        """A learner's client of every shard (``replay.timeout_s``)."""
        return ReplayClient(self.shards, timeout_s=self.cfg.replay.timeout_s)

    def publisher(self) -> WeightPublisher:
        """Publishes the learner's weights to the store (learner rank 0)."""
        return WeightPublisher(self.store)

    def supervisor(
        self,
        replay: ReplayClient | None,
        step_fn: Callable[[], int],
        warn: Callable[[str], None] | None = None,
    ) -> ActorSupervisor | None:
        """The ``ActorSupervisor`` of the rollout actors (learner rank 0), or None without actors.

        Args:
            replay: rank 0's client (the supervisor marks the shards of down actors starved).
            step_fn: the learner's current step (recorded with failure events).
            warn: where its warnings go (``ActorSupervisor``); default its module's logger.
        """
        if not self.actors:
            return None
        r = self.cfg.rollout
        return ActorSupervisor(
            self.actors,
            self.cfg.replay.num_shards,
            replay=replay,
            max_restarts=r.max_restarts,
            max_consecutive_failures=r.max_consecutive_failures,
            step_fn=step_fn,
            stall_timeout_s=r.stall_timeout_s or None,
            warn=warn,
        )

    def actor_stats(self) -> list[dict]:
        """Each rollout actor's ``stats()``."""
        return ray.get([a.stats.remote() for a in self.actors])

    # ------------------------------------------------------------------ ending

    def stop_actors(self, run_refs: list, timeout_s: float = 5.0) -> None:
        """Tells the rollout actors to stop (through the store) and waits up to ``timeout_s`` for their loops."""
        try:
            ray.get(self.store.stop.remote(), timeout=timeout_s)
            if run_refs:
                ray.wait(run_refs, num_returns=len(run_refs), timeout=timeout_s)
        except Exception as err:  # best effort: the actors are killed next anyway
            logger.debug("stopping actors: %s", err)

    @property
    def handles(self) -> list:
        """The actors this process created (killed at teardown), else none."""
        return [*self.actors, *self.shards, self.store] if self.owner else []
