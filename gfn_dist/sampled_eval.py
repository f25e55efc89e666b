"""Sampled evaluation, for every environment (enumerable or not): pure functions of a policy.

``sampled_metrics(env, pf, pb, num_samples, top_k)`` draws ``num_samples``
trajectories from P_F (no exploration) and reports:

* ``eval/log_reward_mean``, ``eval/reward_mean``: mean log R(x) and R(x) over samples;
* ``eval/reward_top{k}_mean``: mean R of the k best *distinct* terminal states sampled
  (fewer when fewer are distinct);
* ``eval/num_unique``: distinct terminal states among the samples;
* ``eval/logZ_elbo``: mean of ``log R(x) + Σ log P_B(τ) − Σ log P_F(τ)``, an unbiased
  estimate of the evidence lower bound of log Z (Jensen:
  ``E_{P_F}[log(R P_B / P_F)] <= log E_{P_F}[R P_B / P_F] = log Z``), tight iff P_F
  samples R / Z and P_B matches it (trajectory balance, arXiv:2201.13259);
* with a learned ``log_z``: ``eval/logZ_elbo_gap = logZ − logZ_elbo``;
* with a ``ModesTracker``: ``eval/modes_found``, the cumulative count.

``ModesTracker`` counts the distinct modes found among all terminal states it is
fed (e.g. every batch the actors produced): through ``env.mode_hits(x)`` (bool
``(N, n_modes)``: which of a fixed set of modes each x finds, e.g. BitSequence
within a Hamming radius, arXiv:2201.13259 Sec. 5.3) when the environment has it,
else distinct x with ``env.is_mode(x)`` (bool ``(N,)``) or ``env.mode_mask(States)``.
It is a ``Stateful`` (``state_dict`` / ``load_state_dict``) for checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gfn_dist.gflownet.base import get_trajectory_pbs, get_trajectory_pfs
from gfn_dist.samplers import Sampler


class ModesTracker:
    """Cumulative distinct modes among the terminal states fed to ``update`` (module doc).

    Args:
        env: the environment; ``supported`` says whether it defines modes.
    """

    def __init__(self, env):
        self.env = env
        self._hits = getattr(env, "mode_hits", None)
        self._found_mask: torch.Tensor | None = None  # bool (n_modes,), with mode_hits
        self._found_states = torch.empty((0, *env.state_shape), dtype=env.s0.dtype)  # without: distinct modes

    @staticmethod
    def supported(env) -> bool:
        """Whether ``env`` defines ``mode_hits``, ``is_mode`` or ``mode_mask``."""
        return any(callable(getattr(env, name, None)) for name in ("mode_hits", "is_mode", "mode_mask"))

    def _is_mode(self, x: torch.Tensor) -> torch.Tensor:
        if callable(getattr(self.env, "is_mode", None)):
            return self.env.is_mode(x)
        return self.env.mode_mask(self.env.States(x))

    @torch.no_grad()
    def update(self, states: torch.Tensor) -> int:
        """Adds terminal states ``(N, *state_shape)`` (a tensor or ``States``, on any device); returns ``num_found``.

        Raises:
            ValueError: if the environment defines no modes (``supported`` is False).
        """
        if not self.supported(self.env):
            raise ValueError(f"ModesTracker: {type(self.env).__name__} defines no mode_hits / is_mode / mode_mask")
        x = states.tensor if hasattr(states, "tensor") else states
        if x.shape[0] == 0:
            return self.num_found
        # The learner feeds replay batches, which arrive on the CPU; the env's tables (HyperGrid's
        # powers, BitSequence's modes) live on its device, e.g. a CUDA learner's.
        x = x.to(self.env.device)
        if self._hits is not None:
            hit = self._hits(x).any(0).cpu()
            self._found_mask = hit if self._found_mask is None else self._found_mask | hit
        else:
            new = x[self._is_mode(x)].cpu()
            if new.shape[0]:
                both = torch.cat([self._found_states, new.to(self._found_states.dtype)])
                self._found_states = torch.unique(both.flatten(1), dim=0).view(-1, *self.env.state_shape)
        return self.num_found

    @property
    def num_found(self) -> int:
        """Distinct modes found so far."""
        if self._hits is not None:
            return 0 if self._found_mask is None else int(self._found_mask.sum())
        return int(self._found_states.shape[0])

    def metrics(self) -> dict:
        """``{"eval/modes_found": num_found}``, or ``{}`` for an environment without modes."""
        return {"eval/modes_found": self.num_found} if self.supported(self.env) else {}

    def state_dict(self) -> dict:
        return {"found_mask": self._found_mask, "found_states": self._found_states}

    def load_state_dict(self, state: dict) -> None:
        self._found_mask = state.get("found_mask")
        self._found_states = state["found_states"]


@torch.no_grad()
def sample_for_eval(env, pf, pb, num_samples: int, batch_size: int = 4096):
    """``num_samples`` on-policy trajectories' terminal states and log-weights.

    Returns:
        ``(states (n, *state_shape), log_rewards float (n,), log_pf float64 (n,), log_pb float64 (n,))``
        with ``log_pf = Σ_t log P_F`` and ``log_pb = Σ_t log P_B`` of each trajectory
        (``pb=None``: P_B = 1, a tree DAG).
    """
    sampler = Sampler(pf)
    out: tuple[list, list, list, list] = ([], [], [], [])
    left = int(num_samples)
    while left > 0:
        traj = sampler.sample_trajectories(env, n=min(batch_size, left), save_logprobs=True)
        out[0].append(traj.terminating_states.tensor)
        out[1].append(traj.log_rewards.float())
        out[2].append(get_trajectory_pfs(pf, traj, recalculate_all_logprobs=False).double().sum(0))
        out[3].append(get_trajectory_pbs(pb, traj).double().sum(0))
        left -= len(traj)
    return tuple(torch.cat(parts) for parts in out)


@torch.no_grad()
def sampled_metrics(
    env,
    pf,
    pb,
    num_samples: int,
    top_k: int = 100,
    log_z: float | None = None,
    modes: ModesTracker | None = None,
    seed: int | None = None,
    batch_size: int = 4096,
    on_states: Callable[[torch.Tensor], dict] | None = None,
) -> dict:
    """The sampled metrics of the module doc, from ``num_samples`` trajectories of ``pf``.

    Args:
        env: any ``DiscreteEnv``.
        pf: the forward policy estimator (vectorized or recurrent).
        pb: the backward policy estimator, or None (P_B = 1 on a tree DAG).
        num_samples: trajectories to draw (> 0).
        top_k: k of ``eval/reward_top{k}_mean``.
        log_z: the learned logZ, if any (adds ``eval/logZ_elbo_gap``).
        modes: a ``ModesTracker`` to feed these samples to (adds ``eval/modes_found``).
        seed: when set, sample from a forked RNG seeded with it (the global RNG is
            left as it was); when None, from the global RNG.
        batch_size: trajectories per sampler call.
        on_states: optional ``(terminal states (n, *state_shape)) -> dict``: task-specific metrics of
            the same samples (e.g. a molecule environment's), merged into the result.

    Returns:
        ``{name: float | int}`` (module doc).

    Raises:
        ValueError: if ``num_samples < 1`` or ``top_k < 1``.
    """
    if num_samples < 1 or top_k < 1:
        raise ValueError(f"sampled_metrics: num_samples and top_k must be >= 1, got {num_samples}, {top_k}")
    if seed is None:
        states, log_r, log_pf, log_pb = sample_for_eval(env, pf, pb, num_samples, batch_size)
    else:
        devices = [env.device] if env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            states, log_r, log_pf, log_pb = sample_for_eval(env, pf, pb, num_samples, batch_size)
    log_r64 = log_r.double()
    uniq, inverse = torch.unique(states.flatten(1), dim=0, return_inverse=True)
    uniq_log_r = torch.full((uniq.shape[0],), -math.inf, dtype=torch.float64, device=log_r.device)
    uniq_log_r.scatter_reduce_(0, inverse, log_r64, reduce="amax")
    top = uniq_log_r.topk(min(top_k, uniq.shape[0])).values
    elbo = float((log_r64 + log_pb - log_pf).mean())
    out = {
        "eval/log_reward_mean": float(log_r64.mean()),
        "eval/reward_mean": float(log_r64.exp().mean()),
        f"eval/reward_top{top_k}_mean": float(top.exp().mean()),
        "eval/num_unique": int(uniq.shape[0]),
        "eval/logZ_elbo": elbo,
    }
    if log_z is not None:
        out["eval/logZ_elbo_gap"] = float(log_z) - elbo
    if modes is not None and ModesTracker.supported(env):
        modes.update(states)
        out.update(modes.metrics())
    if on_states is not None:
        out.update(on_states(states))
    return out
