"""Policy factories of the user's task: ``factory(env, **model.kwargs) -> nn.Module``."""

from __future__ import annotations

import torch
from torch import nn


class ResidualPolicy(nn.Module):
    """Features ``(N, input_dim)`` -> logits ``(N, output_dim)``: input layer, residual blocks, head."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int = 64, n_blocks: int = 1):
        super().__init__()
        self.inp = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.GELU())
                                    for _ in range(n_blocks))
        self.head = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def make_policy(env, hidden_dim: int = 64, n_blocks: int = 1, backward: bool = False) -> nn.Module:
    """P_F (``n_actions`` logits) or, with ``backward=True``, P_B (``n_actions - 1``)."""
    out = env.n_actions - 1 if backward else env.n_actions
    return ResidualPolicy(env.preprocessor.output_dim, out, hidden_dim, n_blocks)


def make_recurrent(env, hidden_dim: int = 32, width: int = 0) -> nn.Module:
    """A GRU P_F over the env's features (``width`` extra logits: a deliberately wrong module when > 0)."""
    from gfn_dist.recurrent import RecurrentDiscreteSequenceModel

    return RecurrentDiscreteSequenceModel(env.preprocessor.output_dim, env.n_actions + width, hidden_dim, rnn_type="gru")
