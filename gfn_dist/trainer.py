"""Trainer: brings up the pieces of a distributed run and wires them together.

Rank 0 (the driver in the local launch) starts or connects to Ray, creates the
named replay shards, the weight store and the rollout actors in a namespace
unique to the run, writes ``RUN_DIR/config.yaml`` and the metrics; other
torchrun ranks look the shards up by name. Every rank builds its own
environment, policies and loss from the config and runs a ``Learner``.

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from gfn_dist.builders import build_env, build_gflownet, build_policies
from gfn_dist.config import TrainConfig, check_devices, check_world_size, limiter_tolerance, to_yaml
from gfn_dist.distributed import cluster
from gfn_dist.distributed.learner import Learner
from gfn_dist.metrics import MetricLogger

logger = logging.getLogger(__name__)


def default_run_dir(preset: str) -> str:
    """``runs/<preset>-<YYYYmmdd-HHMMSS>``."""
    return str(Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def replay_shard_config(cfg: TrainConfig, world_size: int):
    """The ``ReplayShardConfig`` every shard is built from."""
    from gfn_dist.distributed.replay_shard import ReplayShardConfig

    r = cfg.replay
    return ReplayShardConfig(
        capacity=r.capacity_per_shard,
        prioritized=r.prioritized,
        alpha=r.priority_alpha,
        min_size_to_sample=r.min_size_to_sample,
        samples_per_insert=r.samples_per_insert or None,
        error_buffer=limiter_tolerance(cfg, world_size) if r.samples_per_insert else None,
        seed=cfg.run.seed + 10_000,
        # insert journal + restart snapshots (gfn_dist.distributed.health), per shard under RUN_DIR/replay
        state_dir=str(Path(cfg.run.dir) / "replay") if cfg.run.dir else None,
        snapshot_every_inserts=r.snapshot_every_inserts,
    )


class Trainer:
    """One process's part of a run (see module doc).

    Args:
        cfg: the validated configuration.
        preset: preset name, for the default run directory.

    Raises:
        ConfigError: if the configuration does not fit the launch (e.g. the batch
            does not split over the learners), before any actor starts.
    """

    def __init__(self, cfg: TrainConfig, preset: str = "run") -> None:
        self.cfg = cfg
        self.ctx: Optional[cluster.DistContext] = None
        self.ray_ctx: Optional[cluster.RayContext] = None
        self.handles: list = []  # actors rank 0 created (killed at close)
        self.actors: list = []
        self.run_refs: list = []
        self.metrics = MetricLogger([])
        self.store = None
        self._publisher = None
        self.supervisor = None  # rank 0: gfn_dist.distributed.health.ActorSupervisor
        self.learner = None
        launcher = cluster.detect_launcher(cfg)
        check_world_size(cfg, cluster.world_size_of(launcher))  # before anything starts
        check_devices(cfg)  # GPUs asked for but absent: a config error, not a hang or a late crash
        try:
            self._setup(preset)
        except BaseException:
            self.close()
            raise

    def _setup(self, preset: str) -> None:
        cfg = self.cfg
        self.ctx = ctx = cluster.init_distributed(cfg)
        from gfn_dist.checkpoint import Checkpointer, resume_run_dir
        from gfn_dist.distributed.synchronous_rollout import SynchronousRollout

        run_dir = (cfg.run.dir or resume_run_dir(cfg, preset) or default_run_dir(preset)) if ctx.is_main else None
        self.run_dir = Path(cluster.broadcast_object(run_dir, ctx))
        cfg.run.dir = str(self.run_dir)  # the resolved config records where the run went
        self.ray_ctx = cluster.bring_up_ray(cfg, ctx)
        shards = self._replay_shards()
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.metrics = MetricLogger.from_config(cfg, self.run_dir)
        if ctx.device.type == "cpu":
            torch.set_num_threads(cluster.learner_num_threads(cfg, ctx))
        torch.manual_seed(cfg.run.seed)  # every rank builds the same initial weights
        self.env = build_env(cfg, ctx.device)
        self.policies = build_policies(cfg, self.env).to(ctx.device)
        self.gflownet = build_gflownet(cfg, self.env, self.policies)
        from gfn_dist.distributed.replay_client import ReplayClient

        self.learner = Learner(
            cfg, self.env, self.policies, self.gflownet, ctx,
            replay=ReplayClient(shards, timeout_s=cfg.replay.timeout_s),
            publisher=self._publisher,
            metrics=self.metrics,
            health_check=self.check_actors,
        )
        if cfg.rollout.synchronous:  # built before resuming: its workers seed the RNG
            self.learner.rollout_step = SynchronousRollout(cfg, ctx, shards)
        self.checkpointer = Checkpointer(cfg, ctx, self.run_dir, replay=self.learner.replay if ctx.is_main else None,
                                         actors=self.actors)
        self.learner.checkpointer = self.checkpointer
        self.checkpointer.maybe_resume(self.learner)  # before the actors start pushing (train)

    def _replay_shards(self) -> list:
        """Rank 0 creates the named shards, weight store and rollout actors; the others look the shards up."""
        import ray

        from gfn_dist.distributed.replay_shard import create_replay_shards, get_replay_shards
        from gfn_dist.distributed.rollout_actor import create_rollout_actors
        from gfn_dist.distributed.weight_store import WeightPublisher, create_weight_store

        cfg, ctx, ns = self.cfg, self.ctx, self.ray_ctx.namespace
        prefix = f"{ns}_replay"
        if ctx.is_main:
            shards = create_replay_shards(cfg.replay.num_shards, replay_shard_config(cfg, ctx.world_size),
                                          name_prefix=prefix, namespace=ns, num_cpus=0,
                                          max_restarts=cfg.replay.max_restarts)
            store_name = f"{ns}_weights"
            store = create_weight_store(name=store_name, namespace=ns)
            if not cfg.rollout.synchronous:  # synchronous: rank 0 samples in-process (distributed.synchronous_rollout)
                self.actors = create_rollout_actors(cfg, prefix, store_name, name_prefix=ns, namespace=ns)
            self.handles = [*self.actors, *shards, store]
            self.store = store
            self._publisher = WeightPublisher(store)
            ray.get([s.size.remote() for s in shards] + [store.latest_version.remote()])  # up and named
        cluster.barrier(ctx)
        if not ctx.is_main:
            shards = get_replay_shards(cfg.replay.num_shards, name_prefix=prefix, namespace=ns)
        return shards

    def check_actors(self) -> None:
        """Raises ``ActorFailure`` once the rollout actors failed more than the config allows (rank 0).

        Failed actors are restarted meanwhile (``gfn_dist.distributed.health``).
        """
        if self.supervisor is not None:
            self.supervisor.check(self.learner.step)

    def train(self) -> dict:
        """Starts the rollout actors (rank 0) and runs the learner; returns the last metric row."""
        if self.ctx.is_main:
            from gfn_dist.distributed.health import ActorSupervisor

            r = self.cfg.rollout
            self.supervisor = ActorSupervisor(self.actors, self.cfg.replay.num_shards, replay=self.learner.replay,
                                              max_restarts=r.max_restarts,
                                              max_consecutive_failures=r.max_consecutive_failures,
                                              step_fn=lambda: self.learner.step)
            self.learner.extra_metrics = self.supervisor.metrics
            self.supervisor.start()
            self.run_refs = self.supervisor.run_refs
        row = self.learner.train(progress_bar=self.cfg.logging.progress_bar)
        if self.ctx.is_main and self.cfg.run.save_policy:
            torch.save({"policies": self.policies.state_dict(), "step": self.learner.step},
                       self.run_dir / "policy.pt")
        cluster.barrier(self.ctx)
        return row

    def actor_stats(self) -> list[dict]:
        """Each rollout actor's ``stats()`` (rank 0)."""
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        """Stops the actors, kills what rank 0 created, shuts Ray down, destroys the process group."""
        try:
            if self.supervisor is not None:
                self.supervisor.close()  # before the stop: an ending run() is no failure
                self.run_refs = self.supervisor.run_refs
            if self.ctx is not None and self.ctx.is_main and self.store is not None:
                import ray

                try:
                    self.store.stop.remote()
                    if self.run_refs:
                        ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=5.0)
                except Exception as err:  # best effort: the actors are killed next anyway
                    logger.debug("stopping actors: %s", err)
            self.metrics.close()
        finally:
            if self.learner is not None:
                self.learner.release_ddp()  # before the process group goes
            cluster.teardown(self.ctx, self.ray_ctx, self.handles)
