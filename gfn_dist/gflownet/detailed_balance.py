"""Detailed balance losses, per transition of stored trajectories.

* ``DBGFlowNet``: Bengio et al. 2021/2023, "GFlowNet Foundations",
  arXiv:2111.09266, Sec. 3.2 (detailed balance with a learned state flow F). For a
  transition s -> s' by action a, the residual is
  ``log F(s) + log P_F(a | s) - log F(s') - log P_B(s | s')``; for the exit
  transition x -> sf the target flow is the reward: ``log F(x) + log P_F(exit | x) -
  log R(x)``.
* ``ModifiedDBGFlowNet``: Deleu et al. 2022, "Bayesian Structure Learning with
  Generative Flow Networks", arXiv:2202.13903, Sec. 3.2, for environments where every
  state can exit (is terminating): no state flow; for each non-exit transition
  ``log R(s) + log P_F(s' | s) + log P_F(exit | s') - log R(s') - log P_B(s | s') -
  log P_F(exit | s)``.

Both work on gfn_dist's ``Trajectories`` directly (torchgfn converts them to
``Transitions`` first; here ``to_training_samples`` is the identity). Per-transition
outputs (``get_scores``, ``reduction="none"``) are in torchgfn's transition order:
time-major over the valid (non-padding) ``(t, n)`` entries.

Global batch: the loss is the mean over all transitions of the batch. Across ranks
(``distributed_loss``) each rank returns ``mean_n(Σ_transitions of n loss) /
batch_mean(transitions per trajectory)``: averaged over ranks, that is the mean over
the transitions of the global batch, whatever the ranks' trajectory lengths.

Shape legend: T = max trajectory length (actions), N = trajectories, M = valid
transitions, K = non-exit transitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.gflownet.base import TrajectoryBasedGFlowNet, get_trajectory_pbs, reduce_loss
from gfn_dist.policy import ScalarEstimator


def check_forward(trajectories, owner: str) -> Trajectories:
    """``trajectories`` if they are forward ``Trajectories``.

    Raises:
        TypeError: if they are not ``Trajectories``.
        ValueError: if they are backward trajectories.
    """
    if not isinstance(trajectories, Trajectories):
        raise TypeError(f"{owner}: expected gfn_dist Trajectories, got {type(trajectories).__name__}")
    if trajectories.is_backward:
        raise ValueError(f"{owner}: expected forward trajectories, got backward ones")
    return trajectories


def state_values_TN(fn, trajectories: Trajectories, valid_TN: torch.Tensor) -> torch.Tensor:
    """``fn(states)`` of the valid source states ``states[t, n]`` (``valid_TN`` ``(T, N)``),
    as ``(T + 1, N)`` float with 0 elsewhere (row T and padding). One call of ``fn`` on M states."""
    T, N = valid_TN.shape
    x_M = trajectories.states_tensor[:-1][valid_TN]
    v_M = fn(x_M)
    out = v_M.new_zeros((T + 1, N))
    out[:-1][valid_TN] = v_M
    return out


def per_trajectory_sums(values_TN: torch.Tensor, mask_TN: torch.Tensor) -> torch.Tensor:
    """``Σ_t values[t, n]`` over ``mask``, float ``(N,)``."""
    return torch.where(mask_TN, values_TN, torch.zeros_like(values_TN)).sum(0)


def transition_mean(loss_TN: torch.Tensor, mask_TN: torch.Tensor, batch_mean: Callable) -> torch.Tensor:
    """This rank's share of the global mean over masked transitions (module doc)."""
    count = batch_mean(mask_TN.sum(0).to(loss_TN.dtype))
    return per_trajectory_sums(loss_TN, mask_TN).mean() / count.clamp(min=1e-12)  # no transition: 0


