"""Flow matching (FM): Bengio et al. 2021, "Flow Network based Generative Models for
Non-Iterative Diverse Candidate Generation", arXiv:2106.04399 (see also
arXiv:2111.09266, Sec. 3.2).

An edge-flow estimator ``logF`` (a ``DiscretePolicyEstimator``: its ``n_actions``
outputs at s are ``log F(s -> s')`` per forward action, exit included) is trained
so that, at every visited non-initial state s,

* flow matching: ``log Σ_{parents p of s} F(p -> s) = log Σ_{a allowed at s} F(s -> a)``
  (exit included), residual ``in - out``;
* reward matching: at each terminal state x, ``log F(x -> sf) = log R(x)``.

``loss = mean_states loss_fn(in - out) + alpha · mean_x loss_fn(log F(x -> sf) - log R(x))``,
the means over the non-initial, non-sink states of the trajectories (with
repetition, as torchgfn's ``StatesContainer``) and over their terminal states. The
forward policy is ``softmax`` of the masked edge flows, so ``pf`` is ``logF`` itself
(sampling, evaluation, and the policy published to rollout actors).

Global batch (``distributed_loss``): each rank returns ``mean_n(Σ_states of n fm) /
batch_mean(states per trajectory) + alpha · mean_n rm_n``; averaged over ranks these
are the global means.

Shape legend: T = max trajectory length (actions), N = trajectories, K = states,
A = ``n_actions``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.gflownet.base import GFlowNet, reduce_loss
from gfn_dist.gflownet.detailed_balance import check_forward
from gfn_dist.gflownet.losses import SquaredLoss
from gfn_dist.policy import DiscretePolicyEstimator


class FMGFlowNet(GFlowNet):
    """Flow matching with an edge-flow estimator (arXiv:2106.04399).

    Args:
        logF: forward ``DiscretePolicyEstimator`` of log edge flows ``(K, A)``.
        alpha: weight of the reward-matching term.
        debug: accepted for torchgfn compatibility (checks always run).
        loss_fn: maps residuals to losses; default ``SquaredLoss()``.

    Raises:
        TypeError: if ``logF`` is not a forward ``DiscretePolicyEstimator``.
    """

    def __init__(
        self,
        logF: DiscretePolicyEstimator,
        alpha: float = 1.0,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if not isinstance(logF, DiscretePolicyEstimator) or logF.is_backward or not logF.is_vectorized:
            raise TypeError(
                f"FMGFlowNet: logF must be a forward, feed-forward DiscretePolicyEstimator, got {type(logF).__name__}"
            )
        self.logF = logF
        self.alpha = float(alpha)
        self.debug = bool(debug)
        self.loss_fn = loss_fn or SquaredLoss()

    @property
    def pf(self) -> nn.Module:  # type: ignore[override]  # FM's pf is its edge-flow estimator (read-only)
        """The forward policy: the edge-flow estimator (masked softmax of the flows)."""
        return self.logF

    def _flow_residuals(self, env, x_K: torch.Tensor) -> torch.Tensor:
        """``log inflow - log outflow`` of states ``x_K (K, *state_shape)``, float ``(K,)``."""
        states = env.States(x_K)
        bm = states.backward_masks  # (K, A - 1): parents by backward action b
        k_idx, b_idx = torch.nonzero(bm, as_tuple=True)
        parents = env.States(env.backward_step_tensor(x_K[k_idx], b_idx))
        in_flows = self.logF(parents).gather(1, b_idx.unsqueeze(1)).squeeze(1)
        log_in = torch.full(bm.shape, -torch.inf, dtype=in_flows.dtype, device=in_flows.device)
        log_in = log_in.index_put((k_idx, b_idx), in_flows).logsumexp(-1)
        out = self.logF(states)
        log_out = torch.where(states.forward_masks, out, torch.full_like(out, -torch.inf)).logsumexp(-1)
        return log_in - log_out

    def flow_matching_loss(self, env, states, reduction: str = "mean") -> torch.Tensor:
        """Flow-matching term over non-initial ``states`` ``(K,)``: ``loss_fn(in - out)``
        reduced (``none``: ``(K,)``); 0 for no states."""
        x = states.tensor if hasattr(states, "tensor") else states
        if x.shape[0] == 0:
            return torch.zeros((), device=x.device)
        return reduce_loss(self.loss_fn(self._flow_residuals(env, x)), reduction)

    def reward_matching_loss(
        self, env, terminating_states, log_rewards: torch.Tensor | None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Reward-matching term ``loss_fn(log F(x -> sf) - log R(x))`` over ``terminating_states``
        ``(N,)`` (``log_rewards`` ``(N,)``; None: from ``env``); 0 for no states."""
        x = terminating_states.tensor if hasattr(terminating_states, "tensor") else terminating_states
        if x.shape[0] == 0:
            return torch.zeros((), device=x.device)
        lr = env.log_reward_tensor(x) if log_rewards is None else log_rewards
        return reduce_loss(self.loss_fn(self.logF(env.States(x))[:, -1] - lr), reduction)

    def _parts(self, env, trajectories: Trajectories, log_rewards: torch.Tensor | None):
        """``(fm (T+1, N), states mask (T+1, N), rm (N,))`` per-item losses."""
        trajectories = check_forward(trajectories, "FMGFlowNet")
        env = trajectories.env if env is None else env
        st = env.States(trajectories.states_tensor)
        inner = ~st.is_sink_state & ~st.is_initial_state  # (T + 1, N)
        fm = torch.zeros(inner.shape, device=trajectories.device)
        fm[inner] = self.loss_fn(self._flow_residuals(env, trajectories.states_tensor[inner]))
        lr = trajectories.log_rewards if log_rewards is None else log_rewards
        if tuple(lr.shape) != (trajectories.n_trajectories,):
            raise ValueError(f"log_rewards: expected shape ({trajectories.n_trajectories},), got {tuple(lr.shape)}")
        x = trajectories.terminating_states.tensor
        rm = self.loss_fn(self.logF(env.States(x))[:, -1] - lr)
        return fm, inner, rm

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """FM loss ``fm + alpha · rm`` (module doc) over the trajectories' states.

        Args:
            env: the environment (default: the trajectories').
            trajectories: forward trajectories (torchgfn passes a ``StatesContainer``;
                here ``to_training_samples`` is the identity).
            recalculate_all_logprobs: unused (FM has no log-probs).
            reduction: ``mean`` or ``sum`` (each term reduced on its own, as torchgfn).
            log_rewards: optional ``(N,)`` log-rewards of the terminal states.

        Raises:
            ValueError: for ``reduction="none"`` (the two terms have different sizes;
                use ``flow_matching_loss`` / ``reward_matching_loss``) or a bad shape.
        """
        if reduction == "none":
            raise ValueError(
                "FMGFlowNet.loss: reduction='none' is undefined (states and terminal states differ "
                "in number); use flow_matching_loss / reward_matching_loss"
            )
        fm, inner, rm = self._parts(env, trajectories, log_rewards)
        fm_term = reduce_loss(fm[inner], reduction) if bool(inner.any()) else fm.new_zeros(())
        return fm_term + self.alpha * reduce_loss(rm, reduction)

    def distributed_loss(self, env, trajectories: Trajectories, batch_mean: Callable) -> torch.Tensor:
        """This rank's share of the global-batch FM loss (module doc)."""
        fm, inner, rm = self._parts(env, trajectories, None)
        fm_share = fm.sum(0).mean() / batch_mean(inner.sum(0).to(fm.dtype)).clamp(min=1e-12)
        return fm_share + self.alpha * rm.mean()
