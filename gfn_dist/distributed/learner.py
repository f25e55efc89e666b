"""Learner: one DDP rank's training step, from replay.

Every rank draws ``batch_size / world_size`` trajectories from the replay
shards, rebuilds ``Trajectories`` from the TensorDicts, recomputes log P_F
(and log P_B) under the current policy (off-policy; ``recalculate_all_logprobs=True``),
computes the configured loss through the DDP-wrapped module, and steps Adam
(separate logZ learning rate). The loop around the step -- publishing versioned
weights, logging, evaluation, checkpoints, preemption -- is the run layer's
(``gfn_dist.train_loop``).

Losses over the global batch. DDP averages gradients over ranks, which is the
gradient of the global-batch mean for per-trajectory losses (TB, RTB,
Trust-PCL) because every rank holds the same number of trajectories. The
log-partition-variance losses (LPV, arXiv:2302.05446; relative LPV) centre the
scores by their *batch* mean; under DDP that mean would be per rank. gfn_dist
defines the distributed LPV as the single-process LPV of the global batch: the
loss class's ``distributed_loss`` centres by an autograd-aware all-reduce mean of
the scores (``GlobalBatchLoss.global_mean``), so W ranks with B/W trajectories
each compute the loss -- and, after DDP's averaging, the gradient -- of one
process with all B (tests/test_ddp.py).

Policy versions. Version ``v`` is the policy after ``v`` learner steps
(version 0 = the initial weights, published before training starts). A
trajectory sampled with version ``v`` and used by the update that starts after
``s`` completed steps has ``policy_lag_steps = s - v``.

With ``learner.prefetch`` the next batch is drawn from replay in a background
thread while the current step computes. With several ranks, every wait on
replay ends on all ranks together (``rank_agreement.RankAgreement``): a SIGTERM
on one rank, or one rank's timeout, stops every rank at the same step.

Host syncs (``.item()``) happen only in ``reduce_metrics`` (log steps); the
running sums of loss and policy lag stay on the device in between.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.parallel import DistributedDataParallel

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.distributed.cluster import DistContext
from gfn_dist.distributed.rank_agreement import RankAgreement
from gfn_dist.distributed.waiting import Deadline
from gfn_dist.optim import make_optimizer

if TYPE_CHECKING:  # the run layer's config, read through its attributes only
    from gfn_dist.config import TrainConfig

logger = logging.getLogger(__name__)


class GlobalBatchLoss(nn.Module):
    """The loss of the global batch, computed from this rank's share.

    ``forward(env, trajectories)`` returns this rank's mean loss; with equal
    shares, the average over ranks (DDP's gradient averaging) is the global
    batch mean. For LPV-type losses the centring mean is the global one (an
    all-reduce that back-propagates), see the module doc.

    Args:
        gflownet: the loss module (``GFlowNet``).
        world_size: number of ranks sharing each batch.
    """

    def __init__(self, gflownet: nn.Module, world_size: int = 1) -> None:
        super().__init__()
        self.gflownet = gflownet
        self.world_size = int(world_size)

    def forward(self, env, trajectories: Trajectories) -> torch.Tensor:
        # The loss class knows whether it needs the batch mean (LPV-type losses centre by it).
        return self.gflownet.distributed_loss(env, trajectories, self.global_mean)  # type: ignore[operator]  # the loss module's method (nn.Module attribute)

    def global_mean(self, x_N: torch.Tensor) -> torch.Tensor:
        """Mean of ``x`` over all ranks' (equal-sized) shares, differentiable."""
        if self.world_size == 1 or not dist.is_initialized():
            return x_N.mean()
        return all_reduce(x_N.sum()) / (x_N.shape[0] * self.world_size)


class PhaseTimer:
    """Wall-clock time per named phase, accumulated between log steps (host clock; on CUDA
    phases measure launch time except where a sync happens, e.g. at ``.item()``)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0

    def pop_means(self, n_steps: int) -> dict[str, float]:
        """Mean seconds per step of each phase since the last call."""
        out = {k: v / max(n_steps, 1) for k, v in self.totals.items()}
        self.totals.clear()
        return out


class Learner:
    """One learner rank: the training step and its counters (see module doc).

    The loop around it (publish, log, evaluate, checkpoint, preemption) is the
    run layer's (``gfn_dist.train_loop.TrainLoop``); every collaborator is a
    constructor argument.

    Args:
        cfg: the run's configuration (``learner.*`` and ``replay.timeout_s`` /
            ``replay.min_size_to_sample`` are read).
        env: the environment (on the learner's device).
        policies: ``ModuleDict(pf, [pb])`` (published to the actors).
        gflownet: the loss module over ``policies``.
        ctx: rank / world size / device.
        replay: a ``ReplayClient`` (None for tests that feed batches by hand).
        health_check: called while waiting on replay; raises if the rollout actors
            failed beyond what the config allows (rank 0's ``ActorSupervisor.check``).
        rollout_step: ``rollout.synchronous``: called with the learner before each
            step's draw (``SynchronousRollout``); None with Ray rollout actors.
        observe: called with every batch this rank consumed (TensorDict ``(B/W,)``), e.g. rank 0's
            modes tracker; None: nothing.
        should_stop: polled while waiting on replay; True ends the wait with ``WaitStopped``
            (the run layer passes its preemption flag, so SIGTERM is honoured however long
            replay would have kept the learner waiting).
        agreement: several ranks: the ``RankAgreement`` every wait on replay goes through, so
            the ranks leave it together (None: one rank, or synchronous rollouts).
    """

    _lag_max: torch.Tensor  # set by reset_counters

    def __init__(
        self,
        cfg: TrainConfig,
        env,
        policies: nn.ModuleDict,
        gflownet: nn.Module,
        ctx: DistContext,
        replay=None,
        health_check: Callable[[], None] | None = None,
        rollout_step: Callable[[Learner], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        observe: Callable[[object], None] | None = None,
        agreement: RankAgreement | None = None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.ctx = ctx
        self.device = ctx.device
        self.policies = policies
        self.gflownet = gflownet.to(self.device)
        self.loss_module = GlobalBatchLoss(self.gflownet, ctx.world_size)
        if ctx.distributed:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(self.loss_module, device_ids=ids)
        else:
            self.model = self.loss_module
        self.optimizer = make_optimizer(self.gflownet, cfg.learner.lr, cfg.learner.lr_logz)
        self.params = [p for p in self.gflownet.parameters() if p.requires_grad]
        self.local_batch_size = cfg.learner.batch_size // ctx.world_size
        self.total_steps = cfg.learner.total_steps
        self.replay = replay
        self.health_check = health_check or (lambda: None)
        self.rollout_step = rollout_step
        self.should_stop = should_stop or (lambda: False)
        self.observe = observe
        self.agreement = agreement
        self.step = 0
        self.timer = PhaseTimer()
        self._prefetch: Future | None = None  # Future of the next batch (learner.prefetch)
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-prefetch")
        self.reset_counters()

    # ------------------------------------------------------------------ the step, top to bottom

    def release_ddp(self) -> None:
        """Drops the DDP wrapper (its reducer holds the process group); call before destroying the group.

        A gloo group whose last reference goes after ``destroy_process_group`` can wait
        forever on its worker threads (PyTorch issue 75097; seen ~1 run in 8 here).
        """
        if self.model is not self.loss_module:
            self.model = self.loss_module
            gc.collect()

    def train_step(self) -> None:
        """One learner step: (synchronous rollout), sample, loss, backward + clip + Adam, counters."""
        if self.rollout_step is not None:
            with self.timer.phase("time/rollout_s"):
                self.rollout_step(self)  # rollout.synchronous: rank 0 samples from the current weights
        with self.timer.phase("time/sample_s"):
            td = self.sample_replay()  # this rank's B / W trajectories
        with self.timer.phase("time/loss_s"):
            loss = self.compute_loss(td)  # recomputes log P_F / log P_B under the current policy
        with self.timer.phase("time/backward_s"):
            self.optimize(loss)  # backward (DDP all-reduce), clip, Adam
        self.track(td, loss)  # device-side counters, no host sync
        if self.observe is not None:
            self.observe(td)
        self.step += 1

    def compute_loss(self, td) -> torch.Tensor:
        """Loss of this rank's batch ``td`` (TensorDict ``(B/W,)`` in the replay format)."""
        trajectories = Trajectories.from_tensordict(self.env, td.to(self.device))
        return self.model(self.env, trajectories)

    def optimize(self, loss: torch.Tensor) -> None:
        """Backward, gradient clipping (``learner.grad_clip``), optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.learner.grad_clip is not None:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip)
        self.optimizer.step()

    # ------------------------------------------------------------------ replay

    def sample_replay(self):
        """This rank's batch for the current step (TensorDict ``(B/W,)``).

        With ``learner.prefetch`` the next step's batch is drawn in a background
        thread while this step computes (hiding the replay round trips); its
        trajectories are then up to one step older. The policy lag is measured
        when a batch is used.
        """
        if self.rollout_step is not None:
            return self._draw()
        if not self.cfg.learner.prefetch:
            return self._draw() if self.agreement is None else self.agreement.result(self._executor.submit(self._draw))
        if self._prefetch is None:
            self._prefetch = self._executor.submit(self._draw)
        # re-raises the draw's error; several ranks: once every rank's draw is done (or one failed)
        td = self._prefetch.result() if self.agreement is None else self.agreement.result(self._prefetch)
        # Never draw past the budget: nothing would consume it (and it might wait on stopped actors).
        self._prefetch = self._executor.submit(self._draw) if self.step + 1 < self.total_steps else None
        return td

    def _draw(self):
        """Draws this rank's share from the shards, waiting on the rate limiter (health-checking
        between retries: a dead actor explains an empty replay).

        Raises:
            TimeoutError: if replay refused for ``replay.timeout_s`` (naming the limiter condition).
            WaitStopped: if training ended while this draw waited.
        """
        return self.replay.sample(
            self.local_batch_size,
            timeout_s=self.cfg.replay.timeout_s,
            should_stop=self._stop_waiting,
            on_pause=self.health_check,
        )

    def _stop_waiting(self) -> bool:
        return self._closing or self.should_stop() or (self.agreement is not None and self.agreement.stop_agreed)

    def wait_for_replay(self) -> None:
        """Blocks until every shard holds ``replay.min_size_to_sample`` items.

        Starting only then keeps a slow-starting actor's first batches from
        being used after the learner has run far ahead (a policy-lag bound,
        see tests/test_trainer_ray.py).

        Raises:
            TimeoutError: after ``replay.timeout_s`` (several ranks: on one of them).
            WaitStopped: if ``should_stop`` said so while waiting (several ranks: on one of them).
        """
        need = self.cfg.replay.min_size_to_sample
        wait = Deadline(
            self.cfg.replay.timeout_s,
            initial_backoff_s=0.02,
            max_backoff_s=0.02,
            on_pause=self.health_check,
            should_stop=self._stop_waiting,
        )

        def check_then_pause() -> None:  # the deadline, then the health check and the stop flag
            if wait.expired:
                raise TimeoutError(
                    f"replay warm-up: shard sizes {self.replay.sizes()} still below "
                    f"replay.min_size_to_sample={need} after {self.cfg.replay.timeout_s:g} s"
                )
            wait.pause()

        if self.agreement is not None:
            self.agreement.until(lambda: min(self.replay.sizes()) >= need, check=check_then_pause)
            return
        while min(self.replay.sizes()) < need:
            check_then_pause()

    def close(self) -> None:
        """Stops the prefetch thread (a draw in flight ends at its next timeout)."""
        self._closing = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ counters

    def track(self, td, loss: torch.Tensor) -> None:
        """Adds this step's loss and policy lags to the device-side counters."""
        lag = self.step - td["policy_version"].to(self.device)
        self._loss_sum += loss.detach()
        self._lag_sum += lag.sum()
        self._lag_count += lag.numel()
        self._lag_max = torch.maximum(self._lag_max, lag.max())

    def reset_counters(self) -> None:
        """Starts a new log interval (counters at zero, clock and step noted)."""
        z = torch.zeros((), device=self.device)
        self._loss_sum, self._lag_sum, self._lag_count = z.clone(), z.clone(), 0
        self._lag_max = torch.full((), -1.0, device=self.device)
        self._grad_norm = torch.full((), math.nan, device=self.device)
        self._interval_start = (time.perf_counter(), self.step)

    def reduce_metrics(self) -> dict:
        """This log interval's learner metrics, reduced over the ranks (collective: every rank calls it).

        The only host syncs of the learner (``tolist`` / ``item``); resets the counters.

        Returns:
            ``step``, ``trajectories``, ``world_size``, ``loss`` (mean over the interval's steps and
            ranks), ``policy_lag_steps_mean`` / ``_max``, ``grad_norm``, ``logZ`` (when learned),
            ``learner_steps_per_s``, ``traj_per_s``, ``interval_s`` and the phase times ``time/*_s``.
        """
        t_prev, step_prev = self._interval_start
        n_steps = self.step - step_prev
        sums = torch.stack([self._loss_sum, self._lag_sum, torch.tensor(float(self._lag_count), device=self.device)])
        lag_max = self._lag_max.clone()
        if self.ctx.distributed:
            dist.all_reduce(sums)
            dist.all_reduce(lag_max, op=dist.ReduceOp.MAX)
        loss_sum, lag_sum, lag_count = sums.tolist()  # host sync: log steps only
        dt = max(time.perf_counter() - t_prev, 1e-9)
        row = {
            "step": self.step,
            "trajectories": self.step * self.cfg.learner.batch_size,
            "world_size": self.ctx.world_size,
            "loss": loss_sum / max(n_steps * self.ctx.world_size, 1),
            "policy_lag_steps_mean": lag_sum / max(lag_count, 1.0),
            "policy_lag_steps_max": lag_max.item(),
            "grad_norm": self._grad_norm.item(),
            "learner_steps_per_s": n_steps / dt,
            "traj_per_s": n_steps * self.cfg.learner.batch_size / dt,
            "interval_s": dt,
        }
        logz = getattr(self.gflownet, "logZ", None)
        if isinstance(logz, torch.Tensor):
            row["logZ"] = logz.item()
        row.update(self.timer.pop_means(n_steps))
        self.reset_counters()
        return row

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Model (policies + logZ), optimizer, step; ``policy_version`` (= step), ``trajectories_seen``
        and ``world_size`` for readers of the checkpoint."""
        return {
            "gflownet": self.gflownet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "policy_version": self.step,
            "trajectories_seen": self.step * self.cfg.learner.batch_size,
            "world_size": self.ctx.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gflownet.load_state_dict(state["gflownet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
