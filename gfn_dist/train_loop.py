"""One learner rank's part of a run: built from the config and the topology; the loop on one screen.

``LearnerProcess(cfg, ctx, topology, metrics)`` builds, on every rank alike:
the environment, the policies and the loss (same seed on every rank, so the
initial weights agree), the ``Learner`` on a ``ReplayClient`` of every shard, and a
``Checkpointer`` over the stateful components (learner; on rank 0 also replay
and the rollout actors' RNG), and resumes when ``resume`` asks. Rank 0 also
holds the ``WeightPublisher`` and the ``ActorSupervisor``. ``run()`` is the loop::

    start the rollout actors (rank 0), publish version `step`, wait for replay
    each step:  learner.train_step()              sample, loss, backward, clip, Adam
                publish                            rank 0, every learner.sync_every steps
                log                                on log steps (collective; rank 0 writes)
                preemption agreed?  -> checkpoint, stop
                checkpoint                         every checkpoint.interval_steps
    final checkpoint

``run_learner`` is the same for a Ray Train worker (``LearnerGroup`` backends all
run it): the worker looks the topology up by name.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from gfn_dist.builders import (
    build_env,
    build_gflownet,
    build_policies,
    build_rollout_parts,
    exact_terminating_distribution,
    is_enumerable,
    target_distribution,
)
from gfn_dist.checkpoint import Checkpointer, RolloutActorsRNG
from gfn_dist.config import TrainConfig, from_dict
from gfn_dist.distributed.cluster import DistContext
from gfn_dist.distributed.learner import Learner
from gfn_dist.distributed.rank_agreement import RankAgreement, cpu_group
from gfn_dist.distributed.synchronous_rollout import SynchronousRollout
from gfn_dist.distributed.topology import Topology
from gfn_dist.distributed.waiting import WaitStopped
from gfn_dist.distributed.weight_store import cpu_state_dict
from gfn_dist.errors import ReplayStalled
from gfn_dist.files import atomic_write_text
from gfn_dist.preemption import preemption_requested
from gfn_dist.progress import Progress
from gfn_dist.sampled_eval import ModesTracker, sampled_metrics

logger = logging.getLogger(__name__)


def preempted() -> bool:
    """Whether this process received SIGTERM / SIGINT (``gfn_dist.preemption``)."""
    return preemption_requested() is not None


class Evaluator:
    """Rank 0's evaluation at every ``eval.interval_steps``: exact metrics where the environment can be
    enumerated, sampled metrics everywhere.

    Exact (``eval.exact`` and an enumerable environment): ``l1_exact = Σ_x |P_T(x) - target(x)|``
    with the model's exact P_T and the loss's target (``R/Z``, or ``prior · R^β / Z_β`` for relative
    losses); ``logZ_err = |logZ - log Z_target|`` when the loss learns logZ.

    Sampled (``eval.num_samples`` > 0; ``gfn_dist.sampled_eval``): ``eval/reward_mean``,
    ``eval/reward_top{k}_mean``, ``eval/num_unique``, ``eval/logZ_elbo``, ... from fresh samples of the
    current P_F (seeded by ``run.seed`` and the step: the training RNG is not touched), and
    ``eval/modes_found``: distinct modes among every terminal state the learner consumed
    (``observe``) and sampled here, when the environment defines modes.

    Task hooks (optional methods of the environment, on the same samples): ``eval_metrics(states
    (n, *state_shape), top_k) -> dict`` adds task metrics (e.g. a molecule task's
    ``eval/qed_top100_mean``); ``describe(states) -> list[str]`` writes one line per sample to
    ``RUN_DIR/samples/step_<N>.txt`` (e.g. SMILES).
    """

    def __init__(self, cfg: TrainConfig, env, policies, gflownet) -> None:
        self.cfg, self.env, self.policies, self.gflownet = cfg, env, policies, gflownet
        self.exact = cfg.eval.exact and is_enumerable(env)
        self.modes = ModesTracker(env) if ModesTracker.supported(env) else None
        self._target: tuple | None = None  # (probs, logZ), built on first use

    def observe(self, td) -> None:
        """Feeds a consumed batch's terminal states to the modes tracker (TensorDict ``(N,)``, replay format)."""
        if self.modes is not None:
            states, idx = td["states"], td["terminating_idx"]
            self.modes.update(states[torch.arange(states.shape[0], device=states.device), idx - 1])

    def _task_metrics(self, states: torch.Tensor, step: int) -> dict:
        """The environment's own metrics of sampled terminal states, and their descriptions on disk."""
        out: dict = {}
        if callable(getattr(self.env, "eval_metrics", None)):
            out.update(self.env.eval_metrics(states, self.cfg.eval.top_k))
        if callable(getattr(self.env, "describe", None)) and self.cfg.run.dir:
            samples = Path(self.cfg.run.dir) / "samples"
            samples.mkdir(exist_ok=True)
            atomic_write_text(samples / f"step_{step}.txt", "\n".join(self.env.describe(states)) + "\n")
        return out

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        out: dict = {}
        logz = getattr(self.gflownet, "logZ", None)
        logz = float(logz) if isinstance(logz, torch.Tensor) else None
        if self.exact:
            if self._target is None:
                self._target = target_distribution(self.cfg, self.env, getattr(self.gflownet, "prior_pf", None))
            probs, log_z = self._target
            p_t = exact_terminating_distribution(self.env, self.policies["pf"])
            out["l1_exact"] = float((p_t - probs.to(p_t.device)).abs().sum())
            if logz is not None:
                out["logZ_err"] = abs(logz - log_z)
        e = self.cfg.eval
        if e.num_samples > 0:
            pb = self.policies["pb"] if "pb" in self.policies else None
            out.update(
                sampled_metrics(
                    self.env,
                    self.policies["pf"],
                    pb,
                    e.num_samples,
                    e.top_k,
                    log_z=logz,
                    modes=self.modes,
                    seed=self.cfg.run.seed + 7919 * step,
                    on_states=lambda states: self._task_metrics(states, step),
                )
            )
        elif self.modes is not None:
            out.update(self.modes.metrics())
        return out


