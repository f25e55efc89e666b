"""GFlowNet losses."""

from gfn_dist.gflownet.base import GFlowNet, TrajectoryBasedGFlowNet, get_trajectory_pbs, get_trajectory_pfs
from gfn_dist.gflownet.trajectory_balance import LogPartitionVarianceGFlowNet, TBGFlowNet
from gfn_dist.gflownet.relative import (
    RelativeLogPartitionVarianceGFlowNet,
    RelativeTBBase,
    RelativeTrajectoryBalanceGFlowNet,
    TrustPCLGFlowNet,
)

__all__ = [
    "GFlowNet",
    "TrajectoryBasedGFlowNet",
    "TBGFlowNet",
    "LogPartitionVarianceGFlowNet",
    "RelativeTBBase",
    "RelativeTrajectoryBalanceGFlowNet",
    "RelativeLogPartitionVarianceGFlowNet",
    "TrustPCLGFlowNet",
    "get_trajectory_pfs",
    "get_trajectory_pbs",
]
