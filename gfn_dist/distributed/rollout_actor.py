"""Rollout actor: samples trajectories with the newest published policy and pushes them to replay.

``RolloutWorker`` is a plain class (usable in-process, e.g. by tests and the
benchmark); ``create_rollout_actors`` wraps it with ``ray.remote``. A worker is
built from the (plain-data) ``TrainConfig`` and its ``actor_id``: it builds its
own environment, policy copy (P_F, and P_B for local search) and sampler, so no
live object crosses process boundaries. Its loop (``run``):

1. poll the weight store; load the weights when the published version changed;
2. sample a batch (``Sampler`` / ``LocalSearchSampler`` with the exploration
   ``policy_kwargs``);
3. convert it to the wire format ``Trajectories.to_tensordict(max_length=env.max_traj_len)``
   and tag every trajectory with ``policy_version`` and ``actor_id`` (int64);
4. push it to replay shard ``actor_id % num_shards``, waiting while the rate
   limiter refuses.

A recurrent policy's carry lives in the sampler's ``RolloutContext`` for the
duration of one rollout and is never part of the pushed TensorDict.

Seeds: actor ``i`` seeds torch with ``run.seed + i``. Each actor uses one
intra-op thread (``torch.set_num_threads(1)``): actors are the unit of parallelism.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import torch
from tensordict import TensorDict

from gfn_dist.config import TrainConfig

logger = logging.getLogger(__name__)

#: Keys of a pushed batch (``log_probs`` is not shipped: learners recompute it).
SHIPPED_KEYS = ("states", "actions", "terminating_idx", "log_rewards", "policy_version", "actor_id")


def actor_device(cfg: TrainConfig) -> torch.device:
    """CUDA when the actor was given a GPU share and CUDA is visible, else CPU."""
    if cfg.rollout.num_gpus_per_actor > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class RolloutWorker:
    """One rollout actor (see module doc).

    Args:
        cfg: the run's configuration.
        actor_id: this actor's index (seed offset and replay routing).
        shard_handles: replay shard actor handles (None: ``sample_batch`` only, no pushing).
        weight_store: ``WeightStore`` actor handle (None: keep the initial weights).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        actor_id: int,
        shard_handles: Optional[Sequence[Any]] = None,
        weight_store: Any = None,
    ) -> None:
        from gfn_dist.builders import build_env, build_policies, build_sampler

        torch.set_num_threads(1)
        self.cfg = cfg
        self.actor_id = int(actor_id)
        self.seed = cfg.run.seed + self.actor_id
        torch.manual_seed(self.seed)
        self.device = actor_device(cfg)
        self.env = build_env(cfg, self.device)
        self.policies = build_policies(cfg, self.env, init_from_prior=False).to(self.device).eval()
        self.sampler, self.sample_kwargs = build_sampler(cfg, self.policies)
        self.replay = None
        self.shard_index = None
        if shard_handles is not None:
            from gfn_dist.distributed.replay_client import ReplayClient

            self.replay = ReplayClient(shard_handles, timeout_s=cfg.replay.timeout_s)
            self.shard_index = self.replay.shard_for_actor(self.actor_id)
        self.weights = None
        if weight_store is not None:
            from gfn_dist.distributed.weight_store import WeightSubscriber

            self.weights = WeightSubscriber(weight_store, self.policies)
        self.policy_version = -1 if weight_store is not None else 0
        self.num_batches = 0
        self.num_trajectories = 0
        self.sample_time_s = 0.0
        self.push_time_s = 0.0
        self.versions_used: list[int] = []
        self._stop = False

    # ------------------------------------------------------------------ one batch

    @torch.no_grad()
    def sample_batch(self) -> TensorDict:
        """Samples one batch and returns it in the wire format, tagged (CPU, batch size ``(N,)``)."""
        traj = self.sampler.sample_trajectories(self.env, n=self.cfg.rollout.trajectories_per_push,
                                                **self.sample_kwargs)
        td = traj.to_tensordict(max_length=self.env.max_traj_len)
        td = td.exclude("log_probs")  # learners recompute log P_F under the current policy
        n = td.batch_size[0]
        td.set("policy_version", torch.full((n,), self.policy_version, dtype=torch.int64, device=td.device))
        td.set("actor_id", torch.full((n,), self.actor_id, dtype=torch.int64, device=td.device))
        return td.to("cpu")

    def refresh_weights(self) -> bool:
        """Loads newer published weights; returns True when the run asked to stop."""
        if self.weights is None:
            return self._stop
        latest, stopped = self.weights.poll()
        if self.weights.refresh(latest):
            self.policy_version = self.weights.version
        return stopped or self._stop

    def push(self, td: TensorDict) -> bool:
        """Pushes ``td`` to this actor's shard, waiting while the limiter refuses.

        Returns:
            False if the run stopped while waiting (the batch is dropped).
        """
        poll_s = min(1.0, self.cfg.replay.timeout_s)
        deadline = time.monotonic() + self.cfg.replay.timeout_s
        while True:
            try:
                self.replay.add(td, self.shard_index, timeout_s=poll_s)
                return True
            except TimeoutError:
                # Waiting on the learners; check between tries whether training is over.
                if self._run_stopped():
                    return False
                if time.monotonic() > deadline:
                    raise

    def _run_stopped(self) -> bool:
        """Whether the run asked to stop (no weight loading: the pending batch keeps its version)."""
        if self.weights is None:
            return self._stop
        return self.weights.poll()[1] or self._stop

    # ------------------------------------------------------------------ loop

    def run(self, max_batches: Optional[int] = None) -> dict:
        """Sample-and-push loop until the weight store says stop (or ``max_batches``).

        Waits for the first published weights before sampling, so no trajectory
        comes from the actor's own random initialisation.

        Returns:
            ``stats()`` at the end.
        """
        if self.replay is None:
            raise ValueError("RolloutWorker.run: built without shard_handles; nothing to push to")
        poll_every = self.cfg.rollout.weight_poll_every
        while max_batches is None or self.num_batches < max_batches:
            if self.policy_version < 0 or self.num_batches % poll_every == 0:
                if self.refresh_weights():
                    break
                if self.policy_version < 0:
                    time.sleep(0.01)
                    continue
            t0 = time.perf_counter()
            td = self.sample_batch()
            t1 = time.perf_counter()
            if not self.push(td):
                break
            self.push_time_s += time.perf_counter() - t1
            self.sample_time_s += t1 - t0
            self.num_batches += 1
            self.num_trajectories += td.batch_size[0]
            if not self.versions_used or self.versions_used[-1] != self.policy_version:
                self.versions_used.append(self.policy_version)
        return self.stats()

    def stop(self) -> None:
        """Asks ``run`` to return after the current batch (callable concurrently on a Ray actor)."""
        self._stop = True

    def stats(self) -> dict:
        """Counters: ``actor_id``, ``policy_version``, ``num_batches``, ``num_trajectories``,
        ``num_weight_updates``, ``versions_used`` (distinct versions in the order used),
        ``sample_time_s`` and ``push_time_s`` (cumulative)."""
        return {
            "actor_id": self.actor_id,
            "policy_version": self.policy_version,
            "num_batches": self.num_batches,
            "num_trajectories": self.num_trajectories,
            "num_weight_updates": 0 if self.weights is None else self.weights.num_updates,
            "versions_used": list(self.versions_used),
            "sample_time_s": self.sample_time_s,
            "push_time_s": self.push_time_s,
        }


