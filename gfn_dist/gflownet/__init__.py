"""GFlowNet losses."""

from gfn_dist.gflownet.base import GFlowNet, TrajectoryBasedGFlowNet, get_trajectory_pbs, get_trajectory_pfs
from gfn_dist.gflownet.trajectory_balance import LogPartitionVarianceGFlowNet, TBGFlowNet

__all__ = [
    "GFlowNet",
    "TrajectoryBasedGFlowNet",
    "TBGFlowNet",
    "LogPartitionVarianceGFlowNet",
    "get_trajectory_pfs",
    "get_trajectory_pbs",
]
