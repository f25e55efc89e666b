"""Back-and-forth local search for GFlowNets (seed document 003).

The back-and-forth heuristic (Zhang et al. 2022, "Generative Flow Networks for
Discrete Probabilistic Modeling", arXiv:2202.01361) refines a terminal state x
by destroying the last K steps of a trajectory with the backward policy P_B and
rebuilding them with the forward policy P_F. Local Search GFlowNets (Kim et al.
2023, arXiv:2310.02710) use it to improve training samples, accepting the new
state greedily or by a Metropolis-Hastings (MH) rule.

Shape legend: N = trajectories, T = time (actions), S = ``state_shape``.

One search of a forward trajectory tau ending in x (``LocalSearchSampler.propose``):

1. **Backward walk.** A fresh backward trajectory is sampled with P_B from x to
   s0 (``x = u_0 -> u_1 -> ... -> u_L = s0``, ``L`` non-exit steps). Read
   forward, it is a complete trajectory ``tau_b`` ending in x (the
   *prev* trajectory). The junction is the state ``j = u_K`` reached after K
   backward steps, ``K = min(back_steps, L)`` or ``ceil(back_ratio * L)``.
   Why walk all the way to s0 rather than K steps: the junction sampled by P_B
   is in general *not* a state of the input trajectory (many paths reach x in
   a non-tree DAG), so the input's prefix cannot be reused; the rest of the
   walk, ``j -> s0``, supplies a valid prefix drawn from P_B.
2. **Forward reconstruction.** From j, P_F samples a new suffix ending in a new
   terminal state x' (the *recon* segment).
3. **Splice.** The new trajectory is ``tau' = tau_b[:n_prev] + recon`` with
   ``n_prev = L - K`` shared transitions (``splice_trajectories``: gather /
   index arithmetic over time, no Python loop over trajectories).
4. **Accept.** Greedy: accept iff ``log R(x') >= log R(x)``. MH, see below.
   Accepted rows become tau'; rejected rows keep the *input* trajectory
   unchanged (the next search resamples its backward path from x anyway, so
   the chain on terminal states is the same as if tau_b were kept).

Metropolis-Hastings. Let ``pi(tau) = R(x) P_B(tau | x) / Z`` on complete
trajectories; its marginal on terminal states is R(x)/Z. Step 1 draws tau_b
from ``P_B(. | x)``, the exact conditional of pi given x (a Gibbs step).
Steps 2-4 are an MH move on trajectories that keeps the prefix and proposes a
new suffix with probability ``q(tau' | tau_b) = prod P_F(recon)`` (exit
included). The reverse move (from tau', back K steps to the same j, then P_F
rebuilding the old segment) has probability ``prod P_F(prev segment)``. So::

    log alpha = min(0, log R(x') + sum log P_B(tau' | x') + sum log P_F(tau_b)
                       - log R(x) - sum log P_B(tau_b | x) - sum log P_F(tau'))
              = min(0, log R(x') + sum_recon log P_B + sum_prev-seg log P_F
                       - log R(x) - sum_prev-seg log P_B - sum_recon log P_F)

(full-trajectory form = segment form: the shared prefix cancels). The
*prev segment* is ``tau_b`` after the junction, i.e. the first K steps of the
backward walk read forward; its P_B log-probs are those the walk sampled,
its P_F log-probs are evaluated; the recon's P_F log-probs are those sampled,
its P_B log-probs are evaluated. All four use the same ``policy_kwargs``
(temperature, epsilon, ...) as sampling, so the ratio is that of the actual
proposal.

The reverse move exists only if the junction rule, applied to tau' (length
L'), picks the same junction: ``L' - K(L') == n_prev``. Otherwise
``q(tau_b | tau') = 0`` and the proposal is rejected (``log alpha = -inf``).
This always holds when every terminal state has the same trajectory length
(BitSequence, NonAutoregressiveBitSequence) and for ``back_ratio=1``; on
HyperGrid with ``back_ratio < 1`` it rejects length-changing moves, without
which the chain measurably drifts away from R/Z. With this rule the chain on
terminal states leaves R(x)/Z exactly invariant, and with a perfect sampler
(``P_F(tau) = R(x) P_B(tau | x) / Z``) every reversible proposal is accepted.
Note: torchgfn's reference puts the forward proposal in the numerator
(``R' P_B(prev) P_F(new) / (R P_B(new) P_F(prev))``), the inverse of the MH
correction; gfn_dist uses the standard MH ratio above.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from gfn_dist.containers.splice import (
    Spliced,
    _merge_rows,
    check_forward_trajectories,
    reverse_backward_trajectories,
    splice_trajectories,
    splice_trajectories_loop,
)
from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.sampling import Sampler

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Tensor helpers
# ---------------------------------------------------------------------------


def resolve_back_steps(
    back_steps: int | torch.Tensor | None, back_ratio: float | None, lengths: torch.Tensor
) -> torch.Tensor:
    """Number of backward steps K of each trajectory, int64 ``(N,)``, clamped to ``lengths``.

    Args:
        back_steps: K, an int or an int tensor ``(N,)``, >= 0.
        back_ratio: K = ``ceil(back_ratio * length)``, in ``[0, 1]`` (ceil so that
            a positive ratio always moves at least one step on a non-trivial trajectory).
        lengths: int64 ``(N,)``, non-exit transitions from s0 to each terminal state.

    Raises:
        ValueError: unless exactly one of ``back_steps`` / ``back_ratio`` is given,
            or if it is out of range / of the wrong shape.
    """
    if (back_steps is None) == (back_ratio is None):
        raise ValueError("local search: give exactly one of back_steps or back_ratio")
    N = lengths.shape[0]
    if back_ratio is not None:
        r = float(back_ratio)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"back_ratio must be in [0, 1], got {back_ratio}")
        # float64 and a small tolerance: ceil(0.1 * 30) must be 3, not 4.
        k = torch.ceil(lengths.double() * r - 1e-9).clamp(min=0).long()
    elif isinstance(back_steps, torch.Tensor):
        if tuple(back_steps.shape) != (N,):
            raise ValueError(f"back_steps: expected an int or a tensor of shape ({N},), got {tuple(back_steps.shape)}")
        if back_steps.dtype.is_floating_point or back_steps.dtype == torch.bool:
            raise ValueError(f"back_steps: expected an integer tensor, got {back_steps.dtype}")
        if bool((back_steps < 0).any()):
            raise ValueError("back_steps: must be >= 0")
        k = back_steps.to(device=lengths.device, dtype=torch.long)
    else:
        if int(back_steps) != back_steps or back_steps < 0:  # type: ignore[arg-type]  # back_steps is given when back_ratio is not
            raise ValueError(f"back_steps must be a non-negative int, got {back_steps!r}")
        k = torch.full((N,), int(back_steps), dtype=torch.long, device=lengths.device)
    return torch.minimum(k, lengths)


# ---------------------------------------------------------------------------
# Splice: prefix of prev + reconstructed suffix
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Policy evaluation on stored transitions
# ---------------------------------------------------------------------------
def _eval_log_probs(
    estimator, env, states_TN: torch.Tensor, actions_TN: torch.Tensor, mask_TN: torch.Tensor,
    conditions: torch.Tensor | None, want_outputs: bool, policy_kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """log-probs of ``actions_TN`` at ``states_TN`` where ``mask_TN``, one batched call.

    Returns ``(log_probs (T, N), raw outputs (T, N, n_out) | None)``, 0 outside the mask.

    Raises:
        ValueError: if an action lies outside the policy's mask (naming (step, trajectory) pairs).
    """
    T, N = actions_TN.shape
    dev = states_TN.device
    lp_TN = torch.zeros((T, N), device=dev)
    out_TN = None
    M = int(mask_TN.sum())
    if M == 0:
        if want_outputs:
            n_out = estimator.expected_output_dim
            out_TN = torch.zeros((T, N, n_out), device=dev)
        return lp_TN, out_TN
    cond = None if conditions is None else conditions.unsqueeze(0).expand(T, *conditions.shape)[mask_TN]
    ctx = estimator.init_context(M, dev, cond)
    dist, ctx = estimator.compute_dist(env.States(states_TN[mask_TN]), ctx, None, want_outputs, **policy_kwargs)
    lp = dist.log_prob(actions_TN[mask_TN])
    if bool(torch.isinf(lp).any()):
        pairs = torch.nonzero(mask_TN)[torch.isinf(lp)][:10].tolist()
        raise ValueError(f"local search: actions outside the policy's mask at (step, trajectory) {pairs}")
    lp_TN = lp_TN.to(lp.dtype)
    lp_TN[mask_TN] = lp
    if want_outputs:
        raw = estimator.get_current_estimator_output(ctx)
        out_TN = torch.zeros((T, N, *raw.shape[1:]), dtype=raw.dtype, device=dev)
        out_TN[mask_TN] = raw
    return lp_TN, out_TN


# ---------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------
@dataclass
class LocalSearchProposal:
    """One round of back-and-forth proposals (see the module doc).

    Attributes:
        prev_trajectories: tau_b, the fresh P_B trajectories read forward, ending in
            the input's terminal states, ``N`` rows.
        new_trajectories: tau' = ``tau_b[:n_prev]`` + recon, with ``log_probs``
            (P_F, under the sampling ``policy_kwargs``) when requested.
        n_prev: int64 ``(N,)``, shared prefix length; the junction is ``states[n_prev]``.
        back_steps: int64 ``(N,)``, K actually walked back (``length - n_prev``).
        prev_segment_log_pf / prev_segment_log_pb: float ``(N,)``, Σ log P_F / Σ log P_B
            over tau_b's transitions after the junction (exit included in P_F).
        new_segment_log_pf / new_segment_log_pb: the same over the recon segment.
            All four are None for greedy search (not computed).
        reversible: bool ``(N,)``, whether the junction rule applied to tau' picks the same
            junction (else ``log_accept_ratio`` is ``-inf``); None for greedy search.
        log_accept_ratio: float ``(N,)``, ``min(0, log alpha)``; None for greedy search.
    """

    prev_trajectories: Trajectories
    new_trajectories: Trajectories
    n_prev: torch.Tensor
    back_steps: torch.Tensor
    prev_segment_log_pf: torch.Tensor | None = None
    prev_segment_log_pb: torch.Tensor | None = None
    new_segment_log_pf: torch.Tensor | None = None
    new_segment_log_pb: torch.Tensor | None = None
    reversible: torch.Tensor | None = None
    log_accept_ratio: torch.Tensor | None = None


class LocalSearchSampler(Sampler):
    """Sampler with back-and-forth local search (Zhang et al. 2022, arXiv:2202.01361;
    Kim et al. 2023, arXiv:2310.02710). See the module doc for the algorithm.

    Args:
        pf_estimator: forward policy (``self.estimator``), vectorized.
        pb_estimator: backward policy; ``self.backward_sampler = Sampler(pb_estimator)``.

    Raises:
        ValueError: if an estimator is not vectorized (recurrent policies cannot
            resume a rollout from a junction state: their carry is not there),
            or ``pb_estimator`` is not a backward estimator.
    """

    def __init__(self, pf_estimator, pb_estimator):
        super().__init__(pf_estimator)
        for name, est in (("pf_estimator", pf_estimator), ("pb_estimator", pb_estimator)):
            if not getattr(est, "is_vectorized", True):
                raise ValueError(f"LocalSearchSampler: {name} must be a vectorized (non-recurrent) policy")
        if not getattr(pb_estimator, "is_backward", False):
            raise ValueError("LocalSearchSampler: pb_estimator must have is_backward=True")
        self.backward_sampler = Sampler(pb_estimator)

    @torch.no_grad()
    def propose(
        self,
        env,
        trajectories: Trajectories,
        save_estimator_outputs: bool = False,
        save_logprobs: bool = False,
        back_steps: int | torch.Tensor | None = None,
        back_ratio: float | None = None,
        use_metropolis_hastings: bool = False,
        debug: bool = False,
        **policy_kwargs,
    ) -> LocalSearchProposal:
        """Steps 1-3 of the search (backward walk, reconstruction, splice) and the MH ratio.

        Same arguments as ``local_search``.

        Returns:
            A ``LocalSearchProposal``.

        Raises:
            ValueError: on backward input trajectories or bad ``back_steps`` / ``back_ratio``.
            RuntimeError: in ``debug`` mode, if the vectorized splice disagrees with the loop
                or a new trajectory is invalid.
        """
        if trajectories.is_backward:
            raise ValueError("local_search: expected forward trajectories, got backward ones")
        pf, pb = self.estimator, self.backward_sampler.estimator
        cond = trajectories.conditions
        x = trajectories.terminating_states
        # 1. Fresh backward walk x -> s0 with P_B, read forward.
        bwd = self.backward_sampler.sample_trajectories(
            env, states=x, conditions=cond, save_logprobs=True, **policy_kwargs
        )
        bwd.log_rewards = trajectories.log_rewards
        prev, prev_log_pb = reverse_backward_trajectories(env, bwd)
        length = bwd.terminating_idx
        K = resolve_back_steps(back_steps, back_ratio, length)
        n_prev = length - K
        n_idx = torch.arange(len(x), device=x.device)
        junction = bwd.states_tensor[K, n_idx]

        mh = use_metropolis_hastings
        want_lp = save_logprobs or mh
        # P_F of tau_b: on every transition when the prefix's log-probs are kept, else on the segment only.
        prev_ac = prev.actions_tensor[..., 0]
        t_prev = torch.arange(prev.max_length, device=x.device).unsqueeze(1)
        prev_mask = prev_ac >= 0
        if not (save_logprobs or save_estimator_outputs):
            prev_mask = prev_mask & (t_prev >= n_prev.unsqueeze(0))
        prev_log_pf, prev_out = None, None
        if want_lp or save_estimator_outputs:
            prev_log_pf, prev_out = _eval_log_probs(
                pf, env, prev.states_tensor[:-1], prev_ac, prev_mask, cond, save_estimator_outputs, policy_kwargs
            )

        # 2. Forward reconstruction from the junction with P_F.
        recon = Sampler.sample_trajectories(
            self, env, states=env.States(junction), conditions=cond,
            save_estimator_outputs=save_estimator_outputs, save_logprobs=want_lp, **policy_kwargs,
        )  # fmt: skip

        # 3. Splice prefix + recon.
        prev_fields, recon_fields = [], []
        if save_logprobs:
            prev_fields.append(prev_log_pf)
            recon_fields.append(recon.log_probs)
        if save_estimator_outputs:
            prev_fields.append(prev_out)
            recon_fields.append(recon.estimator_outputs)
        args = (
            n_prev, prev.states_tensor, prev_ac, recon.states_tensor, recon.actions_tensor[..., 0],
            recon.terminating_idx, env.sf, prev_fields, recon_fields,
        )  # fmt: skip
        sp = splice_trajectories(*args)  # type: ignore[arg-type]  # the fields exist under the save flags
        fields = list(sp.fields)
        new = Trajectories(
            env, sp.states, sp.actions.unsqueeze(-1), sp.terminating_idx, recon.log_rewards,
            fields.pop(0) if save_logprobs else None, fields.pop(0) if save_estimator_outputs else None,
            is_backward=False, conditions=cond,
        )  # fmt: skip
        if debug:
            self._debug_checks(env, args, sp, prev, recon, n_prev, new)

        proposal = LocalSearchProposal(prev, new, n_prev, K)
        if mh:
            seg = t_prev >= n_prev.unsqueeze(0)
            proposal.prev_segment_log_pf = (prev_log_pf * seg).sum(0)  # type: ignore[operator]  # prev_log_pf is computed when mh
            proposal.prev_segment_log_pb = (prev_log_pb * seg).sum(0)
            proposal.new_segment_log_pf = recon.log_probs.sum(0)  # type: ignore[union-attr]  # recon.log_probs is saved when mh
            r_ac = recon.actions_tensor[..., 0]
            r_mask = (r_ac >= 0) & (r_ac != env.n_actions - 1)
            recon_states = recon.states_tensor[1:]
            recon_log_pb, _ = _eval_log_probs(pb, env, recon_states, r_ac, r_mask, cond, False, policy_kwargs)
            proposal.new_segment_log_pb = recon_log_pb.sum(0)
            log_alpha = (
                new.log_rewards
                + proposal.new_segment_log_pb
                + proposal.prev_segment_log_pf
                - trajectories.log_rewards
                - proposal.prev_segment_log_pb
                - proposal.new_segment_log_pf
            )
            # The reverse move must pick the same junction: the junction rule applied to
            # tau' (length L') has to give n_prev again, else q(tau_b | tau') = 0.
            new_length = new.terminating_idx - 1
            proposal.reversible = (new_length - resolve_back_steps(back_steps, back_ratio, new_length)) == n_prev
            log_alpha = torch.where(proposal.reversible, log_alpha, torch.full_like(log_alpha, -math.inf))
            proposal.log_accept_ratio = log_alpha.clamp(max=0.0)
        return proposal

    @staticmethod
    def _debug_checks(env, args, sp: Spliced, prev, recon, n_prev, new) -> None:
        n_idx = torch.arange(len(n_prev), device=n_prev.device)
        if not torch.equal(prev.states_tensor[n_prev, n_idx], recon.states_tensor[0]):
            raise RuntimeError("local search debug: recon does not start at the junction state")
        ref = splice_trajectories_loop(*args)
        same = (
            torch.equal(sp.states, ref.states)
            and torch.equal(sp.actions, ref.actions)
            and torch.equal(sp.terminating_idx, ref.terminating_idx)
            and all(torch.equal(a, b) for a, b in zip(sp.fields, ref.fields, strict=True))
        )
        if not same:
            raise RuntimeError("local search debug: vectorized splice differs from the per-trajectory loop")
        try:
            check_forward_trajectories(env, new)
            check_forward_trajectories(env, prev)
        except ValueError as e:
            raise RuntimeError(f"local search debug: invalid trajectories: {e}") from e

    @torch.no_grad()
    def local_search(
        self,
        env,
        trajectories: Trajectories,
        save_estimator_outputs: bool = False,
        save_logprobs: bool = False,
        back_steps: int | torch.Tensor | None = None,
        back_ratio: float | None = None,
        use_metropolis_hastings: bool = True,
        debug: bool = False,
        **policy_kwargs,
    ) -> tuple[Trajectories, torch.Tensor]:
        """One back-and-forth search of every trajectory (see the module doc).

        Args:
            env: the environment.
            trajectories: N forward trajectories to refine.
            save_estimator_outputs: keep raw P_F outputs ``(T, N, n_out)`` of the result.
            save_logprobs: keep log P_F ``(T, N)`` of every action of the result (under
                ``policy_kwargs``; for the prefix, evaluated rather than sampled). Kept
                rows use the input's log-probs, computed if the input has none.
            back_steps: K, an int or int64 tensor ``(N,)``; clamped to each trajectory's length.
            back_ratio: K = ``ceil(back_ratio * length)``, ``length`` = non-exit
                transitions of the backward walk (= the input's on graded DAGs).
                Give exactly one of ``back_steps`` / ``back_ratio``.
            use_metropolis_hastings: MH acceptance (module doc; default True, as torchgfn's
                ``local_search``; ``sample_trajectories`` defaults to False, as torchgfn's);
                otherwise greedy: accept iff ``log R(x') >= log R(x)``.
            debug: check the vectorized splice against ``splice_trajectories_loop``
                and replay the new trajectories (slow).
            **policy_kwargs: exploration parameters for both policies (temperature, epsilon, ...).

        Returns:
            ``(trajectories, updated)``: N forward trajectories (accepted rows are the
            spliced trajectories, other rows the input unchanged) and bool ``(N,)``.

        Raises:
            ValueError: on backward input, or unless exactly one of ``back_steps`` /
                ``back_ratio`` is given (or it is out of range).
            RuntimeError: in ``debug`` mode, on an internal inconsistency.
        """
        proposal = self.propose(
            env, trajectories, save_estimator_outputs, save_logprobs, back_steps, back_ratio,
            use_metropolis_hastings, debug, **policy_kwargs,
        )  # fmt: skip
        new = proposal.new_trajectories
        if use_metropolis_hastings:
            u = torch.rand(len(trajectories), device=trajectories.device)
            updated = u.log() < proposal.log_accept_ratio  # type: ignore[operator]  # log_accept_ratio is set when mh
        else:
            updated = new.log_rewards >= trajectories.log_rewards
        old = trajectories
        need_lp = save_logprobs and old.log_probs is None
        need_out = save_estimator_outputs and old.estimator_outputs is None
        if need_lp or need_out:  # kept rows need the fields too
            ac = old.actions_tensor[..., 0]
            lp, est_out = _eval_log_probs(
                self.estimator, env, old.states_tensor[:-1], ac, ac >= 0, old.conditions, need_out, policy_kwargs
            )
            old = Trajectories(
                env, old.states_tensor, old.actions_tensor, old.terminating_idx, old.log_rewards,
                lp if need_lp else old.log_probs, est_out if need_out else old.estimator_outputs,
                conditions=old.conditions,
            )  # fmt: skip
        out = _merge_rows(env, updated, new, old)
        if not save_logprobs:
            out.log_probs = None
        if not save_estimator_outputs:
            out.estimator_outputs = None
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("local search: accepted %d / %d", int(updated.sum()), len(updated))
        return out, updated

    def sample_trajectories(
        self,
        env,
        n: int | None = None,
        states=None,
        conditions: torch.Tensor | None = None,
        save_estimator_outputs: bool = False,
        save_logprobs: bool = False,
        n_local_search_loops: int = 0,
        back_steps: int | torch.Tensor | None = None,
        back_ratio: float | None = None,
        use_metropolis_hastings: bool = False,
        **policy_kwargs,
    ) -> Trajectories:
        """Samples N trajectories with P_F, then refines them ``n_local_search_loops`` times.

        Loop k searches the trajectories loop k-1 returned (its accepted or kept
        rows), so each row is a chain of local-search moves.

        Args:
            env, n, states, conditions, save_estimator_outputs, save_logprobs,
            **policy_kwargs: as ``Sampler.sample_trajectories``.
            n_local_search_loops: number of searches (>= 0).
            back_steps, back_ratio, use_metropolis_hastings: as ``local_search``.

        Returns:
            ``N * (1 + n_local_search_loops)`` trajectories: the initial batch, then
            one block of N per loop, in order.

        Raises:
            ValueError: on a negative ``n_local_search_loops``, or (when it is > 0)
                unless exactly one of ``back_steps`` / ``back_ratio`` is given.
        """
        if n_local_search_loops < 0:
            raise ValueError(f"n_local_search_loops must be >= 0, got {n_local_search_loops}")
        if n_local_search_loops > 0 and (back_steps is None) == (back_ratio is None):
            raise ValueError("local search: give exactly one of back_steps or back_ratio")
        current = super().sample_trajectories(
            env, n, states, conditions, save_estimator_outputs, save_logprobs, **policy_kwargs
        )
        if n_local_search_loops == 0:
            return current
        blocks = [current]
        for _ in range(n_local_search_loops):
            current, _ = self.local_search(
                env, current, save_estimator_outputs, save_logprobs, back_steps, back_ratio,
                use_metropolis_hastings, **policy_kwargs,
            )  # fmt: skip
            blocks.append(current)
        return Trajectories.cat(blocks)
