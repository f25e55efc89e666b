"""Environments: ``Env`` and ``DiscreteEnv`` (torchgfn-compatible API).

A ``DiscreteEnv`` subclass implements four tensor-level hooks that work on
whole batches at once (this is what makes gfn_dist's sampler fast: no
per-state Python objects are built):

* ``forward_mask(x)``: ``(*B, *state_shape) -> bool (*B, n_actions)``, exit
  (last column) included. The sink state ``sf`` must allow at least one
  action (checked at construction) so that padded rows stay finite.
* ``backward_mask(x)``: ``-> bool (*B, n_actions - 1)``.
* ``step_tensor(x, a)``: ``x (N, *state_shape)``, ``a (N,)`` int64 ``-> (N, *state_shape)``,
  the children of x by valid non-exit actions. The sampler also passes rows
  that exit (``a = n_actions - 1``) or already are sf (any action their mask
  allows); their results are discarded, but it must not raise on them.
* ``backward_step_tensor(x, a)``: same, undoing forward action ``a``
  (backward action ``i`` undoes forward action ``i``).
* ``log_reward_tensor(x)``: ``(N, *state_shape) -> float (N,)``, log R(x).

The public ``step`` / ``backward_step`` wrap these with validation: an
invalid action raises ``ValueError`` naming the offending batch rows.

Enumerable environments also implement ``n_states``, ``all_states``,
``get_states_indices`` and ``terminating_states``; the base class then gives
``true_dist()``, ``log_partition()`` and ``exact_terminating_distribution(pf)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gfn_dist.actions import Actions
from gfn_dist.preprocessors import IdentityPreprocessor, Preprocessor
from gfn_dist.states import DiscreteStates, States


class Env:
    """Base class of all environments (see ``DiscreteEnv``)."""

    is_discrete = False


class DiscreteEnv(Env):
    """A GFlowNet environment with a finite action set.

    Args:
        n_actions: number of forward actions, exit included (exit = ``n_actions - 1``).
        s0: the initial state, tensor of shape ``state_shape``.
        sf: the sink state, tensor of shape ``state_shape``; must differ from s0.
        max_traj_len: the largest number of actions (exit included) of any
            trajectory; the sampler preallocates buffers of this length.
        preprocessor: maps state tensors to network inputs (default identity).
        device: where s0 / sf live and states are created.

    Raises:
        ValueError: if s0 equals sf, or the sink state has no allowed action.
    """

    is_discrete = True

    def __init__(
        self,
        n_actions: int,
        s0: torch.Tensor,
        sf: torch.Tensor,
        max_traj_len: int,
        preprocessor: Preprocessor | None = None,
        device: str | torch.device = "cpu",
    ):
        if n_actions < 2:
            raise ValueError(f"n_actions must be >= 2 (at least one action plus exit), got {n_actions}")
        device = torch.device(device)
        self.device = device
        self.n_actions = int(n_actions)
        self.s0 = s0.to(device)
        self.sf = sf.to(device)
        if torch.equal(self.s0, self.sf):
            raise ValueError("s0 and sf must be different states")
        self.state_shape = tuple(s0.shape)
        self.max_traj_len = int(max_traj_len)
        self.preprocessor = preprocessor or IdentityPreprocessor(output_dim=int(math.prod(self.state_shape)))
        self.exit_action_index = self.n_actions - 1
        self.States = self._make_states_class()
        self.Actions = self._make_actions_class()
        if not bool(self.forward_mask(self.sf.unsqueeze(0)).any()):
            raise ValueError(f"{type(self).__name__}: forward_mask(sf) must allow at least one action")
        self._edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None

    # ---- class factories -----------------------------------------------
    def _make_states_class(self):
        env = self

        class _States(DiscreteStates):
            state_shape = env.state_shape
            s0 = env.s0
            sf = env.sf
            n_actions = env.n_actions
            _forward_mask_fn = staticmethod(env.forward_mask)  # type: ignore[assignment]  # mypy reads the ClassVar callable as a method
            _backward_mask_fn = staticmethod(env.backward_mask)  # type: ignore[assignment]  # mypy reads the ClassVar callable as a method

        _States.__name__ = f"{type(self).__name__}States"
        return _States

    def _make_actions_class(self):
        env = self

        class _Actions(Actions):
            action_shape = (1,)
            dummy_action = torch.tensor([-1], device=env.device)
            exit_action = torch.tensor([env.n_actions - 1], device=env.device)

        _Actions.__name__ = f"{type(self).__name__}Actions"
        return _Actions

    # ---- hooks for subclasses ------------------------------------------
    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ---- public API ------------------------------------------------------
    def reset(self, batch_shape: int | Sequence[int], sink: bool = False) -> DiscreteStates:
        """Initial (or sink) states of the given batch shape."""
        if isinstance(batch_shape, int):
            batch_shape = (batch_shape,)
        maker = self.States.make_sink_states if sink else self.States.make_initial_states
        return maker(batch_shape, device=self.device)

    def states_from_batch_shape(
        self,
        batch_shape: int | Sequence[int],
        random: bool = False,
        sink: bool = False,
        conditions: torch.Tensor | None = None,
    ) -> DiscreteStates:
        """Initial, sink (``sink``) or uniformly random (``random``) states of ``batch_shape``
        (torchgfn's signature).

        Raises:
            ValueError: if both ``random`` and ``sink``, or ``conditions`` are given
                (gfn_dist keeps conditions on the trajectories, not on states).
            NotImplementedError: ``random`` on an environment that cannot enumerate its states.
        """
        if random and sink:
            raise ValueError("states_from_batch_shape: random and sink are exclusive")
        if conditions is not None:
            raise ValueError("states_from_batch_shape: conditions are not stored on states in gfn_dist")
        if not random:
            return self.reset(batch_shape, sink=sink)
        shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        all_x = self.all_states.tensor
        idx = torch.randint(all_x.shape[0], shape, device=all_x.device)
        return self.States(all_x[idx])

    def states_from_tensor(self, tensor: torch.Tensor) -> DiscreteStates:
        return self.States(tensor)

    def actions_from_tensor(self, tensor: torch.Tensor) -> Actions:
        return self.Actions(tensor)

    def log_reward(self, states: States | torch.Tensor) -> torch.Tensor:
        """log R(x), float tensor of shape ``(N,)`` for terminating states ``(N, *state_shape)``."""
        x = states.tensor if isinstance(states, States) else states
        return self.log_reward_tensor(x)

    def reward(self, states: States | torch.Tensor) -> torch.Tensor:
        """R(x) = exp(log R(x)), shape ``(N,)``."""
        return self.log_reward(states).exp()

    @staticmethod
    def _bad_rows(bad: torch.Tensor) -> str:
        rows = torch.nonzero(bad).flatten().tolist()
        shown = rows[:20]
        more = f" (+{len(rows) - 20} more)" if len(rows) > 20 else ""
        return f"{shown}{more}"

    def step(self, states: DiscreteStates, actions: Actions) -> DiscreteStates:
        """One forward step for a batch ``(N,)``; exit leads to sf, dummy keeps sf.

        Raises:
            ValueError: naming the rows whose action is not allowed by the forward mask.
        """
        x = states.tensor
        a = actions.tensor.reshape(-1).long()
        if a.shape[0] != x.shape[0]:
            raise ValueError(f"step: {x.shape[0]} states but {a.shape[0]} actions")
        is_dummy = a == -1
        out_of_range = (a < -1) | (a >= self.n_actions)
        if bool(out_of_range.any()):
            raise ValueError(
                f"invalid action: values out of range [-1, {self.n_actions - 1}] in rows {self._bad_rows(out_of_range)}"
            )
        sink = states.is_sink_state
        if bool((is_dummy & ~sink).any()):
            raise ValueError(
                f"invalid action: dummy action on non-sink states in rows {self._bad_rows(is_dummy & ~sink)}"
            )
        valid = states.forward_masks.gather(-1, a.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        bad = ~is_dummy & (~valid | sink)
        if bool(bad.any()):
            raise ValueError(f"invalid action: not allowed by the forward mask in rows {self._bad_rows(bad)}")
        return self.States(self._step_fast(x, a))

    def _step_fast(
        self, x: torch.Tensor, a: torch.Tensor, to_sink: torch.Tensor | None = None, out=None
    ) -> torch.Tensor:
        """Unchecked forward step, ``a`` of shape ``(N,)`` in ``[-1, n_actions - 1]``.

        Rows where ``to_sink`` (default: exit or dummy action) become sf.
        """
        if to_sink is None:
            to_sink = (a == self.exit_action_index) | (a < 0)
        nxt = self.step_tensor(x, a.clamp(min=0))
        shape = (-1,) + (1,) * len(self.state_shape)
        return torch.where(to_sink.view(shape), self.sf, nxt, out=out)

    def backward_step(self, states: DiscreteStates, actions: Actions) -> DiscreteStates:
        """One backward step for a batch ``(N,)``; actions index ``backward_masks``.

        Raises:
            ValueError: naming the rows whose action is not allowed by the backward mask.
        """
        x = states.tensor
        a = actions.tensor.reshape(-1).long()
        out_of_range = (a < 0) | (a >= self.n_actions - 1)
        if bool(out_of_range.any()):
            raise ValueError(
                f"invalid backward action: values out of range [0, {self.n_actions - 2}] "
                f"in rows {self._bad_rows(out_of_range)}"
            )
        valid = states.backward_masks.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        if bool((~valid).any()):
            raise ValueError(
                f"invalid backward action: not allowed by the backward mask in rows {self._bad_rows(~valid)}"
            )
        return self.States(self.backward_step_tensor(x, a))

    # ---- enumeration (override in enumerable envs) -------------------------
    @property
    def n_states(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} is not enumerable")

    @property
    def all_states(self) -> DiscreteStates:
        raise NotImplementedError(f"{type(self).__name__} is not enumerable")

    @property
    def terminating_states(self) -> DiscreteStates:
        raise NotImplementedError(f"{type(self).__name__} is not enumerable")

    def get_states_indices(self, states: States | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not enumerable")

    def get_terminating_states_indices(self, states: States | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not enumerable")

    @property
    def n_terminating_states(self) -> int:
        return len(self.terminating_states)

    def true_dist(self) -> torch.Tensor:
        """R(x)/Z over ``terminating_states`` (their order), float64 ``(n_terminating_states,)``."""
        lr = self.log_reward(self.terminating_states).double()
        return torch.softmax(lr, dim=0)

    def log_partition(self) -> float:
        """log Z = log Σ_x R(x) over terminating states."""
        return float(torch.logsumexp(self.log_reward(self.terminating_states).double(), dim=0))

    def _dag_edges(self):
        """(parent_idx, child_idx, action) of every non-exit edge, cached."""
        if self._edges is None:
            x = self.all_states.tensor
            S = x.shape[0]
            mask = self.forward_mask(x)[:, :-1]
            parent, action = torch.nonzero(mask, as_tuple=True)
            child_states = self.step_tensor(x[parent], action)
            child = self.get_states_indices(child_states)
            self._edges = (parent, child, action, S)
        return self._edges

    @torch.no_grad()
    def exact_terminating_distribution(self, pf, **policy_kwargs) -> torch.Tensor:
        """The model's exact terminating distribution P_T, aligned with ``true_dist()``.

        Pushes unit flow from s0 through the DAG: the flow F(s) of each state is
        the probability that a trajectory sampled from ``pf`` visits s; iterating
        ``F = e_{s0} + Σ_{s->s'} F(s) P_F(s'|s)`` ``max_traj_len`` times is exact on
        a DAG. Then ``P_T(x) = F(x) P_F(exit | x)``. Vectorized: one forward of
        ``pf`` over all states and one ``index_add`` per DAG depth.

        Args:
            pf: a forward ``DiscretePolicyEstimator`` (anything with
                ``to_probability_distribution`` and a module on states).
            **policy_kwargs: passed to ``to_probability_distribution`` (e.g. temperature).

        Returns:
            float64 tensor of shape ``(n_terminating_states,)``, summing to 1.
        """
        parent, child, action, S = self._dag_edges()
        states = self.all_states
        log_p = pf.log_prob_table(states, **policy_kwargs).double()  # (S, n_actions)
        p_edge = log_p[parent, action].exp()
        s0_idx = self.get_states_indices(self.s0.unsqueeze(0))
        flow = torch.zeros(S, dtype=torch.float64, device=log_p.device)
        flow[s0_idx] = 1.0
        for _ in range(self.max_traj_len):
            new = torch.zeros_like(flow)
            new[s0_idx] = 1.0
            new.index_add_(0, child, flow[parent] * p_edge)
            if torch.equal(new, flow):
                break
            flow = new
        p_exit = log_p[:, -1].exp()
        term_idx = self.get_states_indices(self.terminating_states)
        return flow[term_idx] * p_exit[term_idx]
