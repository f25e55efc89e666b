"""Synchronous rollouts (``rollout.synchronous=true``): deterministic, resumable runs.

Ray actors sample concurrently with the learner, so their data stream depends
on timing and a resumed run cannot replay it. In synchronous mode rank 0
instead runs the same ``RolloutWorker`` code in its own process before every
learner step, with the current weights and the learner's seeded RNG (which
checkpoints capture), and pushes the batches into the real replay shard
actors. The run is then a deterministic function of the seed and a resumed run
equals an uninterrupted one (tests/test_checkpoint.py). Checkpoints and resume:
``gfn_dist.checkpoint``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray
import torch.distributed as dist

from gfn_dist.distributed.rollout_actor import RolloutBuilder, RolloutWorker
from gfn_dist.distributed.routing import allocate_proportional
from gfn_dist.distributed.weight_store import cpu_state_dict

if TYPE_CHECKING:  # the run layer's config, read through its attributes only
    from gfn_dist.config import TrainConfig


class SynchronousRollout:
    """``rollout.synchronous``: rank 0 samples in-process before each learner step (module doc).

    Before every step (``__call__(learner)``), rank 0 loads the current weights
    into ``rollout.num_actors`` in-process ``RolloutWorker``s (version = the
    step), each samples one batch and offers it to its shard
    (``actor_id % num_shards``; a rate-limited batch is dropped), repeated until
    the shards can serve the whole step's draw. All ranks then pass a barrier.
    The workers use the process's global torch RNG (checkpointed per rank).

    Args:
        cfg: the run's configuration.
        ctx: the rank's ``DistContext``.
        shards: replay shard actor handles.
        build: how the workers build their env, policies and sampler (``RolloutBuilder``).
        max_rounds: sampling rounds per step before giving up (a stalled limiter).
    """

    def __init__(self, cfg: TrainConfig, ctx, shards: list, build: RolloutBuilder, max_rounds: int = 1000) -> None:
        self.ctx = ctx
        self.shards = list(shards)
        self.local_batch_size = cfg.learner.batch_size // ctx.world_size
        self.max_rounds = max_rounds
        self.workers = [RolloutWorker(cfg, i, build) for i in range(cfg.rollout.num_actors)] if ctx.is_main else []

    def __call__(self, learner) -> None:
        if self.ctx.is_main:
            self._fill(learner)
        if self.ctx.distributed:
            dist.barrier()

    def _fill(self, learner) -> None:
        weights = cpu_state_dict(learner.policies)
        for w in self.workers:
            w.policies.load_state_dict(weights)
            w.policy_version = learner.step
        for _ in range(self.max_rounds):
            accepted = 0
            for w in self.workers:
                result = ray.get(self.shards[w.actor_id % len(self.shards)].try_add.remote(w.sample_batch()))
                if result["status"] == "invalid":
                    raise ValueError(f"synchronous rollout: shard rejected a batch: {result['reason']}")
                accepted += bool(result["accepted"])
            blockers = self._sample_blockers()
            if not blockers:
                return
            if not accepted:
                raise RuntimeError(f"synchronous rollout: replay refuses both inserts and the draw: {blockers}")
        raise RuntimeError(f"synchronous rollout: the draw is still refused after {self.max_rounds} rounds")

    def _sample_blockers(self) -> list[str]:
        """Why the shards would refuse every rank's share of the draw (empty: they would serve it)."""
        sizes = ray.get([s.size.remote() for s in self.shards])
        if sum(sizes) == 0:
            return ["all shards are empty"]
        counts = allocate_proportional(self.local_batch_size, sizes)  # what each rank will ask for
        refs = {i: self.shards[i].check_sample.remote(k * self.ctx.world_size) for i, k in enumerate(counts) if k}
        return [f"shard {i}: {r}" for i, r in zip(refs, ray.get(list(refs.values())), strict=True) if r is not None]
