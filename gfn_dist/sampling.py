"""Samplers: roll out trajectories with a policy estimator (seed document 003).

``Sampler`` follows torchgfn's API; its forward rollout is written for speed:
buffers are preallocated to ``env.max_traj_len``, every step runs the policy on
the whole batch (finished rows hold the sink state and are masked; at small
batch sizes one dense call is cheaper than gathering the active rows), there is
one host sync per step (the all-done check), no per-state Python objects, and
the rollout runs under ``torch.no_grad`` (the trainer's path). The exception is
``save_logprobs=True`` under grad mode: then the rollout keeps its autograd
graph, so that the saved log-probs are differentiable (torchgfn's semantics:
``loss(..., recalculate_all_logprobs=False)`` trains P_F on-policy).

``Sampler(estimator, compile=True)`` runs the forward rollout of the stock
policies (the ``masked_logits_fn`` shortcut: no conditions, no saved log-probs or
outputs, no epsilon) as equal chunks of at most ``compile_chunk_steps`` steps,
each chunk one ``torch.compile``-d function (policy, mask, Gumbel-max sampling,
environment step, padding, action counts and terminating states unrolled; a C++
wrapper calls its kernels). A small-batch rollout is launch-bound, and the
compiled chunk drops the per-op dispatch cost of the ~10 small ops around each
policy call: HyperGrid(2, 8) at B=16 samples in about half the time, close to
the cost of the policy's forwards alone. The first call per (environment, batch
size, exploration kwargs) compiles (~15-30 s on 2 cores, a few seconds from
inductor's on-disk cache; needs a C++ compiler); a chunk runs its steps even
after every row is done (the all-done check is per chunk). On a compile error it samples eagerly.

``LocalSearchSampler`` (back-and-forth local search) is in ``gfn_dist.local_search``;
``gfn_dist.samplers`` (torchgfn's import path) re-exports both.
"""

from __future__ import annotations

import itertools
import types
import warnings
from typing import Any, ClassVar

import torch

from gfn_dist.actions import Actions
from gfn_dist.compiled_rollout import Chunk
from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.policy import MaskedCategorical
from gfn_dist.states import States

_chunk_ids = itertools.count()


def _action_indices(a: torch.Tensor, n: int) -> torch.Tensor:
    """Sampled actions as indices ``(n,)``: a distribution's ``(n, 1)`` samples (torchgfn's
    categorical shape) or ``(n,)`` ones (e.g. ``torch.distributions.Categorical``)."""
    return a.reshape(n) if a.dim() == 2 and a.shape[-1] == 1 else a


def _keep_graph(save_logprobs: bool) -> bool:
    """Whether a rollout records autograd: only to return differentiable saved log-probs."""
    return save_logprobs and torch.is_grad_enabled()


