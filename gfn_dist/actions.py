"""Actions container (torchgfn-compatible API).

Discrete actions are int64 tensors of shape ``(*batch_shape, 1)``; the dummy
(padding) action is ``-1`` and the exit action is ``n_actions - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch


class Actions:
    """A batch of actions.

    Attributes:
        tensor: int64 tensor of shape ``(*batch_shape, *action_shape)``.
        action_shape: class attribute, ``(1,)`` for discrete environments.
        dummy_action: class attribute, tensor of shape ``action_shape`` (``[-1]``).
        exit_action: class attribute, tensor of shape ``action_shape`` (``[n_actions - 1]``).
    """

    action_shape: ClassVar[tuple[int, ...]] = (1,)
    dummy_action: ClassVar[torch.Tensor] = torch.tensor([-1])
    exit_action: ClassVar[torch.Tensor] = torch.tensor([0])

    def __init__(self, tensor: torch.Tensor):
        if tuple(tensor.shape[tensor.dim() - len(self.action_shape) :]) != tuple(self.action_shape):
            raise ValueError(
                f"Actions tensor of shape {tuple(tensor.shape)} does not end with "
                f"action_shape {tuple(self.action_shape)}"
            )
        self.tensor = tensor

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape[: self.tensor.dim() - len(self.action_shape)])

    def __len__(self) -> int:
        return self.batch_shape[0] if self.batch_shape else 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={self.batch_shape})"

    def __getitem__(self, index) -> Actions:
        return type(self)(self.tensor[index])

    def clone(self) -> Actions:
        return type(self)(self.tensor.clone())

    def _compare(self, other: torch.Tensor) -> torch.Tensor:
        eq = self.tensor == other.to(self.tensor.device)
        for _ in self.action_shape:
            eq = eq.all(dim=-1)
        return eq

    @property
    def is_dummy(self) -> torch.Tensor:
        """Bool tensor of shape ``batch_shape``."""
        return self._compare(self.dummy_action)

    @property
    def is_exit(self) -> torch.Tensor:
        """Bool tensor of shape ``batch_shape``."""
        return self._compare(self.exit_action)

    @classmethod
    def make_dummy_actions(cls, batch_shape: Sequence[int], device=None) -> Actions:
        d = cls.dummy_action if device is None else cls.dummy_action.to(device)
        return cls(d.expand(*batch_shape, *cls.action_shape).clone())

    @classmethod
    def make_exit_actions(cls, batch_shape: Sequence[int], device=None) -> Actions:
        e = cls.exit_action if device is None else cls.exit_action.to(device)
        return cls(e.expand(*batch_shape, *cls.action_shape).clone())

    @classmethod
    def stack(cls, actions: Sequence[Actions]) -> Actions:
        return cls(torch.stack([a.tensor for a in actions], dim=0))
