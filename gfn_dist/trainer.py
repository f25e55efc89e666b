"""The composition root: one way to assemble a run, for every launcher.

    trainer = Trainer(cfg)          # cfg validated by gfn_dist.train.validate_run_config
    try:
        row = trainer.train()
    finally:
        trainer.close()

Assembly, in order (launchers differ only in where the learner ranks run):

1. learner group: ``local`` -- this process is the only rank; ``torchrun`` -- this
   process is one rank of torchrun's process group; ``ray`` -- the ranks are Ray
   Train workers started by ``train`` (``gfn_dist.distributed.learner_group``);
2. the run directory (chosen by the run's owner -- the driver, or torchrun rank 0 --
   and broadcast) and Ray (started or connected by the owner; torchrun ranks > 0
   connect to it);
3. the topology (``gfn_dist.distributed.topology``): the owner creates the replay
   shards, the weight store and the rollout actors; every other process looks them up;
4. the owner writes ``RUN_DIR/config.yaml`` and opens the metric sinks;
5. in-process ranks build their ``LearnerProcess`` (``gfn_dist.train_loop``: learner,
   checkpointer, supervisor; resume); Ray Train workers build the same in ``run_learner``;
6. ``train`` runs the loop on every rank, then the owner writes ``RUN_DIR/policy.pt``.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gfn_dist.builders import build_rollout_parts, validate_task
from gfn_dist.checkpoint_files import save_torch_file
from gfn_dist.config import (
    ConfigError,
    TrainConfig,
    check_devices,
    check_world_size,
    limiter_tolerance,
    to_dict,
    to_yaml,
)
from gfn_dist.distributed import cluster
from gfn_dist.distributed.learner_group import InProcessLearners, RayTrainLearners
from gfn_dist.distributed.replay_shard import ReplayShardConfig
from gfn_dist.distributed.topology import Topology
from gfn_dist.extras import check_optional_dependencies
from gfn_dist.files import atomic_write_text, ray_temp_dir
from gfn_dist.imports import add_user_code_to_path, runtime_env_of
from gfn_dist.metrics import MetricLogger, truncate_metrics_after
from gfn_dist.preemption import preemption_requested, request_preemption
from gfn_dist.preflight import validate_before_start
from gfn_dist.progress import Progress
from gfn_dist.resume import check_resumable, resume_run_dir
from gfn_dist.run_lock import RunDirLock
from gfn_dist.train_loop import LearnerProcess, run_learner

logger = logging.getLogger(__name__)


def default_run_dir(preset: str) -> str:
    """``runs/<preset>-<YYYYmmdd-HHMMSS>``."""
    return str(Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def validate_launch(cfg: TrainConfig, launcher: str) -> None:
    """Every check of a loaded configuration, for every launcher, before anything starts (the one place;
    ``load_config`` has checked each key's type and range).

    Raises:
        ConfigError: one line naming the key: the user's code does not import or has the wrong shapes,
            NaN / inf, an unusable run.dir, not enough memory, a missing optional dependency, the batch
            does not split over the learners, GPUs asked for but absent, an unsupported option.
    """
    runtime_env_of(cfg)  # user code for the Ray workers: paths that exist, no key set twice
    add_user_code_to_path(cfg)  # this process imports the user's task from where Ray ships it from
    validate_before_start(cfg)  # NaN / inf, run.dir, memory (gfn_dist.preflight; builds the env)
    check_optional_dependencies(cfg)  # TensorBoard, wandb online login
    if launcher == "ray" and cfg.rollout.synchronous:
        raise ConfigError("rollout.synchronous: not supported with cluster.launcher=ray")
    world_size = cfg.cluster.num_learners if launcher == "ray" else cluster.world_size_of(launcher)
    check_world_size(cfg, world_size)
    check_devices(cfg)  # GPUs asked for but absent: a config error, not a hang or a late crash
    validate_task(cfg)  # env / policies by import path: built once on the CPU, shapes checked


def replay_shard_config(cfg: TrainConfig, world_size: int) -> ReplayShardConfig:
    """The ``ReplayShardConfig`` every shard is built from (``replay.*``)."""
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


@dataclass
class LearnerSummary:
    """Rank 0's learner at the end, as the driver of a ``cluster.launcher=ray`` run knows it."""

    step: int = 0
    preempted: bool = False


class Trainer:
    """One process's part of a run, for every launcher (see module doc).

    Args:
        cfg: the validated configuration.
        preset: preset name, for the default run directory.

    Raises:
        ConfigError: e.g. ``resume=true`` without a checkpoint, before any actor runs.
        ClusterUnreachableError: (a ``ConnectionError``) if ``cluster.address`` does not answer.
    """

    def __init__(self, cfg: TrainConfig, preset: str = "run") -> None:
        self.cfg = cfg
        self.started_at = time.time()  # metric elapsed_s counts from here (start-up included)
        self.launcher = cluster.detect_launcher(cfg)
        validate_launch(cfg, self.launcher)  # the one place, for every launcher
        self.ctx: cluster.DistContext | None = None
        self.ray_ctx: cluster.RayContext | None = None
        self.topology: Topology | None = None
        self.group: Any = None
        self.process: LearnerProcess | None = None
        self.metrics: Any = MetricLogger([])
        self.lock: RunDirLock | None = None
        self._summary = LearnerSummary()  # rank 0's learner as the driver of a Ray Train run knows it
        self.last_row: dict = {}
        try:
            self._setup(preset)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ assembly

    @property
    def owner(self) -> bool:
        """This process owns the run: it creates the actors and writes RUN_DIR (driver or torchrun rank 0)."""
        return self.launcher == "ray" or self.ctx.is_main  # type: ignore[union-attr]  # ctx is set unless launcher=ray

    def _setup(self, preset: str) -> None:
        cfg = self.cfg
        if self.launcher == "ray":
            self.ctx = cluster.DistContext(0, 1, 0, "ray", torch.device("cpu"), None)  # the driver: no rank
        else:
            self.ctx = cluster.init_distributed(cfg)
        # The owner takes the run directory (one owner per directory) and checks a resume before
        # anything of the run is touched; the other ranks get the directory, or the refusal.
        answer: Any = None
        if self.owner:
            try:
                if cfg.cluster.address:  # an address that does not answer: refused before RUN_DIR is created
                    cluster.wait_for_cluster(cfg.cluster.address, cfg.cluster.connect_timeout_s)
                run_dir = Path(cfg.run.dir or resume_run_dir(cfg, preset) or default_run_dir(preset)).absolute()
                self.lock = RunDirLock(run_dir, cfg.run.dir_mode).acquire()  # type: ignore[arg-type]  # dir_mode is an int once the config is loaded
                answer = (str(run_dir), check_resumable(cfg, run_dir))
            except ConfigError as err:
                answer = err
        answer = cluster.broadcast_object(answer, self.ctx)
        if isinstance(answer, ConfigError):
            raise answer
        self.run_dir, self.resume_step = Path(answer[0]), answer[1]
        cfg.run.dir = str(self.run_dir)  # the resolved config records where the run went (absolute: workers)
        # An embedded Ray's session directory (its sockets) private to this user (Ray makes its own 0777).
        t0 = time.perf_counter()
        self.ray_ctx = cluster.bring_up_ray(
            cfg, self.ctx, temp_dir=ray_temp_dir() if self.owner else None, runtime_env=runtime_env_of(cfg)
        )
        ns = self.ray_ctx.namespace
        world_size = cfg.cluster.num_learners if self.launcher == "ray" else self.ctx.world_size
        if self.owner:
            t1 = time.perf_counter()
            self.topology = Topology.create(cfg, ns, replay_shard_config(cfg, world_size), build_rollout_parts)
            logger.info(
                "start-up: Ray up in %.1f s; %d replay shards, the weight store and %d rollout actors "
                "created in %.1f s (the actors start in the background)",
                t1 - t0,
                cfg.replay.num_shards,
                len(self.topology.actors),
                time.perf_counter() - t1,
            )
        cluster.barrier(self.ctx)
        if self.topology is None:
            self.topology = Topology.lookup(cfg, ns)
        if self.launcher == "ray":
            c = cfg.cluster
            self.group = RayTrainLearners(
                c.num_learners,
                c.num_cpus_per_learner,
                cluster.learners_use_gpu(cfg),
                c.placement_strategy,
                c.learner_max_restarts,
                f"{ns}_learners",
                str(self.run_dir / "ray_train"),
                ns,
                task_events=c.task_events,
            )
        else:
            if self.ctx.device.type == "cpu":
                torch.set_num_threads(cluster.learner_num_threads(cfg, self.ctx))
            self.group = InProcessLearners(self.ctx)
            self.process = LearnerProcess(cfg, self.ctx, self.topology, show_progress=True, started_at=self.started_at)
        if self.owner:  # the resume was accepted: now the run's files are written
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            if self.resume_step is not None:  # rows past the checkpoint are logged again
                truncate_metrics_after(self.run_dir / "metrics.jsonl", self.resume_step)
            self.metrics = MetricLogger.from_config(cfg, self.run_dir)

    # ------------------------------------------------------------------ what tests and the CLI read

    @property
    def learner(self):
        """The in-process ``Learner``; for ``cluster.launcher=ray``, rank 0's ``LearnerSummary``."""
        if self.process is not None:
            return self.process.learner
        return self._summary

    @property
    def preempted(self) -> bool:
        """Whether training stopped early on SIGTERM / SIGINT (after a checkpoint)."""
        return self.process.preempted if self.process is not None else self._summary.preempted

    @property
    def gflownet(self):
        return self.process.gflownet  # type: ignore[union-attr]  # assembled in __init__

    @property
    def policies(self):
        return self.process.policies  # type: ignore[union-attr]  # assembled in __init__

    @property
    def supervisor(self):
        return None if self.process is None else self.process.supervisor

    @property
    def actors(self) -> list:
        return [] if self.topology is None else self.topology.actors

    @property
    def store(self):
        return None if self.topology is None else self.topology.store

    @property
    def learner_nodes(self) -> list:
        """Ray node id of each learner rank (``cluster.launcher=ray``)."""
        return getattr(self.group, "nodes", [])

    @property
    def learner_backend(self) -> str | None:
        """The process-group backend of the learners."""
        return getattr(self.group, "backend", None) if self.launcher == "ray" else self.ctx.backend  # type: ignore[union-attr]  # ctx is set unless launcher=ray

    def actor_stats(self) -> list[dict]:
        """Each rollout actor's ``stats()``."""
        return self.topology.actor_stats()  # type: ignore[union-attr]  # assembled in __init__

    # ------------------------------------------------------------------ running

    def train(self) -> dict:
        """Runs every learner rank to the budget; returns the last metric row (rank 0 / the driver)."""
        if self.launcher == "ray":
            train_fn = functools.partial(run_learner, to_dict(self.cfg), self.ray_ctx.namespace, self.started_at)  # type: ignore[union-attr]  # assembled in __init__
            bar = Progress(
                self.cfg.learner.total_steps,
                enabled=self.cfg.logging.progress_bar,
                desc=f"train (W={self.group.world_size})",
            )
            try:
                result = self.group.run(
                    train_fn,
                    on_row=lambda row: self._on_row(row, bar),
                    on_stop=request_preemption,
                    stop_requested=lambda: preemption_requested() is not None,
                    on_restart=self._on_learner_restart,
                )
            finally:
                bar.close()
            self._summary = LearnerSummary(result["step"], result["preempted"])
        else:
            result = self.group.run(lambda ctx, sink: self.process.run(sink), self.metrics)  # type: ignore[union-attr]  # assembled in __init__
        if self.owner and result is not None:
            self.last_row = result["row"] or self.last_row
            if self.cfg.run.save_policy:
                # atomic: a full disk leaves the previous policy.pt (or none), never a torn one
                save_torch_file(self.run_dir / "policy.pt", {"policies": result["policies"], "step": result["step"]})
        cluster.barrier(self.ctx)  # type: ignore[arg-type]  # ctx is set unless launcher=ray
        return self.last_row if self.owner else (self.process.last_row if self.process else {})

    def _on_row(self, row: dict, bar: Progress) -> None:
        self.metrics.log(row)
        self.last_row = row
        bar.update(int(row["step"]), row)

    def _on_learner_restart(self, restart: int, step: int) -> None:
        """A restarted Ray Train learner group resumed at ``step``: the rows past it will be logged
        again, so they are dropped (the JSONL sink is reopened on the rewritten file)."""
        self.metrics.close()
        truncate_metrics_after(self.run_dir / "metrics.jsonl", step)
        self.metrics = MetricLogger.from_config(self.cfg, self.run_dir)
        if self.last_row.get("step", 0) > step:
            self.last_row = {}

    def close(self) -> None:
        """Stops the actors, closes the sinks, kills what this process created, shuts Ray down, destroys the group."""
        try:
            if self.process is not None:
                self.process.close()
            if self.topology is not None and self.topology.owner:
                self.topology.stop_actors(self.process.run_refs if self.process is not None else [])
            self.metrics.close()
        finally:
            if self.process is not None:
                self.process.learner.release_ddp()  # before the process group goes
            handles = [
                *(self.topology.handles if self.topology else []),
                *(self.group.handles if isinstance(self.group, RayTrainLearners) else []),
            ]
            cluster.teardown(self.ctx, self.ray_ctx, handles)
            self.topology = None
            if self.lock is not None:
                self.lock.release()


#: ``cluster.launcher=ray`` used to have its own driver class; it is the same ``Trainer`` now.
RayTrainer = Trainer
