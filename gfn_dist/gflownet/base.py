"""GFlowNet base classes and log-probability computation for trajectories.

Shape legend: T = max trajectory length (actions), N = trajectories,
M = number of valid (non-padding) transitions.

``get_trajectory_pfs`` / ``get_trajectory_pbs`` recompute log P_F / log P_B of
stored trajectories. Vectorized policies do it with one forward pass over all
M valid states (padding rows are dropped, not computed); non-vectorized
(recurrent) policies use their ``teacher_forced_log_probs`` when they have one
(one pass over each whole sequence), else a per-step re-threaded loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.env import Env
from gfn_dist.gflownet.losses import SquaredLoss
from gfn_dist.policy import ScalarEstimator
from gfn_dist.sampling import Sampler


def _gather_valid(x_TN: torch.Tensor | None, flat_idx: torch.Tensor) -> torch.Tensor | None:
    """Rows ``flat_idx`` of ``x`` with its (T, N) dims flattened: ``(M, *rest)``."""
    if x_TN is None:
        return None
    return x_TN.flatten(0, 1).index_select(0, flat_idx)


def _expand_conditions(conditions: torch.Tensor | None, T: int, flat_idx: torch.Tensor):
    if conditions is None:
        return None
    return _gather_valid(conditions.unsqueeze(0).expand(T, *conditions.shape), flat_idx)


def _scatter_TN(lp_M: torch.Tensor, flat_idx: torch.Tensor, T: int, N: int) -> torch.Tensor:
    out = torch.zeros(T * N, dtype=lp_M.dtype, device=lp_M.device)
    return out.index_put_((flat_idx,), lp_M).view(T, N)


def get_trajectory_pfs(
    pf,
    trajectories: Trajectories,
    recalculate_all_logprobs: bool = True,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """log P_F of every action, float ``(T, N)``, 0 on padding.

    With ``recalculate_all_logprobs=False`` the log-probs saved while sampling
    are returned when present (on-policy; differentiable when they were sampled
    with ``save_logprobs=True`` under grad mode), and saved estimator outputs are
    reused when present (pre-set as ``ctx.current_estimator_output``).

    Raises:
        ValueError: for backward trajectories, or (``check_finite``) if a stored
            action is outside the policy's mask (-inf log-prob), naming the
            (step, trajectory) pairs.
    """
    if trajectories.is_backward:
        raise ValueError("get_trajectory_pfs: expected forward trajectories, got backward ones")
    if not recalculate_all_logprobs and trajectories.log_probs is not None:
        if torch.is_grad_enabled() and not trajectories.log_probs.requires_grad:
            warnings.warn(
                "recalculate_all_logprobs=False reuses log-probs saved while sampling, and these carry "
                "no gradient (sampled under torch.no_grad() or read from replay): P_F gets no gradient "
                "from this loss. Sample with save_logprobs=True under grad mode, or recalculate.",
                stacklevel=3,
            )
        return trajectories.log_probs
    env = trajectories.env
    actions_TN = trajectories.actions_tensor[..., 0]
    valid_TN = actions_TN >= 0
    T, N = actions_TN.shape
    if not getattr(pf, "is_vectorized", True):
        tf = getattr(pf, "teacher_forced_log_probs", None)
        if tf is not None:
            return tf(trajectories)
        return _per_step_pfs(pf, trajectories, valid_TN)
    # One nonzero, shared by every gather below (a boolean index would redo it each time).
    flat_idx = torch.nonzero(valid_TN.flatten()).squeeze(1)
    states_M = env.States(_gather_valid(trajectories.states_tensor[:-1], flat_idx))
    ctx = pf.init_context(
        flat_idx.shape[0], trajectories.device, _expand_conditions(trajectories.conditions, T, flat_idx)
    )
    if not recalculate_all_logprobs and trajectories.estimator_outputs is not None:
        ctx.current_estimator_output = _gather_valid(trajectories.estimator_outputs, flat_idx)
    dist, ctx = pf.compute_dist(states_M, ctx)
    lp_M, ctx = pf.log_probs(_gather_valid(actions_TN, flat_idx), dist, ctx, vectorized=True)
    if check_finite:
        _check_finite(lp_M, flat_idx, N, "P_F")
    return _scatter_TN(lp_M, flat_idx, T, N)


def _per_step_pfs(pf, trajectories: Trajectories, valid_TN: torch.Tensor) -> torch.Tensor:
    """Per-step path: re-threads the policy's context (e.g. a recurrent carry) over time."""
    env = trajectories.env
    T, N = valid_TN.shape
    ctx = pf.init_context(N, trajectories.device, trajectories.conditions)
    out = torch.zeros((T, N), device=trajectories.device)
    rows = []
    for t in range(T):
        mask = valid_TN[t]
        st = env.States(trajectories.states_tensor[t][mask])
        dist, ctx = pf.compute_dist(st, ctx, step_mask=mask)
        lp, ctx = pf.log_probs(trajectories.actions_tensor[t, :, 0][mask], dist, ctx, step_mask=mask, vectorized=False)
        rows.append(lp)
    if rows:
        out = torch.stack(rows, 0)
    return out