def rollout_actor_name(namespace_prefix: str, actor_id: int) -> str:
    """Ray actor name of rollout actor ``actor_id``."""
    return f"{namespace_prefix}_rollout_{int(actor_id)}"


def create_rollout_actors(
    cfg: TrainConfig,
    shard_handles: Sequence[Any],
    weight_store: Any,
    *,
    name_prefix: Optional[str] = None,
    namespace: Optional[str] = None,
) -> list:
    """Creates ``cfg.rollout.num_actors`` ``RolloutWorker`` Ray actors.

    Each reserves ``rollout.num_cpus_per_actor`` CPUs and ``rollout.num_gpus_per_actor``
    GPUs (fractional allowed) and allows two concurrent calls, so ``stats`` /
    ``stop`` answer while ``run`` is looping.

    Returns:
        actor handles, actor 0 first.
    """
    import ray

    remote_cls = ray.remote(RolloutWorker)
    handles = []
    for i in range(cfg.rollout.num_actors):
        options: dict[str, Any] = {
            "num_cpus": cfg.rollout.num_cpus_per_actor,
            "num_gpus": cfg.rollout.num_gpus_per_actor,
            "max_concurrency": 2,
        }
        if name_prefix is not None:
            options["name"] = rollout_actor_name(name_prefix, i)
        if namespace is not None:
            options["namespace"] = namespace
        handles.append(remote_cls.options(**options).remote(cfg, i, list(shard_handles), weight_store))
    return handles
