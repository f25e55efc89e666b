"""Trajectories: a batch of N trajectories of at most T actions.

Tensor conventions (``../shared/design.md``):

* ``states``: ``(T+1, N, *state_shape)``; row 0 is s0; after the exit action the
  rows are the sink state sf.
* ``actions``: ``(T, N, 1)`` int64; padding is the dummy action -1; exit is
  ``n_actions - 1``.
* ``terminating_idx``: ``(N,)`` int64, number of actions including exit; the
  terminal state of trajectory i is ``states[terminating_idx[i] - 1, i]``.
* ``log_rewards``: ``(N,)`` float, log R(x).
* ``log_probs``: ``(T, N)`` float, padded with 0, the behaviour policy's log P_F
  of each action as sampled (optional).
* ``estimator_outputs``: ``(T, N, n_out)`` raw policy outputs as sampled (optional).

For backward trajectories (``is_backward=True``) row 0 holds the start
(terminal) states, actions index the backward masks and ``terminating_idx`` is
the number of backward actions until s0 (the states after s0 are sf).

On the wire (``to_tensordict``) the layout is batch-major: a
``tensordict.TensorDict`` of batch size ``(N,)`` with ``states (N, T+1, *)``,
``actions (N, T, 1)``, ``terminating_idx``, ``log_rewards`` and, when present,
``log_probs (N, T)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict

from gfn_dist.actions import Actions
from gfn_dist.states import States

REQUIRED_KEYS = ("states", "actions", "terminating_idx", "log_rewards")


def _pad_time(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """Pads (or trims) dim 0 of ``x`` to ``length`` with ``value`` (tensor of x's trailing shape or scalar)."""
    cur = x.shape[0]
    if cur == length:
        return x
    if cur > length:
        return x[:length]
    pad = torch.empty((length - cur, *x.shape[1:]), dtype=x.dtype, device=x.device)
    if isinstance(value, torch.Tensor):
        pad.copy_(value.to(x.device).expand_as(pad))
    else:
        pad.fill_(value)
    return torch.cat([x, pad], dim=0)


class Trajectories:
    """A batch of trajectories in ``env`` (see module doc for the tensor layout).

    Args:
        env: the environment (gives the States / Actions classes, sf and rewards).
        states: ``States`` or tensor ``(T+1, N, *state_shape)``.
        actions: ``Actions`` or int64 tensor ``(T, N, 1)`` (``(T, N)`` is accepted).
        terminating_idx: int64 ``(N,)``.
        log_rewards: float ``(N,)``; computed from the terminal states when None
            (forward trajectories only).
        log_probs: float ``(T, N)`` or None.
        estimator_outputs: ``(T, N, n_out)`` or None.
        is_backward: whether the trajectories were sampled backward.
        conditions: optional ``(N, cond_dim)``.

    Raises:
        ValueError: if the shapes are inconsistent (naming the field).
    """

    def __init__(
        self,
        env,
        states,
        actions,
        terminating_idx: torch.Tensor,
        log_rewards: torch.Tensor | None = None,
        log_probs: torch.Tensor | None = None,
        estimator_outputs: torch.Tensor | None = None,
        is_backward: bool = False,
        conditions: torch.Tensor | None = None,
    ):
        self.env = env
        st = states.tensor if isinstance(states, States) else states
        ac = actions.tensor if isinstance(actions, Actions) else actions
        if ac.dim() == 2:
            ac = ac.unsqueeze(-1)
        T, N = ac.shape[0], ac.shape[1]
        if st.shape[:2] != (T + 1, N):
            raise ValueError(f"states: expected leading shape ({T + 1}, {N}), got {tuple(st.shape)}")
        if tuple(terminating_idx.shape) != (N,):
            raise ValueError(f"terminating_idx: expected shape ({N},), got {tuple(terminating_idx.shape)}")
        if log_probs is not None and tuple(log_probs.shape) != (T, N):
            raise ValueError(f"log_probs: expected shape ({T}, {N}), got {tuple(log_probs.shape)}")
        if log_rewards is not None and tuple(log_rewards.shape) != (N,):
            raise ValueError(f"log_rewards: expected shape ({N},), got {tuple(log_rewards.shape)}")
        self.states_tensor = st
        self.actions_tensor = ac
        self.terminating_idx = terminating_idx
        self._log_rewards = log_rewards
        self.log_probs = log_probs
        self.estimator_outputs = estimator_outputs
        self.is_backward = is_backward
        self.conditions = conditions

    # ---- views -----------------------------------------------------------
    @property
    def states(self) -> States:
        return self.env.States(self.states_tensor)

    @property
    def actions(self) -> Actions:
        return self.env.Actions(self.actions_tensor)

    @property
    def n_trajectories(self) -> int:
        return self.actions_tensor.shape[1]

    def __len__(self) -> int:
        return self.n_trajectories

    @property
    def max_length(self) -> int:
        """T, the time dimension of ``actions``."""
        return self.actions_tensor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.states_tensor.device

    @property
    def terminating_states(self) -> States:
        """The last state before exit (forward) / the start state (backward), ``(N, *state_shape)``."""
        if self.is_backward:
            return self.env.States(self.states_tensor[0])
        idx = (self.terminating_idx - 1).clamp(min=0)
        n = torch.arange(self.n_trajectories, device=self.device)
        return self.env.States(self.states_tensor[idx, n])

    @property
    def log_rewards(self) -> torch.Tensor:
        """log R(x) of each trajectory, ``(N,)``; computed from the env on first use."""
        if self._log_rewards is None:
            self._log_rewards = self.env.log_reward(self.terminating_states)
        return self._log_rewards

    @log_rewards.setter
    def log_rewards(self, value: torch.Tensor | None) -> None:
        self._log_rewards = value

    def __repr__(self) -> str:
        return f"Trajectories(n={self.n_trajectories}, max_length={self.max_length}, backward={self.is_backward})"

    # ---- selection and concatenation ---------------------------------------
    def __getitem__(self, index) -> Trajectories:
        """Selects trajectories (int, slice, index or bool tensor); trims T to the selection."""
        if isinstance(index, int):
            index = [index]
        ti = self.terminating_idx[index]
        T = int(ti.max()) if ti.numel() > 0 else 0
        lp = None if self.log_probs is None else self.log_probs[:T, index]
        eo = None if self.estimator_outputs is None else self.estimator_outputs[:T, index]
        lr = None if self._log_rewards is None else self._log_rewards[index]
        cond = None if self.conditions is None else self.conditions[index]
        return Trajectories(
            self.env,
            self.states_tensor[: T + 1, index],
            self.actions_tensor[:T, index],
            ti,
            lr,
            lp,
            eo,
            self.is_backward,
            cond,
        )

    def extend(self, other: Trajectories) -> None:
        """Appends ``other`` in place, padding both to the longer T."""
        if other.is_backward != self.is_backward:
            raise ValueError("extend: cannot mix forward and backward trajectories")
        T = max(self.max_length, other.max_length)
        pad_state = self.env.sf
        self.states_tensor = torch.cat(
            [_pad_time(self.states_tensor, T + 1, pad_state), _pad_time(other.states_tensor, T + 1, pad_state)], dim=1
        )
        self.actions_tensor = torch.cat(
            [_pad_time(self.actions_tensor, T, -1), _pad_time(other.actions_tensor, T, -1)], dim=1
        )
        self.terminating_idx = torch.cat([self.terminating_idx, other.terminating_idx])
        if self._log_rewards is not None or other._log_rewards is not None:
            self._log_rewards = torch.cat([self.log_rewards, other.log_rewards])
        if self.log_probs is not None and other.log_probs is not None:
            self.log_probs = torch.cat([_pad_time(self.log_probs, T, 0.0), _pad_time(other.log_probs, T, 0.0)], dim=1)
        else:
            self.log_probs = None
        if self.estimator_outputs is not None and other.estimator_outputs is not None:
            self.estimator_outputs = torch.cat(
                [_pad_time(self.estimator_outputs, T, 0.0), _pad_time(other.estimator_outputs, T, 0.0)], dim=1
            )
        else:
            self.estimator_outputs = None
        if self.conditions is not None and other.conditions is not None:
            self.conditions = torch.cat([self.conditions, other.conditions])
        else:
            self.conditions = None

    @classmethod
    def cat(cls, trajectories: Sequence[Trajectories]) -> Trajectories:
        """A new batch holding all of ``trajectories`` in order."""
        first = trajectories[0]
        out = first[torch.arange(first.n_trajectories, device=first.device)]
        for t in trajectories[1:]:
            out.extend(t)
        return out

    # ---- wire format --------------------------------------------------------
    def batch_fields(self, max_length: int | None = None, log_probs: bool = True) -> dict[str, torch.Tensor]:
        """The fields of ``to_tensordict`` as a plain dict of tensors (no TensorDict built).

        Args:
            max_length: time length to pad (or trim) to; default T.
            log_probs: include ``log_probs`` when present.

        Raises:
            ValueError: if ``max_length`` is shorter than a trajectory.
        """
        T = self.max_length if max_length is None else int(max_length)
        if self.max_length > T and bool((self.terminating_idx > T).any()):
            raise ValueError(f"to_tensordict: max_length={T} is shorter than a trajectory")
        fields = {
            "states": _pad_time(self.states_tensor, T + 1, self.env.sf).transpose(0, 1),
            "actions": _pad_time(self.actions_tensor, T, -1).transpose(0, 1),
            "terminating_idx": self.terminating_idx,
            "log_rewards": self.log_rewards,
        }
        if log_probs and self.log_probs is not None:
            fields["log_probs"] = _pad_time(self.log_probs, T, 0.0).transpose(0, 1)
        return fields

    def to_tensordict(self, max_length: int | None = None) -> TensorDict:
        """Batch-major TensorDict of batch size ``(N,)``, time padded to ``max_length`` (default T).

        Keys: ``states (N, T+1, *state_shape)``, ``actions (N, T, 1)``,
        ``terminating_idx (N,)``, ``log_rewards (N,)``, and ``log_probs (N, T)``
        when present. Estimator outputs and any recurrent carry are never shipped.

        Raises:
            ValueError: if ``max_length`` is shorter than a trajectory.
        """
        return TensorDict(self.batch_fields(max_length), batch_size=[self.n_trajectories], device=self.device)

    @classmethod
    def from_tensordict(cls, env, td: TensorDict, trim: bool = True) -> Trajectories:
        """Inverse of ``to_tensordict``; ``trim`` cuts the time dimension to the longest trajectory.

        Raises:
            ValueError: naming a missing key.
        """
        for k in REQUIRED_KEYS:
            if k not in td.keys():
                raise ValueError(f"from_tensordict: missing key '{k}'")
        ti = td["terminating_idx"]
        T = td["actions"].shape[1]
        if trim and ti.numel() > 0:
            T = int(ti.max())
        states = td["states"][:, : T + 1].transpose(0, 1)
        actions = td["actions"][:, :T].transpose(0, 1)
        log_probs = td["log_probs"][:, :T].transpose(0, 1) if "log_probs" in td.keys() else None
        return cls(env, states, actions, ti, td["log_rewards"], log_probs)
