"""Sub-trajectory balance (SubTB): Madan et al. 2023, "Learning GFlowNets from partial
episodes for improved convergence and stability", arXiv:2209.12782.

A trajectory ``s_0 -> ... -> s_{n-1} = x -> sf`` has n actions (exit included). For
every pair of positions ``0 <= j < k <= n`` the sub-trajectory of actions ``j..k-1``
balances ``log F(s_j) + Σ_{t=j}^{k-1} log P_F = G_k + Σ_{t=j}^{k-1} log P_B`` with
``G_k = log F(s_k)`` for ``k < n`` and ``G_n = log R(x)`` (the sub-trajectory ends
with the exit; P_B of the exit is 1). With cumulative sums ``C_F, C_B`` of the log-probs
the residual is ``A_j + B_k`` where ``A_j = log F(s_j) - C_F[j] + C_B[j]`` and
``B_k = C_F[k] - C_B[k] - G_k``: all ``n (n + 1) / 2`` residuals of a batch are one
broadcast sum ``(T, T, N)``.

Weightings (``weighting``), of a sub-trajectory of length ``L = k - j`` in a
trajectory of n actions, as torchgfn 2.4.1 names them:

* ``geometric_within`` (the paper's, default): ``λ^(L-1) / Σ_{l=1}^{n} (n - l + 1) λ^(l-1)``
  within each trajectory, then the mean over trajectories;
* ``equal_within``: ``2 / (n (n + 1))`` within each trajectory, mean over trajectories;
* ``equal``: every sub-trajectory of the batch alike;
* ``TB``: only the whole trajectory (TB with ``logZ = log F(s0)``);
* ``ModifiedDB``: only length 1, ``1 / n`` within each trajectory;
* ``DB``: only length 1, every transition of the batch alike (detailed balance);
* ``geometric``: the mean loss of each length L, weighted ``∝ λ^(L-1)`` over L = 1..T.

Reductions: ``mean`` is torchgfn's value for every weighting (torchgfn turns ``mean``
into a sum of weights that already sum to 1); ``none`` gives per-trajectory losses
``(N,)`` whose mean is that value, and ``sum`` their sum (torchgfn returns the flat
per-sub-trajectory terms for ``none`` and the same value for ``sum`` as ``mean``).

Global batch (``distributed_loss``): the within-trajectory weightings and TB /
ModifiedDB are means of per-trajectory losses, so each rank's mean averages exactly;
``equal`` and ``DB`` normalise by global counts (``batch_mean``); ``geometric`` (whose
weights depend on the batch's longest trajectory) is refused.

Shape legend: T = max trajectory length (actions), N = trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.gflownet.base import TrajectoryBasedGFlowNet, reduce_loss
from gfn_dist.gflownet.detailed_balance import check_forward, state_values_TN
from gfn_dist.policy import ScalarEstimator

WEIGHTINGS = ("geometric_within", "equal_within", "equal", "TB", "ModifiedDB", "DB", "geometric")


class SubTBGFlowNet(TrajectoryBasedGFlowNet):
    """Sub-trajectory balance (arXiv:2209.12782) with a learned log-state-flow ``logF``.

    Args:
        pf: forward policy estimator.
        pb: backward policy estimator, or None with ``constant_pb=True``.
        logF: ``ScalarEstimator`` of log F(s).
        weighting: one of ``WEIGHTINGS`` (module doc); default ``geometric_within``.
        lamda: λ in (0, ∞) of the geometric weightings (torchgfn's spelling); default 0.9.
        log_reward_clip_min: log-rewards are clamped from below to this value when finite.
        forward_looking: flows ``log F(s) + log R(s)`` (arXiv:2302.01687); needs rewards of
            intermediate states.
        constant_pb, debug, loss_fn: see ``TrajectoryBasedGFlowNet``.

    Raises:
        TypeError: if ``logF`` is not a ``ScalarEstimator``.
        ValueError: on an unknown weighting, ``lamda <= 0``, or ``pb`` None without ``constant_pb``.
    """

    def __init__(
        self,
        pf: nn.Module,
        pb: nn.Module | None,
        logF: ScalarEstimator,
        weighting: str = "geometric_within",
        lamda: float = 0.9,
        log_reward_clip_min: float = -math.inf,
        forward_looking: bool = False,
        constant_pb: bool = False,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if not isinstance(logF, ScalarEstimator):
            raise TypeError(f"SubTBGFlowNet: logF must be a ScalarEstimator, got {type(logF).__name__}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"SubTBGFlowNet: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not (math.isfinite(lamda) and lamda > 0):
            raise ValueError(f"SubTBGFlowNet: lamda must be a finite number > 0, got {lamda}")
        super().__init__(pf, pb, constant_pb, log_reward_clip_min, debug, loss_fn)
        self.logF = logF
        self.weighting = weighting
        self.lamda = float(lamda)
        self.forward_looking = bool(forward_looking)

    def logF_parameters(self) -> list[nn.Parameter]:
        """Parameters of the state-flow estimator."""
        return list(self.logF.parameters())

    def get_scores(  # type: ignore[override]  # SubTB's scores come with their weights
        self,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        env=None,
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals of every sub-trajectory and their mask.

        Returns:
            ``(scores (T, T, N), valid (T, T, N) bool)``: entry ``[j, k - 1, n]`` is the
            sub-trajectory of actions ``j..k-1`` of trajectory n, valid iff ``j < k <= n_n``
            (scores are 0 elsewhere). (torchgfn returns per-length lists instead.)

        Raises:
            TypeError / ValueError: on backward or non-``Trajectories`` input, a bad
                ``log_rewards`` shape or actions outside a policy's mask.
        """
        trajectories = check_forward(trajectories, "SubTBGFlowNet")
        env = trajectories.env if env is None else env
        log_pf, log_pb = self.get_pfs_and_pbs(trajectories, recalculate_all_logprobs)
        T, N = log_pf.shape
        actions_TN = trajectories.actions_tensor[..., 0]
        valid_TN = actions_TN >= 0
        n_N = trajectories.terminating_idx

        def log_flow(x: torch.Tensor) -> torch.Tensor:
            f = self.logF(env.States(x)).squeeze(-1)
            # Forward-looking flows add the unclipped log R(s) (torchgfn 2.4.1's choice for
            # SubTB; its DB clips them), the terminal target is the clipped log R(x).
            return f + env.log_reward_tensor(x) if self.forward_looking else f

        logF_TN = state_values_TN(log_flow, trajectories, valid_TN)  # (T + 1, N), row k = log F(s_k)
        zero = log_pf.new_zeros((1, N))
        C_F = torch.cat([zero, log_pf.cumsum(0)])  # (T + 1, N)
        C_B = torch.cat([zero, log_pb.cumsum(0)])
        lr_N = self._log_rewards(trajectories, log_rewards)
        k_T1 = torch.arange(T + 1, device=log_pf.device).unsqueeze(1)
        G = torch.where(k_T1 == n_N.unsqueeze(0), lr_N.unsqueeze(0), logF_TN)
        A = (logF_TN - C_F + C_B)[:-1]  # (T, N), j = 0..T-1
        B = (C_F - C_B - G)[1:]  # (T, N), k = 1..T
        valid = self._pair_mask(T, n_N)
        scores = A.unsqueeze(1) + B.unsqueeze(0)
        return torch.where(valid, scores, torch.zeros_like(scores)), valid

    @staticmethod
    def _pair_mask(T: int, n_N: torch.Tensor) -> torch.Tensor:
        """Bool ``(T, T, N)``: ``[j, k - 1, n]`` is true iff ``j < k <= n_n``."""
        ar = torch.arange(T, device=n_N.device)
        j, k = ar.view(T, 1, 1), ar.view(1, T, 1) + 1
        return (j < k) & (k <= n_N.view(1, 1, -1))

    def _lengths(self, T: int, device) -> torch.Tensor:
        ar = torch.arange(T, device=device)
        return ar.view(1, T, 1) + 1 - ar.view(T, 1, 1)  # L = k - j, (T, T, 1)

    def _per_trajectory(self, loss_TTN: torch.Tensor, valid: torch.Tensor, n_N: torch.Tensor) -> torch.Tensor:
        """Per-trajectory losses ``(N,)`` whose mean is the batch loss (module doc)."""
        T, N = loss_TTN.shape[0], loss_TTN.shape[-1]
        L = self._lengths(T, loss_TTN.device)
        n = n_N.to(loss_TTN.dtype)
        w = self.weighting
        if w == "geometric_within":
            lam = self.lamda
            wl = torch.pow(torch.tensor(lam, dtype=loss_TTN.dtype, device=loss_TTN.device), (L - 1).to(loss_TTN.dtype))
            # Σ_{l=1}^{n} (n - l + 1) λ^(l-1), per trajectory.
            lv = torch.arange(1, T + 1, device=loss_TTN.device, dtype=loss_TTN.dtype).unsqueeze(1)
            denom = ((n.unsqueeze(0) - lv + 1).clamp(min=0) * lam ** (lv - 1)).sum(0)
            weights = wl / denom
        elif w == "equal_within":
            weights = (2.0 / (n * (n + 1))).view(1, 1, N).expand(T, T, N)
        elif w == "equal":
            weights = (N / (n * (n + 1) / 2).sum()).expand(T, T, N)
        elif w == "TB":
            weights = (n_N.view(1, 1, N) == L).to(loss_TTN.dtype)  # j = 0, k = n
        elif w == "ModifiedDB":
            weights = (L == 1).to(loss_TTN.dtype) / n.view(1, 1, N)
        elif w == "DB":
            weights = (L == 1).to(loss_TTN.dtype) * (N / n.sum())
        else:  # geometric: the mean loss of each length L, weighted ∝ λ^(L-1) over L = 1..T
            idx = (L.expand(T, T, N) - 1).clamp(0, T - 1)
            counts = torch.zeros(T, dtype=loss_TTN.dtype, device=loss_TTN.device)
            counts.index_add_(0, idx[valid], torch.ones_like(loss_TTN[valid]))
            lam = self.lamda
            ls = torch.arange(T, device=loss_TTN.device, dtype=loss_TTN.dtype)
            wL = torch.full_like(ls, 1.0 / T) if lam == 1.0 else (1 - lam) / (1 - lam**T) * lam**ls
            weights = N * (wL / counts.clamp(min=1))[idx]
        return torch.where(valid, weights * loss_TTN, torch.zeros_like(loss_TTN)).sum(dim=(0, 1))

    def loss(  # type: ignore[override]  # loss-specific keyword arguments
        self,
        env,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        reduction: str = "mean",
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SubTB loss (module doc); a scalar, or ``(N,)`` with ``reduction="none"``."""
        scores, valid = self.get_scores(trajectories, recalculate_all_logprobs, env, log_rewards=log_rewards)
        per_traj = self._per_trajectory(self.loss_fn(scores), valid, trajectories.terminating_idx)
        return reduce_loss(per_traj, reduction)

    def distributed_loss(self, env, trajectories: Trajectories, batch_mean: Callable) -> torch.Tensor:
        """This rank's share of the global-batch loss (module doc).

        Raises:
            ValueError: for ``weighting="geometric"``.
        """
        if self.weighting == "geometric":
            raise ValueError(
                "SubTBGFlowNet: weighting='geometric' has batch-wide weights; "
                "use geometric_within for distributed training"
            )
        scores, valid = self.get_scores(trajectories, True, env)
        loss = self.loss_fn(scores)
        n_N = trajectories.terminating_idx
        if self.weighting in ("equal", "DB"):
            mask = valid if self.weighting == "equal" else valid & (self._lengths(valid.shape[0], valid.device) == 1)
            sums = torch.where(mask, loss, torch.zeros_like(loss)).sum(dim=(0, 1))
            return sums.mean() / batch_mean(mask.sum(dim=(0, 1)).to(loss.dtype))
        return self._per_trajectory(loss, valid, n_N).mean()
