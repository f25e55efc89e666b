"""A torchgfn 2.4 ``DiscreteEnv`` run by gfn_dist, as it is (torchgfn: an optional dependency).

``TorchgfnEnv`` wraps an instance of a torchgfn ``gfn.env.DiscreteEnv`` subclass and
implements gfn_dist's tensor hooks through the wrapped environment's own code:

* masks: ``forward_masks`` / ``backward_masks`` of its ``States`` class (the sink
  state additionally may always exit, so padded rows keep a finite distribution);
* steps: its ``step`` / ``backward_step`` on the rows where they apply (forward:
  not sf and not exit; backward: neither s0 nor sf), other rows returned unchanged
  (gfn_dist discards them);
* rewards: its ``log_reward``;
* enumeration, when it has ``all_states`` / ``terminating_states`` (e.g. torchgfn's
  ``HyperGrid(store_all_states=True)``): ``n_states``, ``all_states``,
  ``terminating_states``, ``get_states_indices``, ``get_terminating_states_indices``;
  ``true_dist`` / ``log_partition`` / ``exact_terminating_distribution`` follow.

From a config (``builders.build_env``)::

    env:
      name: gfn_dist.compat.torchgfn:TorchgfnEnv
      kwargs:
        env: gfn.gym:HyperGrid
        kwargs: {ndim: 2, height: 8, store_all_states: true}
        preprocessor: one_hot

Each call goes through torchgfn's ``States`` / ``Actions`` objects, so the
wrapped environment samples slower than a native gfn_dist one; its results are
the same.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from gfn_dist.env import DiscreteEnv
from gfn_dist.preprocessors import IdentityPreprocessor, OneHotPreprocessor, Preprocessor
from gfn_dist.states import DiscreteStates


def _torchgfn_env_base():
    try:
        from gfn.env import DiscreteEnv as TorchgfnDiscreteEnv
    except ImportError as err:
        raise ImportError(f"TorchgfnEnv needs torchgfn (pip install 'torchgfn==2.4.1'): {err}") from err
    return TorchgfnDiscreteEnv


def _load(path: str):
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"TorchgfnEnv: env must be an import path 'package.module:ClassName', got {path!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class TorchgfnEnv(DiscreteEnv):
    """gfn_dist's ``DiscreteEnv`` over a torchgfn ``DiscreteEnv`` (module doc).

    Args:
        env: the torchgfn environment: an instance, or the import path
            ``"package.module:ClassName"`` of a ``gfn.env.DiscreteEnv`` subclass.
        kwargs: constructor keyword arguments when ``env`` is a path (``device`` is
            added when the constructor takes it and ``kwargs`` does not set it).
        preprocessor: ``"identity"`` (the flattened state as floats), ``"one_hot"``
            (one-hot of ``get_states_indices``; enumerable envs), or an import path
            of ``factory(env) -> gfn_dist.preprocessors.Preprocessor``.
        max_traj_len: the longest trajectory in actions, exit included; when None,
            found by enumeration (the longest path from s0, plus exit).
        device: where states live (the wrapped env's device when it is an instance).

    Raises:
        ImportError: torchgfn is not installed, or the path does not import.
        ValueError: ``env`` is not a torchgfn ``DiscreteEnv``, an unknown
            preprocessor, or ``max_traj_len`` is None for a non-enumerable env.
    """

    def __init__(
        self,
        env: Any,
        kwargs: dict | None = None,
        preprocessor: str = "identity",
        max_traj_len: int | None = None,
        device: str | torch.device = "cpu",
    ):
        base = _torchgfn_env_base()
        if isinstance(env, str):
            cls = _load(env)
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ValueError(f"TorchgfnEnv: {env} is not a subclass of torchgfn's gfn.env.DiscreteEnv")
            kwargs = dict(kwargs or {})
            if "device" not in kwargs and "device" in inspect.signature(cls).parameters:
                kwargs["device"] = str(device)
            env = cls(**kwargs)
        elif kwargs:
            raise ValueError("TorchgfnEnv: kwargs only apply when env is an import path")
        if not isinstance(env, base):
            raise ValueError(f"TorchgfnEnv: expected a torchgfn gfn.env.DiscreteEnv, got {type(env).__name__}")
        self.inner = env
        self._term_lookup: Any = None  # torch.sort's (values, indices) of the terminating states' indices
        self._exit = env.n_actions - 1
        self._inner_s0, self._inner_sf = env.s0, env.sf
        if max_traj_len is None:
            max_traj_len = self._longest_path() + 1
        super().__init__(env.n_actions, env.s0, env.sf, max_traj_len, None, env.s0.device)
        self.preprocessor = self._make_preprocessor(preprocessor)

    # ---- helpers ------------------------------------------------------------
    def _wrap(self, x: torch.Tensor):
        return self.inner.states_from_tensor(x)

    def _is(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return (x == ref).flatten(x.dim() - len(ref.shape)).all(-1)

    def _make_preprocessor(self, name: str) -> Preprocessor:
        if name == "identity":
            return IdentityPreprocessor(int(self.s0.numel()), state_ndim=len(self.state_shape))
        if name == "one_hot":
            return OneHotPreprocessor(self.n_states, self.get_states_indices)
        if ":" in name:
            return _load(name)(self)
        raise ValueError(f"TorchgfnEnv: preprocessor must be 'identity', 'one_hot' or an import path, got {name!r}")

    def _enumerated(self, name: str) -> torch.Tensor:
        try:
            states = getattr(self.inner, name)
        except (NotImplementedError, AttributeError) as err:
            raise NotImplementedError(f"{type(self.inner).__name__} is not enumerable: {err}") from err
        if states is None:  # e.g. torchgfn's HyperGrid without store_all_states=True
            raise NotImplementedError(f"{type(self.inner).__name__}.{name} is None (not enumerable as constructed)")
        return states.tensor

    def _longest_path(self) -> int:
        """Longest run of non-exit actions from s0, by breadth-first levels over the enumeration."""
        try:
            n = int(self._enumerated("all_states").shape[0])
        except NotImplementedError as err:
            raise ValueError(f"TorchgfnEnv: pass max_traj_len for a non-enumerable env ({err})") from err
        frontier, depth = self._inner_s0.unsqueeze(0), 0
        while depth <= n:
            parent, action = torch.nonzero(self.forward_mask(frontier)[:, :-1], as_tuple=True)
            if parent.numel() == 0:
                return depth
            children = self.step_tensor(frontier[parent], action)
            idx = self.inner.get_states_indices(self._wrap(children))
            _, first = _unique_first(idx)
            frontier, depth = children[first], depth + 1
        raise ValueError("TorchgfnEnv: the state graph has a cycle (a path longer than n_states)")

    # ---- tensor hooks -------------------------------------------------------
    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._wrap(x).forward_masks.clone()
        mask[..., -1] |= self._is(x, self._inner_sf)
        return mask

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:
        return self._wrap(x).backward_masks.clone()

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        rows = ~self._is(x, self._inner_sf) & (a != self._exit)
        out = x.clone()
        if bool(rows.any()):
            acts = self.inner.actions_from_tensor(a[rows].unsqueeze(-1))
            out[rows] = self.inner.step(self._wrap(x[rows]), acts).tensor.to(x.dtype)
        return out

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        rows = ~self._is(x, self._inner_sf) & ~self._is(x, self._inner_s0)
        out = x.clone()
        if bool(rows.any()):
            acts = self.inner.actions_from_tensor(a[rows].unsqueeze(-1))
            out[rows] = self.inner.backward_step(self._wrap(x[rows]), acts).tensor.to(x.dtype)
        return out

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.log_reward(self._wrap(x))

    # ---- enumeration ----------------------------------------------------------
    @property
    def n_states(self) -> int:
        return int(self._enumerated("all_states").shape[0])

    @property
    def all_states(self) -> DiscreteStates:
        return self.States(self._enumerated("all_states"))

    @property
    def terminating_states(self) -> DiscreteStates:
        return self.States(self._enumerated("terminating_states"))

    def get_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        return self.inner.get_states_indices(self._wrap(x))

    def get_terminating_states_indices(self, states) -> torch.Tensor:
        """The wrapped env's, or (when it has none) positions in ``terminating_states`` found
        through ``get_states_indices``."""
        x = states.tensor if hasattr(states, "tensor") else states
        try:
            return self.inner.get_terminating_states_indices(self._wrap(x))
        except NotImplementedError:
            pass
        if getattr(self, "_term_lookup", None) is None:
            idx = self.get_states_indices(self._enumerated("terminating_states"))
            self._term_lookup = torch.sort(idx)
        sorted_idx, order = self._term_lookup
        pos = torch.searchsorted(sorted_idx, self.get_states_indices(x)).clamp(max=sorted_idx.numel() - 1)
        return order[pos]


def _unique_first(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of ``idx (N,)`` and the position of each one's first occurrence."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    first = torch.full_like(uniq, idx.numel()).scatter_reduce(0, inverse, torch.arange(idx.numel()), reduce="amin")
    return uniq, first