def get_trajectory_pbs(pb, trajectories: Trajectories, *, check_finite: bool = True) -> torch.Tensor:
    """log P_B of every non-exit action, float ``(T, N)``, 0 on padding and exit.

    The action taken at step t (s_t -> s_{t+1}) is undone by backward action
    of the same index at s_{t+1}. ``pb=None`` gives zeros (tree DAG, P_B = 1).

    Raises:
        ValueError: for backward trajectories, or (``check_finite``) on -inf
            log-probs, naming the (step, trajectory) pairs.
    """
    if trajectories.is_backward:
        raise ValueError("get_trajectory_pbs: expected forward trajectories, got backward ones")
    env = trajectories.env
    actions_TN = trajectories.actions_tensor[..., 0]
    T, N = actions_TN.shape
    if pb is None:
        return torch.zeros((T, N), device=trajectories.device)
    valid_TN = (actions_TN >= 0) & (actions_TN != env.n_actions - 1)
    flat_idx = torch.nonzero(valid_TN.flatten()).squeeze(1)
    states_M = env.States(_gather_valid(trajectories.states_tensor[1:], flat_idx))
    ctx = pb.init_context(
        flat_idx.shape[0], trajectories.device, _expand_conditions(trajectories.conditions, T, flat_idx)
    )
    dist, ctx = pb.compute_dist(states_M, ctx)
    lp_M, ctx = pb.log_probs(_gather_valid(actions_TN, flat_idx), dist, ctx, vectorized=True)
    if check_finite:
        _check_finite(lp_M, flat_idx, N, "P_B")
    return _scatter_TN(lp_M, flat_idx, T, N)


#: Below this many rows, ``cross_entropy`` (one fused call) beats the transposed
#: log-softmax + gather (fewer ops, forward and backward); above, the transposed path is faster.
_CROSS_ENTROPY_MAX_ROWS = 256


