"""GFlowNet losses (torchgfn's ``gfn.gflownet``)."""

from gfn_dist.gflownet.base import GFlowNet, TrajectoryBasedGFlowNet, get_trajectory_pbs, get_trajectory_pfs
from gfn_dist.gflownet.detailed_balance import DBGFlowNet, ModifiedDBGFlowNet
from gfn_dist.gflownet.flow_matching import FMGFlowNet
from gfn_dist.gflownet.losses import HalfSquaredLoss, RegressionLoss, SquaredLoss
from gfn_dist.gflownet.relative import (
    RelativeLogPartitionVarianceGFlowNet,
    RelativeTBBase,
    RelativeTrajectoryBalanceGFlowNet,
    TrustPCLGFlowNet,
)
from gfn_dist.gflownet.sub_trajectory_balance import SubTBGFlowNet
from gfn_dist.gflownet.trajectory_balance import LogPartitionVarianceGFlowNet, TBGFlowNet

__all__ = [
    "DBGFlowNet",
    "FMGFlowNet",
    "GFlowNet",
    "HalfSquaredLoss",
    "LogPartitionVarianceGFlowNet",
    "ModifiedDBGFlowNet",
    "RegressionLoss",
    "RelativeLogPartitionVarianceGFlowNet",
    "RelativeTBBase",
    "RelativeTrajectoryBalanceGFlowNet",
    "SquaredLoss",
    "SubTBGFlowNet",
    "TBGFlowNet",
    "TrajectoryBasedGFlowNet",
    "TrustPCLGFlowNet",
    "get_trajectory_pbs",
    "get_trajectory_pfs",
]
