"""Relative trajectory balance family: a posterior sampler fine-tuned against a frozen prior.

* ``RelativeTrajectoryBalanceGFlowNet`` (RTB): Venkatraman et al. 2024,
  "Amortizing intractable inference in diffusion models for vision, language,
  and control", arXiv:2405.20971. Per trajectory
  ``½ (logZ + Σ log p_post - Σ log p_prior - β log r(x))^2`` (the default
  ``HalfSquaredLoss``; any ``loss_fn`` can replace it). At the optimum
  ``p_post(τ) ∝ p_prior(τ) r(x)^β`` for every trajectory, so the posterior's
  terminal marginal is ``P_T^post(x) ∝ P_T^prior(x) r(x)^β`` (on any DAG: both
  sides are sums over the same trajectories, so no backward policy is needed).
* ``RelativeLogPartitionVarianceGFlowNet``: the RTB residual centred by its
  batch mean (RTB at the batch-optimal ``logZ = -mean(s)``), with no learned
  logZ, as log-partition variance (arXiv:2302.05446) does for TB.
* ``TrustPCLGFlowNet``: Deleu et al. 2025, "Relative Trajectory Balance is
  equivalent to Trust-PCL", arXiv:2509.01632 (Prop. 3.1), with Trust-PCL from
  Nachum et al. 2017, arXiv:1707.01891: ``α² ·`` RTB with ``β = 1/α`` and the
  soft value ``V_soft(s0) = α · logZ``.

The prior is frozen and deliberately *not* a submodule: it is absent from
``state_dict()``, ``parameters()`` (hence from optimizers and from DDP's
gradient all-reduce), and its log-probs are computed under ``torch.no_grad()``.
Every learner must therefore build (or load) the same prior itself. Device and
dtype moves (``.to``, ``.cuda``, ``.double`` ...) are applied to it as well.

Shape legend: T = max trajectory length (actions), N = trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.env import Env
from gfn_dist.gflownet.base import (
    LogZMixin,
    TrajectoryBasedGFlowNet,
    get_trajectory_pfs,
    reduce_loss,
    scores_arguments,
)
from gfn_dist.gflownet.losses import HalfSquaredLoss
from gfn_dist.policy import ScalarEstimator


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


class RelativeTBBase(TrajectoryBasedGFlowNet):
    """Shared base of the relative losses: holds the frozen prior and ``beta``.

    RTB compares two *forward* processes over the same trajectories, so there
    is no backward policy (``pb=None``, ``constant_pb=True``). Subclasses
    implement ``loss`` (how logZ and the reduction are handled).

    Args:
        pf: the trainable posterior forward policy.
        prior_pf: the fixed prior forward policy; all its parameters must have
            ``requires_grad=False`` (call ``prior_pf.requires_grad_(False)``).
        beta: reward exponent β > 0 (the target is ``∝ P_T^prior(x) r(x)^β``).
        log_reward_clip_min: log-rewards are clamped from below to this value when finite.
        debug: check residuals for NaN / inf and raise.
        loss_fn: maps residuals ``(N,)`` to per-trajectory losses; default ``HalfSquaredLoss()``
            (``½ r²``, torchgfn 2.4.1's default for the whole RTB family: gradients equal the
            residuals, so learning rates carry over from torchgfn).

    Raises:
        ValueError: if ``prior_pf`` has a trainable parameter, is ``pf`` itself,
            or ``beta`` is not > 0.
    """

    def __init__(
        self,
        pf: nn.Module,
        prior_pf: nn.Module,
        *,
        beta: float = 1.0,
        log_reward_clip_min: float = -math.inf,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(
            pf,
            None,
            constant_pb=True,
            log_reward_clip_min=log_reward_clip_min,
            debug=debug,
            loss_fn=loss_fn or HalfSquaredLoss(),
        )
        if prior_pf is None:
            raise ValueError("prior_pf is None: RTB needs a fixed prior forward policy")
        if prior_pf is pf:
            raise ValueError("prior_pf is pf: the prior must be a separate, frozen copy of the policy")
        trainable = [n for n, p in prior_pf.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"prior_pf has trainable parameters {trainable[:5]}: the prior must be frozen; "
                "call prior_pf.requires_grad_(False) first"
            )
        self.beta = _check_positive("beta", beta)
        # Bypass nn.Module.__setattr__ so the prior is not registered as a submodule.
        object.__setattr__(self, "_prior_pf", prior_pf)

    _prior_pf: nn.Module  # set with object.__setattr__ in __init__

    @property
    def prior_pf(self) -> nn.Module:
        """The fixed prior forward policy (not a submodule; not in ``state_dict``)."""
        return self._prior_pf

    def _apply(self, fn, *args, **kwargs):
        # Keep the unregistered prior on the same device / dtype as the posterior.
        super()._apply(fn, *args, **kwargs)
        self._prior_pf._apply(fn, *args, **kwargs)
        return self

    def _compute_rtb_scores(
        self,
        env: Env | None,
        trajectories: Trajectories,
        log_rewards: torch.Tensor | None = None,
        recalculate_all_logprobs: bool = True,
    ) -> torch.Tensor:
        """RTB residuals ``Σ_t log p_post - Σ_t log p_prior - β log r(x)``, float ``(N,)``.

        Args:
            env: the environment (unused; API compatibility).
            trajectories: forward trajectories.
            log_rewards: optional ``(N,)`` override of the trajectories' log-rewards
                (e.g. intrinsic rewards).
            recalculate_all_logprobs: recompute the posterior's log-probs under the
                current policy; when False, saved sampling log-probs are reused. The
                prior's log-probs are always recomputed (saved ones belong to the
                behaviour policy), under ``torch.no_grad()``.

        Raises:
            ValueError: on a ``log_rewards`` shape other than ``(N,)``, on actions
                outside a policy's mask, or (``debug``) on non-finite residuals.
        """
        log_pf_post_N = get_trajectory_pfs(self.pf, trajectories, recalculate_all_logprobs).sum(0)
        with torch.no_grad():
            log_pf_prior_N = get_trajectory_pfs(self._prior_pf, trajectories, True).sum(0)
        lr_N = self._log_rewards(trajectories, log_rewards)
        scores_N = log_pf_post_N - log_pf_prior_N - self.beta * lr_N
        if self.debug and not bool(torch.isfinite(scores_N).all()):
            bad = torch.nonzero(~torch.isfinite(scores_N)).flatten().tolist()[:20]
            raise ValueError(f"non-finite RTB residuals in trajectories {bad}")
        return scores_N

    def get_scores(
        self,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        env: Env | None = None,
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RTB residuals without logZ, float ``(N,)`` (see ``_compute_rtb_scores``).

        Also accepts torchgfn's older order ``get_scores(env, trajectories, ...)``.
        """
        trajectories, recalculate_all_logprobs, env = scores_arguments(trajectories, recalculate_all_logprobs, env)
        return self._compute_rtb_scores(env, trajectories, log_rewards, recalculate_all_logprobs)