class ShardRestartReport:
    """Rank 0: one line per replay-shard restart, from the learner's ``ReplayClient.stats()``.

    A shard's own warning stays in its Ray worker's log; this one reaches the driver
    (``gfn_dist.metrics.MetricLogger.warn``, or the driver channel of a Ray Train run).
    """

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}  # shard -> restarts already reported

    def new_restarts(self, shards: list[dict]) -> list[str]:
        """Messages for the restarts not reported yet (``shards``: ``ReplayClient.stats()["shards"]``)."""
        out = []
        for i, s in enumerate(shards):
            restarts = int(s.get("num_restarts", 0))
            if restarts > self._seen.get(i, 0):
                out.append(
                    f"replay shard {i} restarted (restart {restarts}): restored {s.get('restored_size', 0)} items "
                    f"from its snapshot; {s.get('last_items_lost', 0)} of the items it held were lost "
                    f"({s.get('items_lost', 0)} in all)"
                )
            self._seen[i] = max(restarts, self._seen.get(i, 0))
        return out


class LearnerProcess:
    """One learner rank of a run (see module doc).

    Args:
        cfg: the validated configuration (``run.dir`` resolved).
        ctx: this rank's ``DistContext``.
        topology: the run's actors (created by the owner of the run, or looked up).
        show_progress: rank 0 shows progress (``gfn_dist.progress``: a bar on a TTY with
            ``logging.progress_bar``, else one text line per log step); False in Ray Train
            workers, whose driver shows it.
        started_at: ``time.time()`` when the run started (metric ``elapsed_s`` counts from it).

    Raises:
        ConfigError: if ``resume`` finds no checkpoint or an incompatible one.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        topology: Topology,
        show_progress: bool = False,
        started_at: float | None = None,
    ) -> None:
        self.cfg, self.ctx, self.topology = cfg, ctx, topology
        self.metrics: Any = None  # rank 0's sink, given to run()
        self.show_progress = show_progress and ctx.is_main
        torch.manual_seed(cfg.run.seed)  # every rank builds the same initial weights
        self.env = build_env(cfg, ctx.device)
        self.policies = build_policies(cfg, self.env).to(ctx.device)
        self.gflownet = build_gflownet(cfg, self.env, self.policies)
        self.replay = topology.replay_client()
        self.supervisor = (
            topology.supervisor(self.replay, step_fn=lambda: self.learner.step, warn=self.warn) if ctx.is_main else None
        )  # its warnings reach the driver through rank 0's sink (a Ray Train worker's log does not)
        # Several ranks drawing from replay leave every wait on it together (rank_agreement).
        agreement = (
            RankAgreement(cpu_group(ctx), preempted) if ctx.distributed and not cfg.rollout.synchronous else None
        )
        rollout_step = (
            SynchronousRollout(cfg, ctx, topology.shards, build_rollout_parts) if cfg.rollout.synchronous else None
        )  # before resuming: its workers seed the RNG
        self.evaluate = Evaluator(cfg, self.env, self.policies, self.gflownet)
        self.learner = Learner(
            cfg,
            self.env,
            self.policies,
            self.gflownet,
            ctx,
            replay=self.replay,
            health_check=self.check_actors,
            rollout_step=rollout_step,
            # SIGTERM ends a wait on replay at once; several ranks leave it together (RankAgreement:
            # a rank that left its step alone would break the collectives).
            should_stop=preempted if ctx.world_size == 1 or agreement is not None else None,
            observe=self.evaluate.observe if ctx.is_main and self.evaluate.modes else None,
            agreement=agreement,
        )
        self.publisher = topology.publisher() if ctx.is_main else None
        states: dict[str, Any] = {"learner": self.learner}
        if ctx.is_main:
            states["replay"] = self.replay
            if topology.actors:
                states["actors"] = RolloutActorsRNG(topology.actors)
            if self.evaluate.modes is not None:
                states["modes"] = self.evaluate.modes
        self.checkpointer = Checkpointer(cfg, ctx, cfg.run.dir, states)  # type: ignore[arg-type]  # run.dir is resolved before the loop is built
        self.preempted = False  # stopped early on SIGTERM / SIGINT (after a checkpoint)
        self.last_row: dict = {}
        self.run_refs: list = []  # the rollout actors' pending run() calls at the end
        self.started_at = time.time() if started_at is None else float(started_at)
        self._inserts_prev = 0
        self.shard_restarts = ShardRestartReport()
        self.checkpointer.resume()  # before the actors start pushing (run)

    # ------------------------------------------------------------------ the loop

    def run(self, metrics: Any = None) -> dict | None:
        """Trains to ``learner.total_steps`` (or a preemption); returns rank 0's result:
        ``row`` (last metric row), ``step``, ``preempted``, ``policies`` (CPU state dict).

        Args:
            metrics: rank 0's metric sink (``log(row)``); opened by the caller once the resume
                was accepted (nothing of the run is written before).
        """
        self.metrics = metrics if self.ctx.is_main else None
        learner, total = self.learner, self.learner.total_steps
        first_step = learner.step  # 0, or the resumed step (its row was written before)
        if self.supervisor is not None:
            self.supervisor.start()  # calls every rollout actor's run()
        self.publish(force=True)  # version `step` (0, or a resumed step): the actors start from these
        bar = (
            Progress(total, initial=learner.step, enabled=self.cfg.logging.progress_bar) if self.show_progress else None
        )
        try:
            # Synchronous rollouts fill replay before each draw; else wait for every shard's minimum.
            if self.show_progress and not self.cfg.rollout.synchronous:
                logger.info("start-up: waiting for the rollout actors' first batches ...")
            ready = self.cfg.rollout.synchronous or self._until_replay_answers(learner.wait_for_replay)
            if self.show_progress and ready:
                logger.info("start-up: training starts %.1f s after the run started", time.time() - self.started_at)
            learner.reset_counters()
            self._inserts_prev = self._num_inserts()
            while ready and learner.step < total:
                # sample from replay, loss, backward (DDP all-reduce), clip, Adam
                if not self._until_replay_answers(learner.train_step):
                    ready = False  # SIGTERM while waiting on replay: checkpoint below
                    break
                with learner.timer.phase("time/sync_s"):
                    self.publish()  # rank 0, every learner.sync_every steps
                if self.is_log_step():
                    self.log(bar)  # the only host syncs
                elif bar is not None:
                    bar.update(learner.step)
                if self.checkpointer.preemption_agreed(learner.step):  # every rank stops after the same step
                    if not self.is_log_step():
                        self.log(bar)  # the metrics end at the step the checkpoint holds
                    self.checkpointer.save(learner.step, reason="preempt")
                    self.preempted = True
                    break
                if self.checkpointer.is_due(learner.step):
                    self.checkpointer.save(learner.step, reason="interval")
            if not ready:
                if learner.step > first_step and self.last_row.get("step") != learner.step:
                    self.log(bar)  # the metrics end at the step the checkpoint holds
                self.checkpointer.save(learner.step, reason="preempt")
                self.preempted = True
            elif not self.preempted:
                self.checkpointer.save(learner.step, reason="end")  # no-op when this step is saved
        finally:
            if bar is not None:
                bar.close()
            learner.close()
        if self.publisher is not None:
            self.publisher.flush()
        if not self.ctx.is_main:
            return None
        return {
            "row": self.last_row,
            "step": learner.step,
            "preempted": self.preempted,
            "policies": cpu_state_dict(self.policies),
        }

    def _until_replay_answers(self, wait_on_replay) -> bool:
        """Runs a phase that waits on replay; False if a preemption request ended the wait.

        Raises:
            ReplayStalled: if replay gave nothing for ``replay.timeout_s``, after a checkpoint
                of the current step (one line: what the learner waited for).
        """
        try:
            wait_on_replay()
            return True
        except WaitStopped:
            agreed = self.learner.agreement is not None and self.learner.agreement.stop_agreed
            if preemption_requested() is None and not agreed:
                raise
            self.warn(f"preemption while waiting on replay at step {self.learner.step}: checkpointing")  # driver's log
            return False
        except TimeoutError as err:
            # Several ranks checkpoint together only when they agreed on the timeout (RankAgreement).
            together = self.ctx.world_size == 1 or self.learner.agreement is not None
            if together:
                self.checkpointer.save(self.learner.step, reason="stalled")
            saved = "checkpoint written" if together else "no checkpoint (several ranks)"
            raise ReplayStalled(
                f"no replay data for replay.timeout_s={self.cfg.replay.timeout_s:g} s at step "
                f"{self.learner.step} ({self._waited_for()}): {str(err).splitlines()[0]}; "
                f"{saved}, continue with resume=true"
            ) from err

    def _waited_for(self) -> str:
        """Shards alive, actors alive (rank 0's view) for the stall message."""
        parts = [f"shards available {len(self.replay.available())}/{self.replay.num_shards}"]
        if self.supervisor is not None:
            m = self.supervisor.metrics()
            parts.append(f"actors down {m['actors/down']}/{len(self.topology.actors)}")
        return ", ".join(parts)

    def close(self) -> None:
        """Stops the supervisor (before the actors are stopped: an ending ``run()`` is no failure) and
        keeps the actors' pending ``run`` calls (``run_refs``) for the caller to wait on."""
        if self.supervisor is not None:
            self.supervisor.close()
            self.run_refs = self.supervisor.run_refs

    # ------------------------------------------------------------------ phases

    def publish(self, force: bool = False) -> None:
        """Rank 0 publishes the policies as version ``step`` every ``learner.sync_every`` steps
        (``force``: now, replacing whatever the store holds: the start of a run, or of a restarted
        learner that resumed at an older step)."""
        if self.publisher is not None and (force or self.learner.step % self.cfg.learner.sync_every == 0):
            self.publisher.publish(self.learner.step, self.policies, reset=force)

    def check_actors(self) -> None:
        """Raises ``ActorFailure`` once the rollout actors failed beyond the config's limits (rank 0)."""
        if self.supervisor is not None:
            self.supervisor.check(self.learner.step)

    def is_log_step(self) -> bool:
        step = self.learner.step
        return step % self.cfg.logging.log_every == 0 or self.is_eval_step() or step == self.learner.total_steps

    def is_eval_step(self) -> bool:
        every, step = self.cfg.eval.interval_steps, self.learner.step
        return (every > 0 and step % every == 0) or step == self.learner.total_steps

    def _num_inserts(self) -> int:
        return int(self.replay.stats()["num_inserts"]) if self.ctx.is_main else 0

    def log(self, bar: Progress | None = None) -> None:
        """One metric row (collective reduction; rank 0 adds replay, actor and evaluation metrics and writes it)."""
        row = self.learner.reduce_metrics()
        if self.ctx.is_main:
            self.check_actors()
            row["elapsed_s"] = time.time() - self.started_at
            stats = self.replay.stats()
            row["traj_per_s/produced"] = (stats["num_inserts"] - self._inserts_prev) / row["interval_s"]
            self._inserts_prev = stats["num_inserts"]
            row["buffer/size"] = stats["size"]
            row["buffer/samples_per_insert"] = stats["samples_per_insert"]
            row["buffer/rejected"] = stats["num_rejected"]
            row["buffer/inserts"] = stats["num_inserts"]
            row["replay/shard_restarts"] = stats["num_restarts"]
            row["replay/items_lost"] = stats["items_lost"]  # held at a death minus restored, summed
            row["replay/shards_down"] = stats["num_shards_down"]
            for message in self.shard_restarts.new_restarts(stats["shards"]):
                self.warn(message)
            if self.supervisor is not None:
                row.update(self.supervisor.metrics())  # actors/restarts, actors/stalls, rollout/rejected_* ...
            if self.is_eval_step():
                row.update(self.evaluate(self.learner.step))
            if self.metrics is not None:
                self.metrics.log(row)
            if bar is not None:
                bar.update(self.learner.step, row)
        self.last_row = row

    def warn(self, message: str) -> None:
        """A warning for the driver's log: through rank 0's sink (a Ray Train worker's own log is not seen)."""
        if self.metrics is not None:
            self.metrics.warn(message)
        else:
            logger.warning("%s", message)


def run_learner(config: dict, namespace: str, started_at: float, ctx: DistContext, sink: Any) -> dict | None:
    """A ``LearnerGroup`` training function: one rank of a run whose topology exists in ``namespace``.

    A restarted learner group (``ctx.restart`` > 0: Ray Train's retry under
    ``cluster.learner_max_restarts``) resumes from the newest intact checkpoint of the
    run (``resume=auto``: from step 0 when there is none), and rank 0 tells the driver
    the step through ``sink.restarted(restart, step)`` before its first row.

    Args:
        config: ``to_dict`` of the validated configuration (``run.dir`` resolved, absolute).
        namespace: the run's Ray namespace.
        started_at: ``time.time()`` when the run started (metric ``elapsed_s``).
        ctx: this rank's ``DistContext``.
        sink: rank 0's metric sink.

    Returns:
        rank 0's result (``LearnerProcess.run``), None on other ranks.

    Raises:
        ConfigError: if the checkpoint to resume from is incompatible with the configuration.
    """
    cfg = from_dict(config)
    if ctx.restart > 0:
        cfg.resume = "auto"  # continue where the failed group's last checkpoint left off
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cluster.num_cpus_per_learner)))
    process = LearnerProcess(cfg, ctx, Topology.lookup(cfg, namespace), started_at=started_at)
    if ctx.restart > 0 and sink is not None:
        sink.restarted(ctx.restart, process.learner.step)
    try:
        return process.run(sink)
    finally:
        process.close()