def _masked_nll(fn, x_M: torch.Tensor, a_M: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """``-log p(a_M | x_M)`` ``(M,)`` under the masked logits ``fn(x_M)`` (``features``: the
    preprocessed ``x_M`` when already computed)."""
    logits = fn(x_M) if features is None else fn(x_M, features)
    if x_M.shape[0] <= _CROSS_ENTROPY_MAX_ROWS:
        return torch.nn.functional.cross_entropy(logits, a_M, reduction="none")
    # Normalized over dim 0 of the transposed (A, M) view: the same values, and several
    # times faster (forward and backward) than over a short last dimension of many rows.
    return logits.t().log_softmax(0).gather(0, a_M.unsqueeze(0)).squeeze(0).neg()


def trajectory_score_sums(pf, pb, trajectories: Trajectories, init: torch.Tensor | None = None) -> torch.Tensor | None:
    """``init + Σ_t log P_F - Σ_t log P_B`` per trajectory, float ``(N,)``, by the tensor-level shortcut.

    The same values as ``get_trajectory_pfs(...).sum(0) - get_trajectory_pbs(...).sum(0)``
    with recomputed log-probs, with fewer and cheaper ops: one gather of the M valid
    states, masked logits from ``masked_logits_fn`` (P_F and P_B share the preprocessed
    states when they share the preprocessor), and the per-trajectory sums accumulated
    directly into ``init`` (``(N,)``, default zeros; no ``(T, N)`` intermediate). No
    finiteness check (callers check the scores). Returns None when a policy (or the
    trajectories: conditions, backward) needs the general path; ``pb=None`` means P_B = 1.
    """
    if trajectories.is_backward or trajectories.conditions is not None:
        return None
    env = trajectories.env

    def shortcut(policy):
        make = getattr(policy, "masked_logits_fn", None)
        return make(env) if make is not None else None

    fn_pf = shortcut(pf)
    fn_pb = shortcut(pb) if pb is not None else None
    if fn_pf is None or (pb is not None and fn_pb is None):
        return None
    a_flat = trajectories.actions_tensor.reshape(-1)  # (T * N,): actions have one component
    N = trajectories.n_trajectories
    x_flat = trajectories.states_tensor.flatten(0, 1)  # ((T + 1) * N, *state_shape)
    idx_pf = torch.nonzero(a_flat >= 0).squeeze(1)  # flat (t, n) of valid transitions, t-major
    a_pf = a_flat.index_select(0, idx_pf)
    traj_pf = idx_pf.remainder(N)
    x_pf = x_flat.index_select(0, idx_pf)
    pre = getattr(pf, "preprocessor", None)
    shared = fn_pb is not None and pre is not None and getattr(pb, "preprocessor", None) is pre
    feats_pf = pre(x_pf) if shared else None  # type: ignore[misc]  # shared implies a preprocessor
    nll_pf = _masked_nll(fn_pf, x_pf, a_pf, feats_pf)
    if init is None:
        init = torch.zeros(N, dtype=nll_pf.dtype, device=nll_pf.device)
    sums = init.index_add(0, traj_pf, nll_pf, alpha=-1)
    if fn_pb is None:
        return sums
    # The backward action undoing forward action a_t is evaluated at s_{t+1}, for the
    # non-exit transitions. When every trajectory ends with its one exit (N exits), these are
    # the valid transitions at t >= 1 shifted back one step: the valid transitions are
    # t-major, the first N are the t = 0 ones, and the rest of x_pf are the P_B states.
    exit_idx = env.n_actions - 1
    feats_pb = None
    if int((a_pf == exit_idx).sum()) == N:
        x_pb, traj_pb = x_pf[N:], traj_pf[N:]
        a_pb = a_flat.index_select(0, idx_pf[N:] - N)
        feats_pb = feats_pf[N:] if shared else None  # type: ignore[index]  # shared implies feats_pf
    else:  # a trajectory without its exit: select the non-exit transitions
        sel = torch.nonzero(a_pf != exit_idx).squeeze(1)
        x_pb = x_flat.index_select(0, idx_pf.index_select(0, sel) + N)
        a_pb, traj_pb = a_pf.index_select(0, sel), traj_pf.index_select(0, sel)
    return sums.index_add(0, traj_pb, _masked_nll(fn_pb, x_pb, a_pb, feats_pb))


def _check_offset(offset: torch.Tensor | None) -> None:
    """Raises ValueError if the scores' offset (logZ) is non-finite."""
    if offset is not None and not bool(torch.isfinite(offset.detach()).all()):
        raise ValueError("non-finite logZ")


def _check_finite(lp_M: torch.Tensor, flat_idx: torch.Tensor, N: int, what: str) -> None:
    bad = torch.isinf(lp_M)
    if bool(bad.any()):
        f = flat_idx[bad][:10]
        pairs = torch.stack([f // N, f % N], dim=1).tolist()
        raise ValueError(f"{what}: actions outside the policy's mask at (step, trajectory) {pairs}")


class GFlowNet(nn.Module):
    """Base class: a GFlowNet is a module with a ``loss`` and a forward policy ``pf``.

    ``forward(env, trajectories, **kwargs)`` calls ``loss`` so that a GFlowNet can
    be wrapped in ``DistributedDataParallel`` (DDP hooks run on ``forward``).
    """

    pf: nn.Module

    def forward(self, env, trajectories: Trajectories, **kwargs) -> torch.Tensor:
        return self.loss(env, trajectories, **kwargs)

    def loss(self, env, trajectories: Trajectories, **kwargs) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def distributed_loss(
        self,
        env,
        trajectories: Trajectories,
        batch_mean: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """This rank's loss when a global batch is split over ranks in equal shares.

        Contract: the average over ranks of the returned scalars (DDP averages their
        gradients) is the loss of the global batch. ``batch_mean(x)`` maps a per-trajectory
        tensor ``x (N,)`` of this rank's share to the global-batch mean, a differentiable
        scalar (an all-reduce across ranks; ``x.mean()`` in one process). Log-probs are
        always recomputed (learners train from replay).

        The default, ``self.loss(env, trajectories, recalculate_all_logprobs=True)``, is right
        for every loss that is a mean over trajectories of per-trajectory terms (TB, RTB,
        Trust-PCL, SubTB's within-trajectory weightings). Losses with a batch-wide
        statistic override it: LPV and relative LPV centre their scores with ``batch_mean``;
        DB / modified DB / FM / SubTB (``equal``, ``DB``) average over transitions or
        states, normalised by their global count ``batch_mean(count per trajectory)``.
        """
        return self.loss(env, trajectories, recalculate_all_logprobs=True)

    def sample_trajectories(
        self,
        env,
        n: int,
        conditions: torch.Tensor | None = None,
        save_logprobs: bool = False,
        save_estimator_outputs: bool = False,
        **policy_kwargs,
    ) -> Trajectories:
        """``n`` trajectories from s0 with ``pf`` (see ``Sampler.sample_trajectories``)."""
        return Sampler(self.pf).sample_trajectories(
            env,
            n=n,
            conditions=conditions,
            save_logprobs=save_logprobs,
            save_estimator_outputs=save_estimator_outputs,
            **policy_kwargs,
        )

    def to_training_samples(self, trajectories: Trajectories) -> Trajectories:
        return trajectories


def reduce_loss(per_traj: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` / ``sum`` over trajectories, or ``none`` (shape ``(N,)``).

    Raises:
        ValueError: on another reduction name.
    """
    if reduction == "mean":
        return per_traj.mean()
    if reduction == "sum":
        return per_traj.sum()
    if reduction == "none":
        return per_traj
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def scores_arguments(trajectories, recalculate_all_logprobs, env):
    """``get_scores`` arguments in order, also from torchgfn's older ``get_scores(env, trajectories, ...)``.

    Returns:
        ``(trajectories, recalculate_all_logprobs, env)``.
    """
    if not isinstance(trajectories, Env):
        return trajectories, recalculate_all_logprobs, env
    # Old order: the env came first, the trajectories second (positionally or as ``env=``).
    moved = env if isinstance(env, Trajectories) else recalculate_all_logprobs
    return moved, True, trajectories


class TrajectoryBasedGFlowNet(GFlowNet):
    """A GFlowNet whose loss is a function of whole trajectories.

    Args:
        pf: forward policy estimator.
        pb: backward policy estimator, or None with ``constant_pb=True`` (tree DAG).
        constant_pb: P_B is 1 (tree DAG); pb is ignored.
        log_reward_clip_min: log-rewards are clamped from below to this value when finite.
        debug: check scores for NaN / inf and raise.
        loss_fn: maps residuals ``(N,)`` to per-trajectory losses; default ``SquaredLoss()`` (r²).

    Raises:
        ValueError: if ``pb`` is None and ``constant_pb`` is False.
    """

    def __init__(
        self,
        pf: nn.Module,
        pb: nn.Module | None,
        constant_pb: bool = False,
        log_reward_clip_min: float = -math.inf,
        debug: bool = False,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if pb is None and not constant_pb:
            raise ValueError("pb is None: pass constant_pb=True to use P_B = 1 (tree DAG), or a backward estimator")
        self.pf = pf
        self.pb = pb
        self.constant_pb = constant_pb
        self.log_reward_clip_min = float(log_reward_clip_min)
        self.debug = debug
        self.loss_fn = loss_fn or SquaredLoss()

    def pf_pb_parameters(self) -> list[nn.Parameter]:
        """Parameters of P_F and (unless ``constant_pb``) P_B, without duplicates (shared trunks)."""
        mods = [self.pf] + ([self.pb] if self.pb is not None and not self.constant_pb else [])
        seen, out = set(), []
        for p in (p for m in mods for p in m.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def get_pfs_and_pbs(
        self, trajectories: Trajectories, recalculate_all_logprobs: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_pf (T, N), log_pb (T, N))``; log_pb is 0 when ``constant_pb``."""
        return self._pfs_and_pbs(trajectories, recalculate_all_logprobs, check_finite=True)

    def _pfs_and_pbs(self, trajectories: Trajectories, recalculate_all_logprobs: bool, check_finite: bool):
        log_pf = get_trajectory_pfs(self.pf, trajectories, recalculate_all_logprobs, check_finite=check_finite)
        pb = None if self.constant_pb else self.pb
        log_pb = get_trajectory_pbs(pb, trajectories, check_finite=check_finite)
        return log_pf, log_pb

    def _log_rewards(self, trajectories: Trajectories, log_rewards: torch.Tensor | None) -> torch.Tensor:
        lr = trajectories.log_rewards if log_rewards is None else log_rewards
        if tuple(lr.shape) != (trajectories.n_trajectories,):
            raise ValueError(f"log_rewards: expected shape ({trajectories.n_trajectories},), got {tuple(lr.shape)}")
        if math.isfinite(self.log_reward_clip_min):
            lr = lr.clamp(min=self.log_reward_clip_min)
        return lr

    def get_scores(
        self,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool = True,
        env: Env | None = None,
        *,
        log_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``Σ_t log P_F - Σ_t log P_B - log R(x)``, float ``(N,)``.

        Also accepts torchgfn's older order ``get_scores(env, trajectories, ...)``.
        """
        trajectories, recalculate_all_logprobs, env = scores_arguments(trajectories, recalculate_all_logprobs, env)
        return self._scores(trajectories, recalculate_all_logprobs, log_rewards, check=True)

    def _scores(
        self,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool,
        log_rewards: torch.Tensor | None,
        check: bool,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``get_scores`` (plus ``offset``, a scalar or ``(N,)``, when given); ``check=False``
        leaves the finiteness check to the caller (``_checked_loss``)."""
        # Finiteness is checked once, on the scores (one host sync instead of one per policy).
        lr = self._log_rewards(trajectories, log_rewards)
        scores = None
        if recalculate_all_logprobs or (trajectories.log_probs is None and trajectories.estimator_outputs is None):
            init = -lr if offset is None else offset - lr
            scores = trajectory_score_sums(self.pf, None if self.constant_pb else self.pb, trajectories, init)
        if scores is None:
            log_pf, log_pb = self._pfs_and_pbs(trajectories, recalculate_all_logprobs, check_finite=False)
            scores = log_pf.sum(0) - log_pb.sum(0) - lr
            if offset is not None:
                scores = scores + offset
        # One reduction and one host sync: a sum is finite iff every term is (short of overflow).
        if check and not math.isfinite(float(scores.detach().sum())):
            _check_offset(offset)
            self._explain_non_finite(trajectories, recalculate_all_logprobs, lr)
        return scores

    def _checked_loss(
        self,
        trajectories: Trajectories,
        recalculate_all_logprobs: bool,
        log_rewards: torch.Tensor | None,
        scores_to_loss: Callable,
        reduction: str,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``reduce_loss(scores_to_loss(scores + offset), reduction)`` with the scores' finiteness checked.

        With the default square loss and a reduced loss, the check is on the loss itself
        (finite iff every score is, short of overflow; one host sync and no extra reduction);
        otherwise on the scores, as ``get_scores`` does.
        """
        fold = getattr(self.loss_fn, "finite_iff_input_finite", False) and reduction != "none"
        scores = self._scores(trajectories, recalculate_all_logprobs, log_rewards, check=not fold, offset=offset)
        loss = reduce_loss(scores_to_loss(scores), reduction)
        if fold and not math.isfinite(float(loss.detach())):
            _check_offset(offset)
            lr = self._log_rewards(trajectories, log_rewards)
            if math.isfinite(float(scores.detach().sum())):
                raise ValueError("non-finite loss: the squared scores overflow float32")
            self._explain_non_finite(trajectories, recalculate_all_logprobs, lr)
        return loss

    def _explain_non_finite(self, trajectories: Trajectories, recalculate_all_logprobs: bool, lr: torch.Tensor):
        """Raises a ValueError naming the cause of non-finite scores."""
        with torch.no_grad():
            self._pfs_and_pbs(trajectories, recalculate_all_logprobs, check_finite=True)  # names bad actions
        bad = torch.nonzero(~torch.isfinite(lr)).flatten().tolist()[:20]
        if bad:
            hint = " (set log_reward_clip_min to train with zero rewards)" if bool(torch.isneginf(lr).any()) else ""
            raise ValueError(f"non-finite log_rewards in trajectories {bad}{hint}")
        raise ValueError("non-finite scores: the policy produced non-finite log-probabilities")


class LogZMixin:
    """A learned logZ: an ``nn.Parameter`` scalar, or a ``ScalarEstimator`` of the conditions.

    Subclasses set ``self.logZ``; optimizers usually give ``logz_parameters()`` a
    larger learning rate than ``pf_pb_parameters()``.
    """

    logZ: nn.Parameter | ScalarEstimator  # set by subclasses

    def logz_value(self, trajectories: Trajectories) -> torch.Tensor:
        """logZ as a scalar, or ``(N,)`` for a conditional ``ScalarEstimator``.

        Raises:
            ValueError: if logZ is a ``ScalarEstimator`` and the trajectories have no conditions.
        """
        if isinstance(self.logZ, ScalarEstimator):
            if trajectories.conditions is None:
                raise ValueError("logZ is a ScalarEstimator but the trajectories have no conditions")
            return self.logZ(trajectories.conditions).squeeze(-1)
        return self.logZ

    def logz_parameters(self) -> list[nn.Parameter]:
        """Parameters of logZ."""
        return list(self.logZ.parameters()) if isinstance(self.logZ, nn.Module) else [self.logZ]

    def pf_pb_parameters(self) -> list[nn.Parameter]:
        """All registered parameters except logZ's."""
        ids = {id(p) for p in self.logz_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]  # type: ignore[attr-defined]  # mixed into an nn.Module