class RelativeTrajectoryBalanceGFlowNet(LogZMixin, RelativeTBBase):
    """Relative Trajectory Balance (Venkatraman et al. 2024, arXiv:2405.20971).

    Per trajectory ``½ (logZ + Σ log p_post(τ) - Σ log p_prior(τ) - β log r(x))^2``;
    at the optimum ``logZ = log Σ_x P_T^prior(x) r(x)^β`` and the posterior samples
    ``x ∝ P_T^prior(x) r(x)^β``.

    Args:
        pf: the trainable posterior forward policy.
        prior_pf: the frozen prior forward policy (see ``RelativeTBBase``).
        logZ: a learnable ``nn.Parameter`` scalar, or a ``ScalarEstimator`` of the
            conditions; default ``nn.Parameter(init_logZ)``.
        init_logZ: initial value of the scalar logZ.
        beta, log_reward_clip_min, debug, loss_fn: see ``RelativeTBBase``.

    Raises:
        ValueError: see ``RelativeTBBase``.
    """

    def __init__(
        self,
        pf: nn.Module,
        prior_pf: nn.Module,
        *,
        logZ: nn.Parameter | ScalarEstimator | None = None,
        init_logZ: float = 0.0,
        beta: float = 1.0,
        log_reward_clip_min: float = -math.inf,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(pf, prior_pf, beta=beta, log_reward_clip_min=log_reward_clip_min, debug=debug, loss_fn=loss_fn)
        self.logZ = logZ if logZ is not None else nn.Parameter(torch.tensor(float(init_logZ)))

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RTB loss; a scalar, or ``(N,)`` with ``reduction="none"``.

        Args:
            env: the environment (unused; API compatibility).
            trajectories: forward trajectories.
            recalculate_all_logprobs: recompute the posterior's log-probs (off-policy).
            reduction: ``mean`` | ``sum`` | ``none``.
            log_rewards: optional ``(N,)`` override of the trajectories' log-rewards.

        Raises:
            ValueError: on an unknown reduction or a bad ``log_rewards`` shape.
        """
        scores_N = self._compute_rtb_scores(env, trajectories, log_rewards, recalculate_all_logprobs)
        return reduce_loss(self.loss_fn(scores_N + self.logz_value(trajectories)), reduction)


class RelativeLogPartitionVarianceGFlowNet(RelativeTBBase):
    """RTB with logZ eliminated by variance minimization (cf. arXiv:2405.20971, arXiv:2302.05446).

    Per trajectory ``½ (s - mean(s))^2`` with RTB residuals
    ``s = Σ log p_post - Σ log p_prior - β log r(x)``: the RTB loss at the
    batch-optimal ``logZ* = -mean(s)``. No learnable logZ.

    Args: as ``RelativeTBBase``.
    """

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Relative LPV loss; a scalar, or ``(N,)`` with ``reduction="none"`` (args as RTB's)."""
        scores_N = self._compute_rtb_scores(env, trajectories, log_rewards, recalculate_all_logprobs)
        return reduce_loss(self.loss_fn(scores_N - scores_N.mean()), reduction)

    def distributed_loss(self, env, trajectories: Trajectories, batch_mean: Callable) -> torch.Tensor:
        """Relative LPV over the global batch: RTB residuals centred by ``batch_mean``
        (the global mean), then this rank's mean (see ``GFlowNet.distributed_loss``)."""
        scores_N = self._compute_rtb_scores(env, trajectories, None, True)
        return self.loss_fn(scores_N - batch_mean(scores_N)).mean()


class TrustPCLGFlowNet(RelativeTrajectoryBalanceGFlowNet):
    """Trust-PCL view of RTB (Deleu et al. 2025, arXiv:2509.01632; Nachum et al. 2017, arXiv:1707.01891).

    Prop. 3.1 of Deleu et al.: the Trust-PCL loss with temperature α equals
    ``α² ·`` the RTB loss with ``β = 1/α``, and the learned soft value of the
    initial state is ``V_soft(s0) = α · logZ``. Same computation as
    ``RelativeTrajectoryBalanceGFlowNet``, with reinforcement-learning names:
    ``policy`` = ``pf``, ``reference_policy`` = ``prior_pf``.

    Args:
        policy: the trainable policy (RTB's posterior ``pf``).
        reference_policy: the frozen reference policy (RTB's ``prior_pf``).
        alpha: temperature α > 0 (strength of the KL regularization to the reference).
        init_v_soft_s0: initial soft value of s0; logZ starts at ``init_v_soft_s0 / alpha``.
        logZ: optional learnable logZ (in logZ units, i.e. ``V_soft(s0) / α``);
            overrides ``init_v_soft_s0``.
        log_reward_clip_min, debug, loss_fn: see ``RelativeTBBase``.

    Raises:
        ValueError: if ``alpha`` is not > 0, or see ``RelativeTBBase``.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference_policy: nn.Module,
        *,
        alpha: float = 1.0,
        init_v_soft_s0: float = 0.0,
        logZ: nn.Parameter | ScalarEstimator | None = None,
        log_reward_clip_min: float = -math.inf,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        alpha = _check_positive("alpha", alpha)
        super().__init__(
            policy,
            reference_policy,
            logZ=logZ,
            init_logZ=float(init_v_soft_s0) / alpha,
            beta=1.0 / alpha,
            log_reward_clip_min=log_reward_clip_min,
            debug=debug,
            loss_fn=loss_fn,
        )
        self._alpha = alpha

    @property
    def alpha(self) -> torch.Tensor:
        """Trust-PCL temperature ``α = 1/β``, a float32 scalar tensor."""
        return torch.tensor(self._alpha)

    @property
    def v_soft_s0(self) -> torch.Tensor:
        """Soft value of the initial state ``V_soft(s0) = α · logZ`` (scalar; carries logZ's gradient).

        At convergence it is ``α log Σ_x P_T^ref(x) r(x)^(1/α)``.

        Raises:
            ValueError: if logZ is a conditional ``ScalarEstimator`` (use ``logz_value``).
        """
        if isinstance(self.logZ, ScalarEstimator):
            raise ValueError("v_soft_s0: logZ is a conditional ScalarEstimator; use alpha * logz_value(trajectories)")
        return self._alpha * self.logZ

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Trust-PCL loss ``α² · L_RTB``; a scalar, or ``(N,)`` with ``reduction="none"``."""
        rtb = super().loss(env, trajectories, recalculate_all_logprobs, reduction, log_rewards=log_rewards)
        return (self._alpha**2) * rtb
