"""Preprocessors: map raw state tensors to network inputs.

Each preprocessor is callable on a ``States`` object or directly on its tensor
``(*B, *state_shape)`` and returns a float tensor ``(*B, output_dim)``. Sink
padding rows (``sf``) must map to finite inputs; their outputs are masked out
downstream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _as_tensor(states) -> torch.Tensor:
    return states.tensor if hasattr(states, "tensor") else states


class Preprocessor:
    """Base class. Subclasses implement ``preprocess(tensor)``.

    Attributes:
        output_dim: size of the last dimension of the output.
    """

    def __init__(self, output_dim: int):
        self.output_dim = int(output_dim)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, states) -> torch.Tensor:
        return self.preprocess(_as_tensor(states))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output_dim={self.output_dim})"


class IdentityPreprocessor(Preprocessor):
    """Flattens the state dimensions and casts to float32: ``(*B, output_dim)``."""

    def __init__(self, output_dim: int, state_ndim: int = 1):
        super().__init__(output_dim)
        self.state_ndim = state_ndim

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.state_ndim != 1:
            x = x.flatten(start_dim=x.dim() - self.state_ndim)
        return x.float()


class OneHotPreprocessor(Preprocessor):
    """One-hot of the state's index: ``(*B, n_states)``.

    Args:
        n_states: number of states of the (enumerable) environment.
        get_states_indices: maps a state tensor ``(*B, *state_shape)`` to int64 ``(*B,)``;
            it must map sf to any valid index (the row is masked later).
    """

    def __init__(self, n_states: int, get_states_indices: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(n_states)
        self.get_states_indices = get_states_indices

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.get_states_indices(x).clamp(0, self.output_dim - 1)
        return torch.nn.functional.one_hot(idx, self.output_dim).float()


class KHotPreprocessor(Preprocessor):
    """Concatenated one-hots of each coordinate: ``(*B, ndim * height)``.

    Integer coordinates in ``[0, height)``; the value ``-1`` (sink padding) maps
    to an all-zero block.

    Args:
        height: number of values per coordinate.
        ndim: number of coordinates.
    """

    def __init__(self, height: int, ndim: int):
        super().__init__(height * ndim)
        self.height = int(height)
        self.ndim = int(ndim)
        self._table: torch.Tensor | None = None

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        # One embedding lookup (a few times faster than advanced indexing on large
        # batches): row 0 of the table is zeros (value -1), row v + 1 the one-hot of v,
        # and a last zero row for the value H (one step off the grid: an invalid action's
        # result maps to finite inputs, so the loss can name the action).
        table = self._table
        if table is None or table.device != x.device:
            zero = torch.zeros(1, self.height)
            table = self._table = torch.cat([zero, torch.eye(self.height), zero]).to(x.device)
        return torch.nn.functional.embedding(x + 1, table).flatten(start_dim=-2)
