"""Multisets of items added one at a time: an enumerable GFlowNet task with many paths per object.

A state is the count vector ``c`` (int64 ``(n_types,)``) of a multiset of at most
``size`` items of ``n_types`` types; s0 is empty (zeros), sf is all ``-1``.
Action ``i < n_types`` adds one item of type i while the multiset has fewer than
``size`` items; exit (``n_types``) is allowed exactly when it is full. Backward
action i removes one item of type i. A full multiset ``c`` is reached by
``size! / prod_i c_i!`` distinct trajectories (its orderings).

Reward, separable over types (item value ``v_i``, diminishing returns ``lam``)::

    log R(c) = sum_i (v_i c_i - lam c_i (c_i - 1) / 2) / temperature

``log_partition`` is computed in closed form over types (a product of
polynomials in t, coefficient of t^size), independently of the enumeration.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch

from gfn_dist.env import DiscreteEnv
from gfn_dist.preprocessors import KHotPreprocessor
from gfn_dist.states import DiscreteStates


class Multiset(DiscreteEnv):
    """Multisets of ``size`` items over ``n_types`` types (module doc).

    Args:
        n_types: number of item types (>= 2).
        size: items in a finished multiset (>= 1).
        values: value ``v_i`` of each type; default ``linspace(0, 1, n_types)``.
        lam: diminishing-returns penalty (>= 0).
        temperature: divides the log-reward (> 0).
        device: where states live.

    Raises:
        ValueError: on sizes out of range or ``len(values) != n_types``.
    """

    def __init__(
        self,
        n_types: int = 4,
        size: int = 6,
        values: Optional[Sequence[float]] = None,
        lam: float = 0.5,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
    ):
        if n_types < 2 or size < 1:
            raise ValueError(f"Multiset: need n_types >= 2 and size >= 1, got n_types={n_types}, size={size}")
        if lam < 0 or temperature <= 0:
            raise ValueError(f"Multiset: need lam >= 0 and temperature > 0, got lam={lam}, temperature={temperature}")
        values = torch.linspace(0.0, 1.0, n_types) if values is None else torch.tensor(list(values), dtype=torch.float)
        if values.shape != (n_types,):
            raise ValueError(f"Multiset: values must have n_types={n_types} entries, got {values.numel()}")
        self.n_types, self.size = int(n_types), int(size)
        self.lam, self.temperature = float(lam), float(temperature)
        self.values = values.to(device)
        # Row a adds type a; the exit row is zero (the row becomes sf anyway).
        self._unit = torch.cat([torch.eye(n_types, dtype=torch.long), torch.zeros(1, n_types, dtype=torch.long)]).to(device)
        super().__init__(
            n_actions=n_types + 1,
            s0=torch.zeros(n_types, dtype=torch.long),
            sf=torch.full((n_types,), -1, dtype=torch.long),
            max_traj_len=size + 1,
            preprocessor=KHotPreprocessor(size + 1, n_types),
            device=device,
        )
        self._radix = (size + 1) ** torch.arange(n_types - 1, -1, -1, device=self.device)
        counts = [c for c in itertools.product(range(size + 1), repeat=n_types) if sum(c) <= size]
        self._all = torch.tensor(counts, dtype=torch.long, device=self.device)
        full = self._all.sum(-1) == size
        n_codes = (size + 1) ** n_types
        self._index = torch.full((n_codes,), -1, dtype=torch.long, device=self.device)
        self._index[self._code(self._all)] = torch.arange(len(counts), device=self.device)
        self._term = self._all[full]
        self._term_index = torch.full((n_codes,), -1, dtype=torch.long, device=self.device)
        self._term_index[self._code(self._term)] = torch.arange(self._term.shape[0], device=self.device)

    # ---- tensor hooks (batched; rows may be sf, masked rows are discarded) ----
    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(-1, keepdim=True)
        add = (total < self.size).expand(*x.shape[:-1], self.n_types)
        return torch.cat([add, total == self.size], dim=-1)

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x > 0

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x + self._unit[a]

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x - self._unit[a]

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self._log_reward64(x).float()

    def _log_reward64(self, x: torch.Tensor) -> torch.Tensor:
        c = x.double()
        return ((self.values.double() * c).sum(-1) - self.lam * (c * (c - 1)).sum(-1) / 2) / self.temperature

    # ---- enumeration ----------------------------------------------------------
    def _code(self, x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(0, self.size) * self._radix).sum(-1)

    @property
    def n_states(self) -> int:
        return self._all.shape[0]

    @property
    def all_states(self) -> DiscreteStates:
        return self.States(self._all)

    @property
    def terminating_states(self) -> DiscreteStates:
        return self.States(self._term)

    def get_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        return self._index[self._code(x)]

    def get_terminating_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        return self._term_index[self._code(x)]

    def log_partition(self) -> float:
        """log Z in closed form: log [t^size] prod_i sum_c exp(f_i(c)) t^c (float64)."""
        c = torch.arange(self.size + 1, dtype=torch.float64)
        poly = torch.zeros(self.size + 1, dtype=torch.float64)
        poly[0] = 1.0
        for v in self.values.double().cpu().tolist():
            term = ((v * c - self.lam * c * (c - 1) / 2) / self.temperature).exp()
            poly = torch.stack([(poly[: k + 1] * term[: k + 1].flip(0)).sum() for k in range(self.size + 1)])
        return math.log(float(poly[self.size]))

    def true_dist(self) -> torch.Tensor:
        """R(x)/Z over ``terminating_states``, float64 ``(n_terminating_states,)``."""
        return (self._log_reward64(self._term) - self.log_partition()).exp()

    def is_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``(N,)``: full multiset ``x[i]`` has the maximal reward."""
        best = self.log_reward_tensor(self._term).max()
        return self.log_reward_tensor(x) >= best - 1e-5
