"""States containers (torchgfn-compatible API, gfn_dist's own implementation).

A ``States`` object wraps one tensor of shape ``(*batch_shape, *state_shape)``.
Environments build a subclass with the class attributes ``state_shape``,
``s0`` (initial state) and ``sf`` (sink state) bound (see ``Env.States``).

``DiscreteStates`` add ``forward_masks`` of shape ``(*batch_shape, n_actions)``
(exit included) and ``backward_masks`` of shape ``(*batch_shape, n_actions - 1)``
(exit excluded). Masks are computed lazily by the environment's tensor-level
mask functions and cached, so building a ``States`` in a hot loop costs nothing
until a mask is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch


class States:
    """A batch of states.

    Attributes:
        tensor: shape ``(*batch_shape, *state_shape)``.
        state_shape: class attribute, the shape of one state.
        s0: class attribute, tensor of shape ``state_shape``, the initial state.
        sf: class attribute, tensor of shape ``state_shape``, the sink state
            (padding after a trajectory's exit action).
    """

    state_shape: ClassVar[tuple[int, ...]] = ()
    s0: ClassVar[torch.Tensor]
    sf: ClassVar[torch.Tensor]

    def __init__(self, tensor: torch.Tensor):
        if tuple(tensor.shape[tensor.dim() - len(self.state_shape) :]) != tuple(self.state_shape):
            raise ValueError(
                f"States tensor of shape {tuple(tensor.shape)} does not end with state_shape {tuple(self.state_shape)}"
            )
        self.tensor = tensor

    # ---- shape helpers -------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape[: self.tensor.dim() - len(self.state_shape)])

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def __len__(self) -> int:
        return self.batch_shape[0] if self.batch_shape else 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={self.batch_shape}, state_shape={self.state_shape})"

    def __getitem__(self, index) -> States:
        return type(self)(self.tensor[index])

    def __setitem__(self, index, value: States) -> None:
        self.tensor[index] = value.tensor

    def clone(self) -> States:
        return type(self)(self.tensor.clone())

    def to(self, device) -> States:
        return type(self)(self.tensor.to(device))

    def flatten(self) -> States:
        """All batch dimensions merged into one."""
        return type(self)(self.tensor.reshape(-1, *self.state_shape))

    # ---- special states -----------------------------------------------
    def _compare(self, other: torch.Tensor) -> torch.Tensor:
        eq = self.tensor == other.to(self.tensor.device)
        for _ in self.state_shape:
            eq = eq.all(dim=-1)
        return eq

    @property
    def is_initial_state(self) -> torch.Tensor:
        """Bool tensor of shape ``batch_shape``: the state equals s0."""
        return self._compare(self.s0)

    @property
    def is_sink_state(self) -> torch.Tensor:
        """Bool tensor of shape ``batch_shape``: the state equals sf."""
        return self._compare(self.sf)

    @classmethod
    def make_initial_states(cls, batch_shape: Sequence[int], device=None) -> States:
        s0 = cls.s0 if device is None else cls.s0.to(device)
        return cls(s0.expand(*batch_shape, *cls.state_shape).clone())

    @classmethod
    def make_sink_states(cls, batch_shape: Sequence[int], device=None) -> States:
        sf = cls.sf if device is None else cls.sf.to(device)
        return cls(sf.expand(*batch_shape, *cls.state_shape).clone())

    @classmethod
    def stack(cls, states: Sequence[States]) -> States:
        return cls(torch.stack([s.tensor for s in states], dim=0))

    def extend(self, other: States) -> None:
        """Appends ``other`` in place (torchgfn's ``States.extend``).

        Batch shape ``(N,)``: concatenation along dim 0. Batch shape ``(T, N)`` (states of
        trajectories): both are padded with sf to the longer T, then concatenated along N.

        Raises:
            ValueError: on other batch ranks, mismatched ranks or devices.
        """
        if other.device != self.device:
            raise ValueError(f"extend: states on {other.device}, expected {self.device}")
        nb, ob = len(self.batch_shape), len(other.batch_shape)
        if nb != ob or nb not in (1, 2):
            raise ValueError(f"extend: batch shapes {self.batch_shape} and {other.batch_shape} (need both 1-D or 2-D)")
        if nb == 1:
            self.tensor = torch.cat([self.tensor, other.tensor], dim=0)
        else:
            T = max(self.batch_shape[0], other.batch_shape[0])
            self.tensor = torch.cat([self._padded(self.tensor, T), self._padded(other.tensor, T)], dim=1)
        self._invalidate()

    def _padded(self, x: torch.Tensor, T: int) -> torch.Tensor:
        if x.shape[0] == T:
            return x
        pad = self.sf.to(x.device).expand(T - x.shape[0], x.shape[1], *self.state_shape)
        return torch.cat([x, pad.to(x.dtype)], dim=0)

    def _invalidate(self) -> None:
        """Drops cached values derived from ``tensor`` (none here; masks in ``DiscreteStates``)."""


class DiscreteStates(States):
    """States of a discrete environment, with lazily computed action masks.

    Attributes:
        n_actions: class attribute, number of forward actions (exit included).
        forward_masks: bool tensor ``(*batch_shape, n_actions)``.
        backward_masks: bool tensor ``(*batch_shape, n_actions - 1)``.
    """

    n_actions: ClassVar[int] = 0
    _forward_mask_fn: ClassVar[Callable[[torch.Tensor], torch.Tensor] | None] = None
    _backward_mask_fn: ClassVar[Callable[[torch.Tensor], torch.Tensor] | None] = None

    def __init__(
        self,
        tensor: torch.Tensor,
        forward_masks: torch.Tensor | None = None,
        backward_masks: torch.Tensor | None = None,
    ):
        super().__init__(tensor)
        self._forward_masks = forward_masks
        self._backward_masks = backward_masks

    @property
    def forward_masks(self) -> torch.Tensor:
        if self._forward_masks is None:
            self._forward_masks = type(self)._forward_mask_fn(self.tensor)  # type: ignore[misc]  # each env's States subclass sets the mask function
        return self._forward_masks

    @forward_masks.setter
    def forward_masks(self, value: torch.Tensor) -> None:
        self._forward_masks = value

    @property
    def backward_masks(self) -> torch.Tensor:
        if self._backward_masks is None:
            self._backward_masks = type(self)._backward_mask_fn(self.tensor)  # type: ignore[misc]  # each env's States subclass sets the mask function
        return self._backward_masks

    @backward_masks.setter
    def backward_masks(self, value: torch.Tensor) -> None:
        self._backward_masks = value

    def __getitem__(self, index) -> DiscreteStates:
        fm = None if self._forward_masks is None else self._forward_masks[index]
        bm = None if self._backward_masks is None else self._backward_masks[index]
        return type(self)(self.tensor[index], fm, bm)

    def clone(self) -> DiscreteStates:
        return type(self)(self.tensor.clone())

    def _invalidate(self) -> None:
        self._forward_masks = self._backward_masks = None

    def to(self, device) -> DiscreteStates:
        return type(self)(self.tensor.to(device))
