"""Trajectory balance family of losses.

* ``TBGFlowNet``: Malkin et al. 2022, "Trajectory balance: Improved credit
  assignment in GFlowNets", arXiv:2201.13259. Per trajectory
  ``(logZ + Σ log P_F - Σ log P_B - log R(x))^2``.
* ``LogPartitionVarianceGFlowNet``: Zhang et al. 2023, "Robust Scheduling with
  GFlowNets", arXiv:2302.05446, Sec. 3.2. With scores
  ``s = Σ log P_F - Σ log P_B - log R(x)``, per trajectory ``(s - mean(s))^2``:
  TB at the batch-optimal ``logZ = -mean(s)``, with no learned logZ.

The relative losses (RTB, Relative LPV, Trust-PCL) are in ``gfn_dist.gflownet.relative``
and importable from here too (torchgfn's path).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.gflownet.base import LogZMixin, TrajectoryBasedGFlowNet, reduce_loss, scores_arguments

# torchgfn documents the relative losses in this module (seed 004); they live in
# ``gfn_dist.gflownet.relative`` (which does not import this module) and are re-exported here.
from gfn_dist.gflownet.relative import (
    RelativeLogPartitionVarianceGFlowNet,
    RelativeTBBase,
    RelativeTrajectoryBalanceGFlowNet,
    TrustPCLGFlowNet,
)
from gfn_dist.policy import ScalarEstimator


class TBGFlowNet(LogZMixin, TrajectoryBasedGFlowNet):
    """Trajectory Balance (arXiv:2201.13259, Sec. 2.3).

    Args:
        pf: forward policy estimator.
        pb: backward policy estimator, or None with ``constant_pb=True``.
        logZ: a learnable ``nn.Parameter`` scalar, or a ``ScalarEstimator`` of the
            conditions (conditional GFlowNets); default ``nn.Parameter(init_logZ)``.
        init_logZ: initial value of the scalar logZ.
        constant_pb, log_reward_clip_min, debug, loss_fn: see ``TrajectoryBasedGFlowNet``.

    Raises:
        ValueError: if ``pb`` is None without ``constant_pb=True``.
    """

    def __init__(
        self,
        pf: nn.Module,
        pb: nn.Module | None,
        logZ: nn.Parameter | ScalarEstimator | None = None,
        init_logZ: float = 0.0,
        constant_pb: bool = False,
        log_reward_clip_min: float = -math.inf,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(pf, pb, constant_pb, log_reward_clip_min, debug, loss_fn)
        self.logZ = logZ if logZ is not None else nn.Parameter(torch.tensor(float(init_logZ)))

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """TB loss; a scalar, or ``(N,)`` with ``reduction="none"``.

        Args:
            env: the environment (unused; API compatibility).
            trajectories: forward trajectories.
            recalculate_all_logprobs: recompute log P_F under the current policy (off-policy).
            reduction: ``mean`` | ``sum`` | ``none``.
            log_rewards: optional ``(N,)`` override of the trajectories' log-rewards.
        """
        trajectories, recalculate_all_logprobs, env = scores_arguments(trajectories, recalculate_all_logprobs, env)
        return self._checked_loss(
            trajectories,
            recalculate_all_logprobs,
            log_rewards,
            self.loss_fn,
            reduction,
            offset=self.logz_value(trajectories),
        )


class LogPartitionVarianceGFlowNet(TrajectoryBasedGFlowNet):
    """Log-Partition Variance (arXiv:2302.05446, Sec. 3.2): ``(s - mean(s))^2``, no learned logZ.

    Args: as ``TrajectoryBasedGFlowNet``.
    """

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LPV loss; a scalar, or ``(N,)`` with ``reduction="none"``."""
        scores = self.get_scores(trajectories, recalculate_all_logprobs, env, log_rewards=log_rewards)
        return reduce_loss(self.loss_fn(scores - scores.mean()), reduction)

    def distributed_loss(self, env, trajectories: Trajectories, batch_mean: Callable) -> torch.Tensor:
        """LPV over the global batch: scores centred by ``batch_mean`` (the global mean),
        then this rank's mean (see ``GFlowNet.distributed_loss``)."""
        scores = self.get_scores(trajectories, True, env)
        return self.loss_fn(scores - batch_mean(scores)).mean()


__all__ = [
    "LogPartitionVarianceGFlowNet",
    "RelativeLogPartitionVarianceGFlowNet",
    "RelativeTBBase",
    "RelativeTrajectoryBalanceGFlowNet",
    "TBGFlowNet",
    "TrustPCLGFlowNet",
]
