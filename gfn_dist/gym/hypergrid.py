"""HyperGrid environment (Bengio et al. 2021, arXiv:2106.04399; torchgfn's "original" reward).

States are integer coordinates ``x in {0..H-1}^D``, int64 tensors of shape ``(D,)``;
s0 = 0, sf = -1. Action ``d < D`` increments coordinate d; action ``D`` is exit
(allowed everywhere). Backward action d decrements coordinate d.

Reward ("original"), with ``a_d = |x_d / (H-1) - 0.5|``::

    R(x) = R0 + R1 * prod_d [a_d > 0.25] + R2 * prod_d [0.3 < a_d < 0.4]
"""

from __future__ import annotations

import math

import torch

from gfn_dist.env import DiscreteEnv
from gfn_dist.preprocessors import KHotPreprocessor, Preprocessor
from gfn_dist.states import DiscreteStates


class HyperGrid(DiscreteEnv):
    """D-dimensional grid of side H.

    Takes the seeds' spelling (``R0, R1, R2``) and, as keywords, torchgfn 2.4.1's
    (``reward_fn_str="original"``, ``reward_fn_kwargs={"R0": ..}``, ...).

    Args:
        ndim: D, number of dimensions (>= 1).
        height: H, side length (>= 2).
        R0, R1, R2: reward constants of the "original" reward (R0 > 0).
        preprocessor: network input map; default ``KHotPreprocessor(H, D)``.
        device: device of states.
        reward_fn_str: torchgfn's reward name; only ``"original"`` is implemented.
        reward_fn_kwargs: torchgfn's reward constants ``{"R0", "R1", "R2"}``; override R0..R2.
        calculate_partition, store_all_states, debug, mode_stats, mode_stats_samples:
            accepted for torchgfn compatibility; gfn_dist enumerates states lazily,
            always checks its inputs and counts modes exactly, so they change nothing.
        validate_modes: raise if no state reaches the mode reward R0 + R1 + R2.

    Raises:
        TypeError: if R0 is a str (torchgfn's third positional argument is ``reward_fn_str``:
            pass it by keyword).
        ValueError: on ndim < 1, height < 2, R0 <= 0 (log R would be -inf), an unknown
            reward or reward constant, or (``validate_modes``) a grid without modes.
    """

    def __init__(
        self,
        ndim: int = 2,
        height: int = 8,
        R0: float = 0.1,
        R1: float = 0.5,
        R2: float = 2.0,
        preprocessor: Preprocessor | None = None,
        device: str | torch.device = "cpu",
        *,
        reward_fn_str: str = "original",
        reward_fn_kwargs: dict | None = None,
        calculate_partition: bool = False,
        store_all_states: bool = False,
        debug: bool = False,
        validate_modes: bool = False,
        mode_stats: str = "none",
        mode_stats_samples: int = 20000,
    ):
        if isinstance(R0, str):
            raise TypeError(f"HyperGrid: R0 must be a number, got {R0!r}; pass torchgfn's reward_fn_str= as a keyword")
        if reward_fn_str != "original":
            raise ValueError(
                f"HyperGrid: reward_fn_str must be 'original' (the only reward implemented), got {reward_fn_str!r}"
            )
        unknown = sorted(set(reward_fn_kwargs or {}) - {"R0", "R1", "R2"})
        if unknown:
            raise ValueError(f"HyperGrid: reward_fn_kwargs: unknown keys {unknown} (expected R0, R1, R2)")
        R0, R1, R2 = (float((reward_fn_kwargs or {}).get(k, v)) for k, v in (("R0", R0), ("R1", R1), ("R2", R2)))
        if ndim < 1:
            raise ValueError(f"HyperGrid: ndim must be >= 1, got {ndim}")
        if height < 2:
            raise ValueError(f"HyperGrid: height must be >= 2, got {height}")
        if R0 <= 0:
            raise ValueError(f"HyperGrid: R0 must be > 0, got {R0}")
        self.ndim, self.height = int(ndim), int(height)
        self.R0, self.R1, self.R2 = float(R0), float(R1), float(R2)
        self._unit_steps = torch.cat([torch.eye(ndim, dtype=torch.long), torch.zeros(1, ndim, dtype=torch.long)]).to(
            device
        )
        s0 = torch.zeros(ndim, dtype=torch.long)
        sf = torch.full((ndim,), -1, dtype=torch.long)
        super().__init__(
            n_actions=ndim + 1,
            s0=s0,
            sf=sf,
            max_traj_len=ndim * (height - 1) + 1,
            preprocessor=preprocessor or KHotPreprocessor(height, ndim),
            device=device,
        )
        self._powers = self.height ** torch.arange(ndim - 1, -1, -1, device=self.device)
        self._all_states: DiscreteStates | None = None
        self._log_reward_table: torch.Tensor | None = None
        self.reward_fn_kwargs = {"R0": self.R0, "R1": self.R1, "R2": self.R2}
        if validate_modes and self.n_modes == 0:
            raise ValueError(f"HyperGrid: no state has the mode reward R0 + R1 + R2 (ndim={ndim}, height={height})")

    # ---- tensor hooks ------------------------------------------------------
    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        # Exit is always allowed: x padded with a -1 column, then one compare. (Padding the
        # boolean result instead hits an inductor C++ codegen error on CPU, torch 2.13.)
        return torch.nn.functional.pad(x, (0, 1), value=-1) < self.height - 1

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x > 0

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # Row a of the table is the unit vector of coordinate a; the exit row is zero
        # (the row is unchanged, and replaced by sf).
        return x + self._unit_steps[a]

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x.scatter_add(-1, a.unsqueeze(-1), -torch.ones_like(a).unsqueeze(-1))

    #: Grids up to this many states look log-rewards up in a table (3 kernels instead of ~12).
    max_states_for_reward_table: int = 1 << 20

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """log R(x) for grid coordinates ``x (*B, D)`` (int64), float ``(*B,)``."""
        if self.n_states <= self.max_states_for_reward_table:
            table = self._log_reward_table
            if table is None or table.device != x.device:
                table = self._log_reward_table = self._log_reward_formula(self.all_states.tensor).to(x.device)
            return table[self.get_states_indices(x)]
        return self._log_reward_formula(x)

    def _log_reward_formula(self, x: torch.Tensor) -> torch.Tensor:
        ax = (x.float() / (self.height - 1) - 0.5).abs()
        r = self.R0 + self.R1 * (ax > 0.25).all(-1).float() + self.R2 * ((ax > 0.3) & (ax < 0.4)).all(-1).float()
        return r.log()

    # ---- enumeration ---------------------------------------------------------
    @property
    def n_states(self) -> int:
        return self.height**self.ndim

    @property
    def all_states(self) -> DiscreteStates:
        """All H^D states in row-major order (index = Σ_d x_d H^(D-1-d))."""
        if self._all_states is None:
            idx = torch.arange(self.n_states, device=self.device)
            x = (idx.unsqueeze(-1) // self._powers) % self.height
            self._all_states = self.States(x)
        return self._all_states

    @property
    def terminating_states(self) -> DiscreteStates:
        return self.all_states

    def get_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        return (x * self._powers).sum(-1)

    def get_terminating_states_indices(self, states) -> torch.Tensor:
        return self.get_states_indices(states)

    @property
    def max_log_reward(self) -> float:
        return math.log(self.R0 + self.R1 + self.R2)

    def mode_mask(self, states=None) -> torch.Tensor:
        """Bool ``(N,)``: the state has the maximal reward R0 + R1 + R2 (a mode)."""
        states = self.terminating_states if states is None else states
        return self.log_reward(states) >= self.max_log_reward - 1e-6

    @property
    def n_modes(self) -> int:
        """Number of mode states (exact)."""
        return int(self.mode_mask().sum())

    def modes_found(self, states) -> set[int]:
        """State indices (``get_states_indices``) of the modes among ``states`` ``(N,)``."""
        mask = self.mode_mask(states)
        return set(self.get_states_indices(states)[mask].tolist())