class Sampler:
    """Estimator-driven sampler.

    Args:
        estimator: a policy estimator exposing the ``PolicyMixin`` API. Its
            ``is_backward`` picks the direction of ``sample_trajectories``.
        compile: run forward rollouts of stock policies as ``torch.compile``-d
            chunks (module doc). Same distribution; for a fixed seed the same
            trajectories up to floating-point ties.
    """

    #: Steps per compiled rollout chunk (``compile=True``): longer chunks compile longer
    #: and may run more steps past the last exit; shorter ones check for completion more often.
    compile_chunk_steps: int = 16

    #: Inductor options of the compiled chunks on CPU: a C++ wrapper calls the chunk's kernels
    #: and matmuls with less overhead than the default Python wrapper (the chunk then costs
    #: about the policy's own forwards; HyperGrid(2, 8), B=16: 15 steps in 0.55 vs 0.62 ms).
    compile_options: ClassVar[dict] = {"cpp_wrapper": True}
    #: The same on other devices (CUDA): inductor's defaults, its most used path.
    compile_options_accelerator: ClassVar[dict] = {}

    def __init__(self, estimator, compile: bool = False):
        self.estimator = estimator
        self.compile = bool(compile)
        self._chunks: dict = {}  # (env id, batch shape, device, kwargs) -> (env, compiled chunk)
        self._step_tensors: dict = {}  # (step, device) -> 0-dim tensor

    def sample_actions(
        self,
        env,
        states: States,
        conditions: torch.Tensor | None = None,
        save_estimator_outputs: bool = False,
        save_logprobs: bool = False,
        ctx: Any = None,
        **policy_kwargs,
    ) -> tuple[Actions, torch.Tensor | None, torch.Tensor | None]:
        """Samples one action per state.

        Args:
            env: the environment.
            states: ``(N, *state_shape)``.
            conditions: optional ``(N, cond_dim)``.
            save_estimator_outputs: also return the raw outputs ``(N, n_out)``.
            save_logprobs: also return log-probs ``(N,)``.
            ctx: a rollout context to reuse (recurrent policies); a new one otherwise. Its
                ``current_estimator_output`` (the previous step's) is cleared first.
            **policy_kwargs: exploration parameters (temperature, sf_bias, epsilon).

        Returns:
            ``(Actions (N, 1), log_probs (N,) | None, estimator_outputs | None)``.
        """
        est = self.estimator
        if ctx is None:
            ctx = est.init_context(len(states), states.device, conditions)
        else:  # a reused context holds the previous step's output: not the one for these states
            ctx.current_estimator_output = None
        with torch.set_grad_enabled(_keep_graph(save_logprobs)):
            dist, ctx = est.compute_dist(states, ctx, None, save_estimator_outputs, **policy_kwargs)
            a = _action_indices(dist.sample(), len(states))
            lp = None
            if save_logprobs:
                lp, ctx = est.log_probs(a, dist, ctx, None, vectorized=False)
        out = est.get_current_estimator_output(ctx) if save_estimator_outputs else None
        return env.Actions(a.unsqueeze(-1)), lp, out

    def sample_trajectories(
        self,
        env,
        n: int | None = None,
        states: States | None = None,
        conditions: torch.Tensor | None = None,
        save_estimator_outputs: bool = False,
        save_logprobs: bool = False,
        **policy_kwargs,
    ) -> Trajectories:
        """Rolls out complete trajectories.

        Args:
            env: the environment.
            n: number of trajectories from s0 (forward) when ``states`` is None.
            states: starting states ``(N, *state_shape)``; for a backward
                estimator, the terminal states to sample back from.
            conditions: optional ``(N, cond_dim)`` for conditional policies.
            save_estimator_outputs: keep raw outputs ``(T, N, n_out)``.
            save_logprobs: keep the behaviour log-probs ``(T, N)``. Under grad mode they
                carry the policy's autograd graph (on-policy training without
                recomputation); under ``torch.no_grad()`` they are plain tensors.
            **policy_kwargs: exploration parameters forwarded to the estimator.

        Returns:
            ``Trajectories`` (``is_backward`` set for a backward estimator; its
            log-rewards are those of the terminal states).

        Raises:
            ValueError: if neither or both of ``n`` and ``states`` are given, or a
                policy samples an action its mask forbids (naming the rows).
        """
        if (n is None) == (states is None):
            raise ValueError("sample_trajectories: give exactly one of n or states")
        if states is None:
            states = env.reset(n)
        with torch.set_grad_enabled(_keep_graph(save_logprobs)):
            if getattr(self.estimator, "is_backward", False):
                return self._sample_backward(
                    env, states, conditions, save_estimator_outputs, save_logprobs, policy_kwargs
                )
            return self._sample_forward(env, states, conditions, save_estimator_outputs, save_logprobs, policy_kwargs)

    #: Smallest working batch worth compacting: below this, a policy call costs the
    #: same whatever the number of rows (launch-bound), so dropping finished rows saves nothing.
    min_rows_to_compact: int = 32

    def _sample_forward(self, env, states, conditions, save_estimator_outputs, save_logprobs, policy_kwargs):
        est = self.estimator
        x = states.tensor
        compiled = self.compile and conditions is None and not save_estimator_outputs and not save_logprobs
        if compiled:
            out = self._sample_forward_compiled(env, x, policy_kwargs)
            if out is not None:
                return out
        # The tensor-level shortcut of the stock estimators (no States / distribution
        # objects per step); None: the general compute_dist path.
        masked_logits = None
        if conditions is None and not save_estimator_outputs:
            fn = getattr(est, "masked_logits_fn", None)
            masked_logits = fn(env, policy_kwargs) if fn is not None else None
        N, dev = x.shape[0], x.device
        T_max = env.max_traj_len
        sf = env.sf
        state_dims = (1,) * len(env.state_shape)
        states_buf = x.new_empty((T_max + 1, N, *env.state_shape))
        states_buf[0] = x
        actions_buf = torch.empty((T_max, N), dtype=torch.long, device=dev)
        lp_buf = torch.empty((T_max, N), device=dev) if save_logprobs else None
        # Gumbel noise for the whole rollout in one kernel (used with MaskedCategorical).
        log_noise = torch.empty((T_max, N, env.n_actions), device=dev).exponential_().log_()
        ctx = est.init_context(N, dev, conditions)
        # Finished rows are dropped from the working batch once at least half of it is
        # done (stateless policies only: a recurrent carry's layout is the policy's own).
        can_compact = getattr(est, "is_vectorized", True) and not save_estimator_outputs
        rows = None  # working rows (None: the whole batch, written in place)
        xw, nw = x, N
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        # Per-step views made once (a Python list index is cheaper than a tensor select).
        noise_t, states_t, actions_t = log_noise.unbind(0), states_buf.unbind(0), actions_buf.unbind(0)
        exit_t = env.Actions.exit_action[0].to(dev)  # 0-dim: compares cheaper than a Python int
        small = not can_compact or self.min_rows_to_compact > N  # never compacted: all-done check only
        done_v = done.view(N, *state_dims)  # done is updated in place until compaction: the view stays current
        T, n_active = 0, N
        for t in range(T_max):
            # Every working row is sampled; finished rows hold sf and are padded after the loop.
            if masked_logits is not None:
                # Sampled from logits masked by env.forward_mask: always valid.
                logits = masked_logits(xw)
                a = torch.argmax(logits - noise_t[t][:nw], dim=-1, out=actions_t[t] if rows is None else None)
                # A copy of the index: ``a`` views the action buffer, padded in place later
                # (autograd keeps the index of a differentiable gather).
                lp = logits.log_softmax(-1).gather(-1, a.unsqueeze(-1).clone()).squeeze(-1) if save_logprobs else None
            else:
                st = env.States(xw)
                ctx.current_estimator_output = None  # this step's output, not the previous one's
                dist, ctx = est.compute_dist(st, ctx, None, save_estimator_outputs, **policy_kwargs)
                if isinstance(dist, MaskedCategorical) and dist._raw_logits.shape == (nw, env.n_actions):
                    a = dist.sample_with_log_noise(noise_t[t][:nw], out=actions_t[t] if rows is None else None)
                else:
                    a = _action_indices(dist.sample(), nw)
                    if rows is None:
                        actions_buf[t] = a
                if getattr(dist, "mask", None) is not st.forward_masks:
                    # Not built from this batch's masks (a custom distribution): check its actions
                    # now, before an invalid action produces a state the environment cannot hold.
                    good = st.forward_masks.gather(-1, a.unsqueeze(-1)).squeeze(-1) | done
                    if not bool(good.all()):
                        bad = torch.nonzero(~good).flatten()
                        bad_rows = (bad if rows is None else rows[bad]).tolist()[:20]
                        raise ValueError(
                            f"invalid action: the policy sampled actions outside the forward mask "
                            f"in trajectories {bad_rows} at step {t}"
                        )
                lp = est.log_probs(a, dist, ctx, None, vectorized=True)[0] if save_logprobs else None
            done |= a == exit_t
            nxt = env.step_tensor(xw, a)
            T = t + 1
            if rows is None:
                xw = torch.where(done_v, sf, nxt, out=states_t[t + 1])
                if save_logprobs:
                    lp_buf[t] = lp  # type: ignore[index, assignment]  # lp_buf and lp exist when save_logprobs
                if small:  # the one host sync per step
                    if bool(done.all()):
                        n_active = 0
                        break
                    continue
            else:
                xw = torch.where(done.view(nw, *state_dims), sf, nxt)
                states_buf[t + 1].index_copy_(0, rows, xw)
                actions_buf[t].index_copy_(0, rows, a)
                if save_logprobs:
                    lp_buf[t].index_copy_(0, rows, lp)  # type: ignore[index, arg-type]  # lp_buf and lp exist when save_logprobs
            n_active = nw - int(done.count_nonzero())  # the one host sync per step
            if n_active == 0:
                break
            if can_compact and nw >= self.min_rows_to_compact and 2 * n_active <= nw:
                rows, xw, done, nw = self._compact(
                    rows, t, done, xw, n_active, states_buf, actions_buf, lp_buf, sf, ctx
                )
        if T_max == T and n_active:
            raise RuntimeError(f"trajectories did not exit within env.max_traj_len={T_max} steps")
        est_out = None
        if save_estimator_outputs:
            est_out = torch.stack(ctx.trajectory_estimator_outputs[:T], dim=0)
        return self._finish_forward(env, states_buf, actions_buf, lp_buf, T, N, est_out, conditions)

    @staticmethod
    def _finish_forward(env, states_buf, actions_buf, lp_buf, T, N, est_out, conditions):
        """Padding and log-rewards of a forward rollout of ``T`` steps; the ``Trajectories``."""
        exit_idx = env.n_actions - 1
        dev = actions_buf.device
        # Padding, once per rollout: steps taken from sf get the dummy action and log-prob 0.
        # Step t of a row is padding iff the row exited before t (cheaper than comparing states with sf).
        exited = actions_buf[:T] == exit_idx
        finished_TN = (exited.cumsum(0) - exited.long()) > 0
        actions_TN = actions_buf[:T].masked_fill_(finished_TN, -1)
        term = T - finished_TN.sum(0)
        n_idx = torch.arange(N, device=dev)
        log_rewards = env.log_reward_tensor(states_buf[term - 1, n_idx])
        log_probs = lp_buf[:T].masked_fill_(finished_TN, 0.0) if lp_buf is not None else None
        return Trajectories(
            env,
            states_buf[: T + 1],
            actions_TN.unsqueeze(-1),
            term,
            log_rewards,
            log_probs,
            est_out,
            is_backward=False,
            conditions=conditions,
        )

    def _chunk_fn(self, env, x: torch.Tensor, policy_kwargs: dict, key, with_rewards: bool = True):
        """The compiled chunk for this environment, batch of states ``x`` and exploration
        kwargs (built once, cached under ``key``); None if the policy has no tensor shortcut.

        ``with_rewards``: the chunk also returns the log-rewards of its terminating states
        (dropped, and computed eagerly, if the environment's reward does not compile).
        """
        fn = getattr(self.estimator, "masked_logits_fn", None)
        masked_logits = fn(env, policy_kwargs) if fn is not None else None
        if masked_logits is None:
            self._chunks[key] = (env, None)
            return None
        masked_logits(x)  # eager calls: the closures' lazily made constants exist before tracing
        if with_rewards:
            env.log_reward_tensor(x)
        sf, exit_idx, state_dims = env.sf, env.n_actions - 1, (1,) * len(env.state_shape)
        T_max = env.max_traj_len

        def chunk(x: torch.Tensor, term: torch.Tensor, last: torch.Tensor, t0: torch.Tensor, log_noise: torch.Tensor):
            """``K = log_noise.shape[0]`` steps from ``x``.

            ``t0``: 0-dim, the step index of ``x``; ``term (N,)``: each row's number of
            actions, ``T_max + 1`` while the row has not exited; ``last (N, *)``: its last
            state before sf (the terminating state; any valid state before the exit).
            Returns ``(states (K + 1, N, *) from x on, actions (K, N) with -1 padding, term,
            last, log R(last) (N,) or None)``.
            """
            xs, acts = [x], []
            done = term <= T_max
            for k in range(log_noise.shape[0]):
                a = torch.argmax(masked_logits(x) - log_noise[k], dim=-1)
                exits = (a == exit_idx) & ~done
                acts.append(torch.where(done, -1, a))
                term = torch.where(exits, t0 + k + 1, term)
                last = torch.where(exits.view(exits.shape + state_dims), x, last)
                done = done | exits
                x = torch.where(done.view(done.shape + state_dims), sf, env.step_tensor(x, a))
                xs.append(x)
            log_rewards = env.log_reward_tensor(last) if with_rewards else None
            return torch.stack(xs), torch.stack(acts), term, last, log_rewards

        n_chunks = -(-T_max // max(1, self.compile_chunk_steps))
        # A fresh code object per chunk: dynamo caches compiled graphs per code object and
        # guards the closure's objects by id, so a chunk sharing its code with one built for
        # an environment since freed could reuse that graph (or hit the recompile limit).
        code = chunk.__code__.replace(co_name=f"chunk_{next(_chunk_ids)}")
        chunk = types.FunctionType(code, chunk.__globals__, code.co_name, None, chunk.__closure__)
        options = self.compile_options if x.device.type == "cpu" else self.compile_options_accelerator
        entry = Chunk(
            torch.compile(chunk, dynamic=False, options=dict(options)), n_chunks, -(-T_max // n_chunks), with_rewards
        )
        self._chunks[key] = (env, entry)  # the env is kept: its id stays unique while cached
        return entry

    def _compile_failed(self, err: Exception) -> None:
        warnings.warn(
            f"Sampler(compile=True): torch.compile failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); sampling eagerly",
            stacklevel=5,
        )
        self.compile, self._chunks = False, {}

    def _sample_forward_compiled(self, env, x, policy_kwargs):
        """Forward rollout by compiled chunks (module doc); None if the policy has no tensor
        shortcut or compiling failed (then the caller samples eagerly).

        ``env.max_traj_len`` steps are split into equal chunks of at most
        ``compile_chunk_steps`` (one compiled shape; at most one step per chunk past the end).
        """
        N, dev = x.shape[0], x.device
        key = (id(env), tuple(x.shape), dev, tuple(sorted((k, repr(v)) for k, v in policy_kwargs.items())))
        cached = self._chunks.get(key)
        entry = cached[1] if cached is not None and cached[0] is env else self._chunk_fn(env, x, policy_kwargs, key)
        if entry is None:
            return None
        T_max, K = env.max_traj_len, entry.steps
        log_noise = torch.empty((entry.n_chunks * K, N, env.n_actions), device=dev).exponential_().log_()
        term = torch.full((N,), T_max + 1, dtype=torch.long, device=dev)
        last = x
        states, actions = [], []
        for c in range(entry.n_chunks):
            args = (x, term, last, self._step_index(c * K, dev), log_noise[c * K : (c + 1) * K])
            try:
                xs, acts, term, last, log_rewards = entry.fn(*args)
            except Exception as err:
                if not entry.with_rewards:
                    return self._compile_failed(err)
                # Retry with the rewards computed eagerly (same noise: same trajectories).
                entry = self._chunk_fn(env, x, policy_kwargs, key, with_rewards=False)
                try:
                    xs, acts, term, last, log_rewards = entry.fn(*args)
                except Exception as err2:
                    return self._compile_failed(err2)
            states.append(xs if c == 0 else xs[1:])
            actions.append(acts)
            x = xs[-1]
            T = int(term.max()) if N else 0  # the one host sync per chunk
            if T_max >= T:
                break
        else:
            raise RuntimeError(f"trajectories did not exit within env.max_traj_len={T_max} steps")
        if log_rewards is None:
            log_rewards = env.log_reward_tensor(last)
        states_t = states[0] if len(states) == 1 else torch.cat(states)
        actions_t = actions[0] if len(actions) == 1 else torch.cat(actions)
        return Trajectories(
            env,
            states_t[: T + 1],
            actions_t[:T].unsqueeze(-1),
            term,
            log_rewards,
            None,
            None,
            is_backward=False,
            conditions=None,
        )

    def _step_index(self, t: int, dev) -> torch.Tensor:
        """A cached 0-dim long tensor holding ``t`` (an input of the compiled chunks)."""
        key = (t, dev)
        out = self._step_tensors.get(key)
        if out is None:
            out = self._step_tensors[key] = torch.tensor(t, device=dev)
        return out

    @staticmethod
    def _compact(rows, t, done, xw, n_active, states_buf, actions_buf, lp_buf, sf, ctx):
        """Drops the finished rows from the working batch after step ``t``; returns ``(rows, xw, done, nw)``."""
        if rows is None:  # rows dropped from now on must read as padding
            states_buf[t + 2 :] = sf
            actions_buf[t + 1 :] = -1
            if lp_buf is not None:
                lp_buf[t + 1 :] = 0.0
        keep = torch.nonzero(~done).squeeze(1)
        rows = keep if rows is None else rows[keep]
        ctx.batch_size = n_active
        if ctx.conditions is not None:
            ctx.conditions = ctx.conditions[keep]
        return rows, xw[keep], done[keep], n_active

    def _sample_backward(self, env, states, conditions, save_estimator_outputs, save_logprobs, policy_kwargs):
        """Backward rollout from ``states`` to s0; computes only on the active rows."""
        est = self.estimator
        x = states.tensor
        N, dev = x.shape[0], x.device
        T_max = env.max_traj_len
        sf = env.sf
        states_list = [x]
        actions_list, lp_list = [], []
        done = env.States(x).is_initial_state
        term = torch.zeros(N, dtype=torch.long, device=dev)
        ctx = est.init_context(N, dev, conditions)
        shape = (-1,) + (1,) * len(env.state_shape)
        for t in range(T_max):
            if bool(done.all()):
                break
            active = ~done
            xa = x[active]
            st = env.States(xa)
            dist, ctx = est.compute_dist(st, ctx, active, save_estimator_outputs, **policy_kwargs)
            a = _action_indices(dist.sample(), len(st))
            valid = st.backward_masks.gather(-1, a.unsqueeze(-1)).squeeze(-1)
            if not bool(valid.all()):
                rows = torch.nonzero(active).flatten()[~valid].tolist()[:20]
                raise ValueError(f"invalid backward action sampled in trajectories {rows}")
            if save_logprobs:
                lp, ctx = est.log_probs(a, dist, ctx, active, vectorized=False)
                lp_list.append(lp)
            a_full = torch.full((N,), -1, dtype=torch.long, device=dev)
            a_full[active] = a
            x_new = torch.where(done.view(shape), sf, x).clone()
            x_new[active] = env.backward_step_tensor(xa, a)
            actions_list.append(a_full)
            states_list.append(x_new)
            reached = env.States(x_new).is_initial_state & active
            term.masked_fill_(reached, t + 1)
            done = done | reached
            x = x_new
        if not bool(done.all()):
            raise RuntimeError(f"backward trajectories did not reach s0 within {T_max} steps")
        T = len(actions_list)
        states_t = torch.stack(states_list, 0)
        actions_t = (
            torch.stack(actions_list, 0).unsqueeze(-1) if T else torch.empty((0, N, 1), dtype=torch.long, device=dev)
        )
        log_probs = (torch.stack(lp_list, 0) if T else torch.zeros(0, N, device=dev)) if save_logprobs else None
        est_out = torch.stack(ctx.trajectory_estimator_outputs, 0) if save_estimator_outputs and T else None
        log_rewards = env.log_reward_tensor(states.tensor)
        return Trajectories(
            env, states_t, actions_t, term, log_rewards, log_probs, est_out, is_backward=True, conditions=conditions
        )
