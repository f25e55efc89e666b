"""Neural network modules used by estimators.

* ``MLP``: fully connected network, ``(*B, input_dim) -> (*B, output_dim)``.
* ``DiscreteUniform``: constant zero logits ``(*B, output_dim)``, i.e. the uniform
  distribution over allowed actions after masking (a uniform P_B).

Recurrent sequence models live in ``gfn_dist.recurrent``. This is torchgfn's
``gfn.utils.modules`` path; ``gfn_dist.modules`` re-exports these with the estimators.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU}


def _no_global_hooks() -> bool:
    m = _nn_module
    return not (
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def _no_hooks(module: nn.Module) -> bool:
    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def no_hooks(module: nn.Module) -> bool:
    """Whether ``module(*args)`` would run no hook (its own or global): then ``module.forward(*args)`` is the same."""
    return _no_hooks(module) and _no_global_hooks()


def call_module(module: nn.Module, *args):
    """``module(*args)``, skipping ``nn.Module.__call__`` when no hook of any kind is registered.

    Same result as ``module(*args)``; saves the call machinery (a few microseconds per
    call, which adds up in a rollout loop of small batches).
    """
    if no_hooks(module):
        return module.forward(*args)
    return module(*args)


class MLP(nn.Module):
    """Multi-layer perceptron.

    Args:
        input_dim: input features.
        output_dim: output features.
        hidden_dim: width of each hidden layer.
        n_hidden_layers: number of hidden layers (>= 1).
        activation_fn: one of ``relu``, ``elu``, ``tanh``, ``gelu``, ``leaky_relu``.
        trunk: optional shared trunk (an ``nn.Sequential`` whose output has
            ``hidden_dim`` features), e.g. to share layers between P_F and P_B.

    Raises:
        ValueError: on an unknown activation or n_hidden_layers < 1.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dim: int = 256,
        n_hidden_layers: int = 2,
        activation_fn: str = "relu",
        trunk: nn.Module | None = None,
    ):
        super().__init__()
        if activation_fn not in _ACTIVATIONS:
            raise ValueError(f"MLP: activation_fn must be one of {sorted(_ACTIVATIONS)}, got {activation_fn!r}")
        if n_hidden_layers < 1:
            raise ValueError(f"MLP: n_hidden_layers must be >= 1, got {n_hidden_layers}")
        self.input_dim, self.output_dim, self.hidden_dim = int(input_dim), int(output_dim), int(hidden_dim)
        if trunk is None:
            act = _ACTIVATIONS[activation_fn]
            layers: list[nn.Module] = [nn.Linear(input_dim, hidden_dim), act()]
            for _ in range(n_hidden_layers - 1):
                layers += [nn.Linear(hidden_dim, hidden_dim), act()]
            trunk = nn.Sequential(*layers)
        self.trunk = trunk
        self.last_layer = nn.Linear(hidden_dim, output_dim)
        self._plan: list | None = None

    def _fast_plan(self) -> list:
        """``[(linear, relu_after), ...]`` when the trunk is Linear / ReLU layers only, else ``[]``."""
        if self._plan is None:
            plan: list = []
            mods = list(self.trunk) if isinstance(self.trunk, nn.Sequential) else [None]
            for m in mods:
                if type(m) is nn.Linear:
                    plan.append([m, False])
                elif type(m) is nn.ReLU and plan and not plan[-1][1]:
                    plan[-1][1] = True
                else:
                    plan = []
                    break
            if plan:
                plan.append([self.last_layer, False])
            self._plan = plan
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._fast_plan()
        # Linear / ReLU trunk without hooks: functional calls, ReLU in place on the fresh
        # linear output (same values and gradients as the module calls, fewer allocations).
        fast = bool(plan) and no_hooks(self.trunk)
        if fast:
            for m, _ in plan:
                if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                    fast = False
                    break
        if fast:
            h = x
            for lin, relu in plan:
                h = torch.nn.functional.linear(h, lin.weight, lin.bias)
                if relu:
                    h = torch.relu_(h)
            return h
        return self.last_layer(self.trunk(x))


class DiscreteUniform(nn.Module):
    """Zero logits of shape ``(*B, output_dim)``: uniform over allowed actions.

    Args:
        output_dim: number of logits (``n_actions - 1`` for a uniform P_B).
    """

    def __init__(self, output_dim: int, input_dim: int | None = None):
        super().__init__()
        self.output_dim = int(output_dim)
        self.input_dim = input_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape[:-1], self.output_dim, device=x.device)


class Tabular(nn.Module):
    """A lookup table of logits indexed by state index.

    Args:
        n_states: number of states.
        output_dim: logits per state.
        get_states_indices: maps raw state tensors ``(*B, *state_shape)`` to int64 ``(*B,)``.
    """

    def __init__(self, n_states: int, output_dim: int, get_states_indices):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n_states, output_dim))
        self.get_states_indices = get_states_indices
        self.output_dim = output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.get_states_indices(x.long()).clamp(0, self.table.shape[0] - 1)
        return self.table[idx]
