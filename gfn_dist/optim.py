"""The optimizer a GFlowNet trains with (single process and distributed learners alike)."""

from __future__ import annotations

import torch
from torch import nn


def make_optimizer(gflownet: nn.Module, lr: float, lr_logz: float) -> torch.optim.Optimizer:
    """Adam with a separate learning rate for logZ when the loss learns one.

    Args:
        gflownet: the loss module; when it has ``pf_pb_parameters`` / ``logz_parameters``
            (TB, RTB, ...) logZ gets ``lr_logz``, otherwise every trainable parameter gets ``lr``.
        lr: learning rate of the policies (and any other trainable parameter).
        lr_logz: learning rate of logZ.

    Returns:
        ``torch.optim.Adam`` (fused: Adam's per-parameter arithmetic in one pass on CPU and CUDA).
    """
    if hasattr(gflownet, "logz_parameters"):
        groups = [
            {"params": gflownet.pf_pb_parameters(), "lr": lr},  # type: ignore[operator]  # a loss-module method (hasattr-checked)
            {"params": gflownet.logz_parameters(), "lr": lr_logz},  # type: ignore[operator]  # a loss-module method (hasattr-checked)
        ]
    else:
        groups = [{"params": [p for p in gflownet.parameters() if p.requires_grad], "lr": lr}]
    return torch.optim.Adam(groups, fused=True)