class DBGFlowNet(TrajectoryBasedGFlowNet):
    """Detailed balance (arXiv:2111.09266, Sec. 3.2) with a learned log-state-flow ``logF``.

    Args:
        pf: forward policy estimator.
        pb: backward policy estimator, or None with ``constant_pb=True`` (tree DAG).
        logF: ``ScalarEstimator`` of log F(s), ``(M, 1)`` on states.
        forward_looking: forward-looking DB (Pan et al. 2023, arXiv:2302.01687): flows
            are ``log F(s) + log R(s)`` (edge reward ``R(s') / R(s)``); needs rewards of
            intermediate states.
        constant_pb, log_reward_clip_min, debug, loss_fn: see ``TrajectoryBasedGFlowNet``.

    Raises:
        TypeError: if ``logF`` is not a ``ScalarEstimator``.
        ValueError: if ``pb`` is None without ``constant_pb=True``.
    """

    def __init__(
        self,
        pf: nn.Module,
        pb: nn.Module | None,
        logF: ScalarEstimator,
        forward_looking: bool = False,
        constant_pb: bool = False,
        log_reward_clip_min: float = -math.inf,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if not isinstance(logF, ScalarEstimator):
            raise TypeError(f"DBGFlowNet: logF must be a ScalarEstimator, got {type(logF).__name__}")
        super().__init__(pf, pb, constant_pb, log_reward_clip_min, debug, loss_fn)
        self.logF = logF
        self.forward_looking = bool(forward_looking)

    def logF_parameters(self) -> list[nn.Parameter]:
        """Parameters of the state-flow estimator."""
        return list(self.logF.parameters())

    def _clip(self, lr: torch.Tensor) -> torch.Tensor:
        return lr.clamp(min=self.log_reward_clip_min) if math.isfinite(self.log_reward_clip_min) else lr

    def _scores_TN(
        self, env, trajectories: Trajectories, recalculate_all_logprobs: bool, log_rewards: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals ``(T, N)`` (0 on padding) and the valid mask ``(T, N)``."""
        env = trajectories.env if env is None else env
        log_pf, log_pb = self.get_pfs_and_pbs(trajectories, recalculate_all_logprobs)
        actions_TN = trajectories.actions_tensor[..., 0]
        valid = actions_TN >= 0
        is_exit = actions_TN == env.n_actions - 1

        def log_flow(x: torch.Tensor) -> torch.Tensor:
            f = self.logF(env.States(x)).squeeze(-1)
            return f + self._clip(env.log_reward_tensor(x)) if self.forward_looking else f

        logF_TN = state_values_TN(log_flow, trajectories, valid)
        lr_N = self._terminal_log_rewards(trajectories, log_rewards, valid)
        target_TN = torch.where(is_exit, lr_N.unsqueeze(0), logF_TN[1:])
        scores = log_pf + logF_TN[:-1] - log_pb - target_TN
        return torch.where(valid, scores, torch.zeros_like(scores)), valid

    def _terminal_log_rewards(self, trajectories, log_rewards, valid_TN) -> torch.Tensor:
        """log R(x) ``(N,)``; also from torchgfn's per-transition ``(M,)`` layout (exit entries)."""
        if log_rewards is not None and self.forward_looking:
            raise ValueError(
                "DBGFlowNet: log_rewards cannot be overridden with forward_looking=True "
                "(intermediate flows use env rewards)"
            )
        M = int(valid_TN.sum())
        if log_rewards is not None and log_rewards.shape == (M,) and trajectories.n_trajectories != M:
            full = torch.zeros(valid_TN.shape, dtype=log_rewards.dtype, device=log_rewards.device)
            full[valid_TN] = log_rewards
            log_rewards = full.gather(0, (trajectories.terminating_idx - 1).unsqueeze(0)).squeeze(0)
        if self.forward_looking:
            # Forward-looking: the terminal target is the flow log F(x) + log R(x) -> log R(x) of the exit.
            return self._log_rewards(trajectories, None)
        return self._log_rewards(trajectories, log_rewards)

    def get_scores(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DB residuals of every transition, float ``(M,)`` (time-major, torchgfn's order).

        Args:
            env: the environment (default: the trajectories').
            trajectories: forward trajectories.
            recalculate_all_logprobs: recompute log P_F (else reuse saved log-probs).
            log_rewards: optional ``(N,)`` (or torchgfn's ``(M,)``, read at the exits) log-rewards.

        Raises:
            TypeError / ValueError: on backward or non-``Trajectories`` input, bad
                ``log_rewards`` shape, or actions outside a policy's mask.
        """
        trajectories = check_forward(trajectories, "DBGFlowNet")
        scores, valid = self._scores_TN(env, trajectories, recalculate_all_logprobs, log_rewards)
        return scores[valid]

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DB loss: ``loss_fn`` of the residuals, mean / sum over transitions or ``(M,)`` (``none``)."""
        return reduce_loss(
            self.loss_fn(self.get_scores(env, trajectories, recalculate_all_logprobs, log_rewards=log_rewards)),
            reduction,
        )

    def distributed_loss(self, env, trajectories: Trajectories, batch_mean: Callable) -> torch.Tensor:
        """This rank's share of the global-batch mean over transitions (module doc)."""
        scores, valid = self._scores_TN(env, check_forward(trajectories, "DBGFlowNet"), True, None)
        return transition_mean(self.loss_fn(scores), valid, batch_mean)


class ModifiedDBGFlowNet(TrajectoryBasedGFlowNet):
    """Modified detailed balance (arXiv:2202.13903, Sec. 3.2): every state is terminating.

    Needs ``log R(s)`` of every visited state, which the loss computes with
    ``env.log_reward_tensor`` (on learners, unlike the other losses).

    Args:
        pf: forward policy estimator (feed-forward: it is evaluated at s and s').
        pb: backward policy estimator, or None with ``constant_pb=True``.
        constant_pb: P_B = 1 (tree DAG).
        debug: see ``TrajectoryBasedGFlowNet``.
        loss_fn: default ``SquaredLoss()``; log_reward_clip_min: clamps log R from below
            (gfn_dist additions, keyword only).

    Raises:
        ValueError: if ``pb`` is None without ``constant_pb=True``.
    """

    def __init__(
        self,
        pf: nn.Module,
        pb: nn.Module | None,
        constant_pb: bool = False,
        debug: bool = False,
        *,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        log_reward_clip_min: float = -math.inf,
    ):
        super().__init__(pf, pb, constant_pb, log_reward_clip_min, debug, loss_fn)

    def _scores_TN(self, env, trajectories: Trajectories, recalculate_all_logprobs: bool):
        """Residuals ``(T, N)`` (0 elsewhere) and the non-exit transition mask ``(T, N)``."""
        env = trajectories.env if env is None else env
        if not getattr(self.pf, "is_vectorized", True):
            raise TypeError("ModifiedDBGFlowNet: pf must be a feed-forward (vectorized) policy")
        actions_TN = trajectories.actions_tensor[..., 0]
        valid = actions_TN >= 0
        exit_idx = env.n_actions - 1
        step = valid & (actions_TN != exit_idx)
        T, N = actions_TN.shape
        x_M = trajectories.states_tensor[:-1][valid]
        states_M = env.States(x_M)
        if not bool(states_M.forward_masks[:, -1].all()):
            raise ValueError("ModifiedDBGFlowNet: every visited state must be terminating (exit allowed)")
        table_M = self.pf.to_probability_distribution(states_M, self.pf(states_M)).logits  # type: ignore[operator]  # (M, A); an nn.Module attribute
        a_M = actions_TN[valid]
        lp_exit = table_M.new_zeros((T + 1, N))
        lp_exit[:-1][valid] = table_M[:, exit_idx]
        if not recalculate_all_logprobs and trajectories.log_probs is not None:
            log_pf = trajectories.log_probs
        else:
            log_pf = table_M.new_zeros((T, N))
            log_pf[valid] = table_M.gather(1, a_M.unsqueeze(1)).squeeze(1)
        log_pb = get_trajectory_pbs(None if self.constant_pb else self.pb, trajectories)
        lr = table_M.new_zeros((T + 1, N))
        lr_M = env.log_reward_tensor(x_M).to(table_M.dtype)
        lr[:-1][valid] = lr_M.clamp(min=self.log_reward_clip_min) if math.isfinite(self.log_reward_clip_min) else lr_M
        scores = lr[:-1] + log_pf + lp_exit[1:] - lr[1:] - log_pb - lp_exit[:-1]
        return torch.where(step, scores, torch.zeros_like(scores)), step

    def get_scores(self, trajectories: Trajectories, recalculate_all_logprobs: bool = True) -> torch.Tensor:  # type: ignore[override]  # loss-specific keyword arguments
        """Modified-DB residuals of the non-exit transitions, float ``(K,)`` (time-major).

        Raises:
            TypeError: for a recurrent ``pf`` or non-``Trajectories`` input.
            ValueError: for backward trajectories or a visited state that cannot exit.
        """
        trajectories = check_forward(trajectories, "ModifiedDBGFlowNet")
        scores, step = self._scores_TN(None, trajectories, recalculate_all_logprobs)
        return scores[step]

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self, env, trajectories: Trajectories, recalculate_all_logprobs: bool = True, reduction: str = "mean"
    ) -> torch.Tensor:
        """Modified-DB loss: mean / sum over non-exit transitions, or ``(K,)`` (``none``);
        0 when there is none (torchgfn's convention)."""
        scores = self.get_scores(trajectories, recalculate_all_logprobs)
        if scores.numel() == 0 and reduction != "none":
            return scores.new_zeros(())
        return reduce_loss(self.loss_fn(scores), reduction)

    def distributed_loss(self, env, trajectories: Trajectories, batch_mean: Callable) -> torch.Tensor:
        """This rank's share of the global-batch mean over non-exit transitions (module doc)."""
        scores, step = self._scores_TN(env, check_forward(trajectories, "ModifiedDBGFlowNet"), True)
        return transition_mean(self.loss_fn(scores), step, batch_mean)
