"""Trajectory surgery used by local search: reversing backward trajectories and splicing.

Shape legend: N = trajectories, T = time (actions), S = ``state_shape``.

* ``reverse_backward_trajectories``: backward samples (terminal -> s0) read as
  forward trajectories (s0 -> terminal -> sf).
* ``splice_trajectories``: ``prefix[:n_prev] + suffix`` per trajectory, vectorized
  with gather over time (``splice_trajectories_loop`` is the per-trajectory reference).
* ``check_forward_trajectories``: replays actions with ``env.step`` from s0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gfn_dist.containers.trajectories import Trajectories, _pad_time


def _gather_time(x: torch.Tensor, idx_TN: torch.Tensor) -> torch.Tensor:
    """``out[t, n] = x[idx_TN[t, n], n]`` for ``x (T', N, *)``; returns ``(T, N, *)``."""
    n_idx = torch.arange(x.shape[1], device=x.device).expand_as(idx_TN)
    return x[idx_TN, n_idx]


def _bcast(mask_TN: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a ``(T, N)`` mask to broadcast against ``like (T, N, *)``."""
    return mask_TN.view(*mask_TN.shape, *([1] * (like.dim() - 2)))


def reverse_backward_trajectories(env, bwd: Trajectories) -> tuple[Trajectories, torch.Tensor]:
    """Reads backward trajectories forward (vectorized over trajectories).

    Backward row ``k`` (state after k backward steps from x) becomes forward
    row ``L - k``; backward action ``L - 1 - t`` becomes forward action ``t``
    (backward action i undoes forward action i); the exit action is appended.

    Args:
        env: the environment.
        bwd: backward trajectories from terminal states to s0 (``is_backward``),
            with sampled ``log_probs (Tb, N)`` of P_B.

    Returns:
        ``(fwd, log_pb_TN)``: forward ``Trajectories`` with ``T = Tb + 1`` and
        ``terminating_idx = L + 1``, and float ``(T, N)``, log P_B of each forward
        transition (0 on exit and padding), aligned like ``get_trajectory_pbs``.
    """
    L = bwd.terminating_idx
    Tb, N = bwd.actions_tensor.shape[0], bwd.n_trajectories
    T = Tb + 1
    dev = bwd.device
    t_s = torch.arange(T + 1, device=dev).unsqueeze(1)  # (T+1, 1)
    src_s = L.unsqueeze(0) - t_s  # (T+1, N)
    states = _gather_time(bwd.states_tensor, src_s.clamp(0, Tb))
    pad_s = src_s < 0
    states = torch.where(_bcast(pad_s, states), env.sf, states)
    t_a = t_s[:-1]
    src_a = L.unsqueeze(0) - 1 - t_a  # (T, N)
    valid_a = src_a >= 0
    src_c = src_a.clamp(0, max(Tb - 1, 0))
    if Tb > 0:
        actions = _gather_time(bwd.actions_tensor[..., 0], src_c)
        lp_b = bwd.log_probs if bwd.log_probs is not None else torch.zeros((Tb, N), device=dev)
        log_pb = _gather_time(lp_b, src_c)
    else:
        actions = torch.zeros((T, N), dtype=torch.long, device=dev)
        log_pb = torch.zeros((T, N), device=dev)
    actions = actions.masked_fill(~valid_a, -1)
    actions = actions.masked_fill(t_a == L.unsqueeze(0), env.n_actions - 1)
    log_pb = log_pb.masked_fill(~valid_a, 0.0)
    fwd = Trajectories(env, states, actions.unsqueeze(-1), L + 1, bwd._log_rewards, None, conditions=bwd.conditions)
    return fwd, log_pb


@dataclass
class Spliced:
    """Result of ``splice_trajectories``.

    Attributes:
        states: ``(T+1, N, *S)``, sf after each trajectory's exit.
        actions: int64 ``(T, N)``, -1 padding.
        terminating_idx: int64 ``(N,)`` = ``n_prev + recon_terminating_idx``.
        fields: per-step tensors ``(T, N, *)`` spliced like the actions, 0 padding.
    """

    states: torch.Tensor
    actions: torch.Tensor
    terminating_idx: torch.Tensor
    fields: list


def splice_trajectories(
    n_prev: torch.Tensor,
    prev_states: torch.Tensor,
    prev_actions: torch.Tensor,
    recon_states: torch.Tensor,
    recon_actions: torch.Tensor,
    recon_terminating_idx: torch.Tensor,
    sf: torch.Tensor,
    prev_fields: Sequence[torch.Tensor] = (),
    recon_fields: Sequence[torch.Tensor] = (),
) -> Spliced:
    """Joins the first ``n_prev[i]`` transitions of prev row i with recon row i (vectorized).

    New time t reads prev at time t while ``t < n_prev`` (states: ``t <= n_prev``)
    and recon at time ``t - n_prev`` after; recon row i must start at
    ``prev_states[n_prev[i], i]`` (the junction). One gather per tensor, no
    loop over trajectories.

    Args:
        n_prev: int64 ``(N,)``, shared prefix lengths, ``0 <= n_prev < Tp + 1``.
        prev_states: ``(Tp+1, N, *S)``; prev_actions: int64 ``(Tp, N)``.
        recon_states: ``(Tr+1, N, *S)``; recon_actions: int64 ``(Tr, N)``.
        recon_terminating_idx: int64 ``(N,)``, recon actions including exit.
        sf: the sink state ``S``.
        prev_fields / recon_fields: matching lists of per-step tensors
            ``(Tp, N, *)`` / ``(Tr, N, *)`` (log-probs, estimator outputs).

    Returns:
        ``Spliced`` with ``T = max(n_prev + recon_terminating_idx)``.

    Raises:
        ValueError: if the field lists differ in length.
    """
    if len(prev_fields) != len(recon_fields):
        raise ValueError(f"splice: {len(prev_fields)} prev_fields but {len(recon_fields)} recon_fields")
    Tp, Tr = prev_actions.shape[0], recon_actions.shape[0]
    term = n_prev + recon_terminating_idx
    T = int(term.max()) if term.numel() else 0
    dev = prev_states.device
    t_s = torch.arange(T + 1, device=dev).unsqueeze(1)  # (T+1, 1)
    rel_s = t_s - n_prev.unsqueeze(0)  # (T+1, N)
    p_s = _gather_time(prev_states, t_s.clamp(max=Tp).expand_as(rel_s))
    r_s = _gather_time(recon_states, rel_s.clamp(0, Tr))
    states = torch.where(_bcast(rel_s <= 0, p_s), p_s, r_s)
    states = torch.where(_bcast(rel_s > recon_terminating_idx.unsqueeze(0), states), sf, states)

    t_a = t_s[:-1]
    rel_a = rel_s[:-1]  # (T, N)
    from_prev = rel_a < 0
    from_recon = (rel_a >= 0) & (rel_a < recon_terminating_idx.unsqueeze(0))
    p_idx = t_a.clamp(max=max(Tp - 1, 0)).expand_as(rel_a)
    r_idx = rel_a.clamp(0, max(Tr - 1, 0))

    def splice_step(prev_x: torch.Tensor, recon_x: torch.Tensor, pad) -> torch.Tensor:
        out = torch.full((T, *prev_x.shape[1:]), pad, dtype=prev_x.dtype, device=dev)
        if Tp > 0:
            out = torch.where(_bcast(from_prev, out), _gather_time(prev_x, p_idx), out)
        if Tr > 0:
            out = torch.where(_bcast(from_recon, out), _gather_time(recon_x, r_idx), out)
        return out

    actions = splice_step(prev_actions, recon_actions, -1)
    fields = [splice_step(p, r, 0) for p, r in zip(prev_fields, recon_fields, strict=True)]
    return Spliced(states, actions, term, fields)


def splice_trajectories_loop(
    n_prev: torch.Tensor,
    prev_states: torch.Tensor,
    prev_actions: torch.Tensor,
    recon_states: torch.Tensor,
    recon_actions: torch.Tensor,
    recon_terminating_idx: torch.Tensor,
    sf: torch.Tensor,
    prev_fields: Sequence[torch.Tensor] = (),
    recon_fields: Sequence[torch.Tensor] = (),
) -> Spliced:
    """Per-trajectory reference of ``splice_trajectories`` (same arguments); for tests and ``debug``."""
    N = n_prev.shape[0]
    term = n_prev + recon_terminating_idx
    T = int(term.max()) if N else 0
    states = sf.expand(T + 1, N, *sf.shape).clone()
    actions = torch.full((T, N), -1, dtype=prev_actions.dtype, device=prev_actions.device)
    fields = [torch.zeros((T, N, *p.shape[2:]), dtype=p.dtype, device=p.device) for p in prev_fields]
    for i in range(N):
        n, lr = int(n_prev[i]), int(recon_terminating_idx[i])
        s = torch.cat([prev_states[: n + 1, i], recon_states[1 : lr + 1, i]])
        states[: s.shape[0], i] = s
        actions[: n + lr, i] = torch.cat([prev_actions[:n, i], recon_actions[:lr, i]])
        for out, p, r in zip(fields, prev_fields, recon_fields, strict=True):
            out[: n + lr, i] = torch.cat([p[:n, i], r[:lr, i]])
    return Spliced(states, actions, term, fields)


def check_forward_trajectories(env, trajectories: Trajectories, atol: float = 1e-5) -> None:
    """Replays each trajectory's actions from s0 and checks states, padding and log-rewards.

    Raises:
        ValueError: naming the first inconsistent field and trajectories.
    """
    st, ac = trajectories.states_tensor, trajectories.actions_tensor[..., 0]
    T, N = ac.shape
    term = trajectories.terminating_idx
    if not bool(env.States(st[0]).is_initial_state.all()):
        raise ValueError("trajectories: row 0 is not s0")
    t = torch.arange(T, device=st.device).unsqueeze(1)
    live = t < term.unsqueeze(0)
    if bool(((ac >= 0) != live).any()):
        raise ValueError("trajectories: actions are not -1 exactly after terminating_idx")
    n_idx = torch.arange(N, device=st.device)
    if bool((ac[term - 1, n_idx] != env.n_actions - 1).any()):
        raise ValueError("trajectories: last action is not exit")
    for k in range(T):
        a = ac[k]
        m = env.States(st[k]).forward_masks.gather(-1, a.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if bool((live[k] & ~m).any()):
            raise ValueError(f"trajectories: action outside the forward mask at step {k}")
        nxt = env._step_fast(st[k], a)
        if not torch.equal(nxt, st[k + 1]):
            raise ValueError(f"trajectories: states[{k + 1}] is not env.step(states[{k}], actions[{k}])")
    lr = env.log_reward(st[term - 1, n_idx])
    if not torch.allclose(lr, trajectories.log_rewards, atol=atol):
        raise ValueError("trajectories: log_rewards differ from env.log_reward of the terminal states")


def _merge_rows(env, updated: torch.Tensor, new: Trajectories, old: Trajectories) -> Trajectories:
    """Row i from ``new`` where ``updated[i]`` else from ``old``; time padded, then trimmed."""
    term = torch.where(updated, new.terminating_idx, old.terminating_idx)
    T = int(term.max()) if term.numel() else 0
    Tm = max(new.max_length, old.max_length)

    def pick(a: torch.Tensor | None, b: torch.Tensor | None, length: int, pad):
        if a is None or b is None:
            return None
        a, b = _pad_time(a, length, pad), _pad_time(b, length, pad)
        return torch.where(_bcast(updated.unsqueeze(0).expand(length, -1), a), a, b)

    states = pick(new.states_tensor, old.states_tensor, Tm + 1, env.sf)[: T + 1]
    actions = pick(new.actions_tensor, old.actions_tensor, Tm, -1)[:T]
    log_probs = pick(new.log_probs, old.log_probs, Tm, 0.0)
    est_out = pick(new.estimator_outputs, old.estimator_outputs, Tm, 0.0)
    return Trajectories(
        env, states, actions, term, torch.where(updated, new.log_rewards, old.log_rewards),
        None if log_probs is None else log_probs[:T], None if est_out is None else est_out[:T],
        is_backward=False, conditions=old.conditions,
    )  # fmt: skip
