"""Recurrent (history-dependent) forward policies: LSTM / GRU with a threaded carry.

A recurrent policy conditions each action on the whole history of the
trajectory through a hidden state, the *carry*, that the policy threads from
step to step inside the rollout's ``RolloutContext``. The carry never leaves
the process that made it (it is not part of ``Trajectories`` nor of their
TensorDict); a learner recomputes log P_F of a stored trajectory by teacher
forcing: one LSTM / GRU call over the trajectory's whole token sequence.

Input representation (the choice made here)
-------------------------------------------
Module protocol (seed 001): ``module(tokens (N, T), carry) -> (logits (N, T, A),
new_carry)``, batch first, with ``module.init_carry(batch_size, device)``; float
features ``(N, T, V)`` may replace the tokens. Rollout calls it with T = 1 (one new
token per step, the carry threaded); teacher-forced recomputation calls it once
with the whole sequence (T = trajectory length) from the initial carry, or
``module.forward_sequence(tokens, carry0) -> logits`` when the module has that
optional fast path (e.g. it skips building the final carry).

Each rollout step feeds the sequence model ONE token, the index of the action
that led to the current state, against the carry; s0 gets a BOS token equal to
the exit index ``n_actions - 1`` (exit never leads to a non-sink state, so the
index is free). The per-step cost is therefore one RNN cell step, whatever the
trajectory length: the prefix is never re-fed. Tokens are computed from states
by a ``StepTokenizer`` (the estimator's preprocessor; ``gfn_dist.tokenizers``):

* ``LastWordTokenizer`` (``BitSequence``): the state alone identifies the last
  action, its last filled word.
* ``FilledPositionTokenizer`` (``NonAutoregressiveBitSequence``): the last
  action ``position * n_words + word`` is read from the difference between the
  previous state and the current one; the policy keeps the previous states in
  ``ctx.extras["prev_states"]`` (no change to the sampler needed).

Any other ``Preprocessor`` also works: the model then consumes the float
features of the newest state (still one step per call).

Shape legend: N trajectories, T steps (actions), H hidden size, L layers,
A actions (``n_actions``), V token vocabulary (``input_dim``).

Recurrent policies in GFlowNets: e.g. Malkin et al. 2022 (trajectory balance,
arXiv:2201.13259) train autoregressive sequence policies on bit sequences.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.policy import DiscretePolicyEstimator, PolicyMixin, RolloutContext
from gfn_dist.preprocessors import Preprocessor
from gfn_dist.tokenizers import (  # noqa: F401  (re-exported: part of this module's API)
    FilledPositionTokenizer,
    LastWordTokenizer,
    StepTokenizer,
    last_action_tokenizer,
)

Carry = dict  # dict[str, torch.Tensor], batch on dim ``carry_batch_dim``


# ----------------------------------------------------------------------------
# Sequence model
# ----------------------------------------------------------------------------
class RecurrentDiscreteSequenceModel(nn.Module):
    """LSTM / GRU over tokens: ``model(tokens (N, T), carry) -> (logits (N, T, output_dim), new_carry)``.

    The input projection is a table ``W (V, E)``: an int token t is embedded as
    ``W[t]``; float features ``f (..., V)`` as ``f @ W`` (the same map on one-hot
    rows), so the model also accepts the features of a ``Preprocessor``.

    Args:
        input_dim: V, the token vocabulary size (or the feature size).
        output_dim: logits per step (``n_actions`` for P_F).
        hidden_dim: H, the RNN hidden size.
        rnn_type: ``"lstm"`` (carry ``{"h", "c"}``) or ``"gru"`` (carry ``{"h"}``).
        num_layers: stacked RNN layers.
        embedding_dim: E, default H.
        dropout: dropout between RNN layers (when ``num_layers > 1``) and before the head.

    Raises:
        ValueError: on an unknown ``rnn_type`` or non-positive sizes.
    """

    carry_batch_dim = 1  # carry tensors are (num_layers, N, H)

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dim: int,
        rnn_type: str = "lstm",
        num_layers: int = 1,
        embedding_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        rnn_type = rnn_type.lower()
        if rnn_type not in ("lstm", "gru"):
            raise ValueError(f"RecurrentDiscreteSequenceModel: rnn_type must be 'lstm' or 'gru', got {rnn_type!r}")
        for name, v in (
            ("input_dim", input_dim),
            ("output_dim", output_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ):
            if int(v) < 1:
                raise ValueError(f"RecurrentDiscreteSequenceModel: {name} must be >= 1, got {v}")
        self.input_dim, self.output_dim, self.hidden_dim = int(input_dim), int(output_dim), int(hidden_dim)
        self.rnn_type, self.num_layers = rnn_type, int(num_layers)
        self.embedding_dim = int(embedding_dim or hidden_dim)
        self.embedding = nn.Embedding(self.input_dim, self.embedding_dim)
        rnn_cls = nn.LSTM if rnn_type == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            self.embedding_dim,
            self.hidden_dim,
            num_layers=self.num_layers,
            batch_first=True,
            dropout=float(dropout) if self.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(float(dropout))
        self.head = nn.Linear(self.hidden_dim, self.output_dim)

    def init_carry(self, batch_size: int, device) -> Carry:
        """Zero carry: ``{"h": (L, N, H)}`` (+ ``"c"`` for LSTM), float32."""
        shape = (self.num_layers, int(batch_size), self.hidden_dim)
        carry = {"h": torch.zeros(shape, device=device)}
        if self.rnn_type == "lstm":
            carry["c"] = torch.zeros(shape, device=device)
        return carry

    def _embed(self, inp: torch.Tensor) -> torch.Tensor:
        if inp.is_floating_point():
            return inp @ self.embedding.weight
        return self.embedding(inp)

    def _run(self, emb_NTE: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        if self.rnn_type == "lstm":
            y, (h, c) = self.rnn(emb_NTE, (carry["h"], carry["c"]))
            return self.head(self.dropout(y)), {"h": h, "c": c}
        y, h = self.rnn(emb_NTE, carry["h"])
        return self.head(self.dropout(y)), {"h": h}

    def forward(self, tokens: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        """T steps from ``carry`` (seed 001's protocol; rollouts use T = 1).

        Args:
            tokens: int64 ``(N, T)`` or float features ``(N, T, V)``.
            carry: from ``init_carry`` or the previous call.

        Returns:
            ``(logits (N, T, output_dim), new_carry)``.

        Raises:
            ValueError: if ``tokens`` is not ``(N, T)`` int64 or ``(N, T, V)`` float.
        """
        if tokens.dim() != (3 if tokens.is_floating_point() else 2):
            raise ValueError(
                f"RecurrentDiscreteSequenceModel: expected tokens (N, T) or features (N, T, V), "
                f"got shape {tuple(tokens.shape)}"
            )
        return self._run(self._embed(tokens), carry)

    def forward_sequence(self, tokens: torch.Tensor, carry0: Carry) -> torch.Tensor:
        """Teacher forcing: one RNN call over whole sequences.

        Args:
            tokens: int64 ``(N, T)`` or float features ``(N, T, V)``.
            carry0: initial carry (batch N).

        Returns:
            logits ``(N, T, output_dim)``; step t depends on tokens ``[:, :t+1]`` only.
        """
        return self._run(self._embed(tokens), carry0)[0]


# ----------------------------------------------------------------------------
# Policy mixin and estimator
# ----------------------------------------------------------------------------
def _select_carry(carry: Carry, idx: torch.Tensor, dim: int) -> Carry:
    return {k: v.index_select(dim, idx) for k, v in carry.items()}


def _merge_carry(carry: Carry, idx: torch.Tensor, new: Carry, dim: int) -> Carry:
    # Out of place: differentiable when the per-step path runs with gradients.
    return {k: v.index_copy(dim, idx, new[k]) for k, v in carry.items()}


class RecurrentPolicyMixin(PolicyMixin):
    """Per-step rollout API with a carry (seed 001). ``is_vectorized = False``.

    The estimator provides ``init_carry(batch_size, device) -> dict`` and is called
    as ``estimator(states_active, carry_active) -> (logits, new_carry)`` (plus
    ``prev_states=`` when its preprocessor ``uses_previous_state``). Carry tensors
    hold the batch on dim ``carry_batch_dim`` (the module's, default 1:
    ``(num_layers, N, H)``). ``log_probs`` is ``PolicyMixin``'s (the per-step
    path pads to ``(N,)`` and checks finiteness).

    A rollout must start at s0: the carry starts empty at the first call.
    """

    is_vectorized = False

    @property
    def carry_batch_dim(self) -> int:
        return int(getattr(getattr(self, "module", None), "carry_batch_dim", 1))

    @property
    def _uses_previous_state(self) -> bool:
        return bool(getattr(getattr(self, "preprocessor", None), "uses_previous_state", False))

    def init_context(self, batch_size: int, device, conditions: torch.Tensor | None = None) -> RolloutContext:
        """A fresh context whose ``carry`` is ``self.init_carry(batch_size, device)``.

        ``conditions`` ``(N, cond_dim)`` are kept in ``ctx.conditions`` (as torchgfn does);
        the built-in recurrent estimator does not read them, a subclass's ``compute_dist`` may.

        Raises:
            TypeError: if the estimator has no ``init_carry``.
        """
        if not callable(getattr(self, "init_carry", None)):
            raise TypeError(f"{type(self).__name__}: a recurrent policy needs init_carry(batch_size, device)")
        ctx = super().init_context(batch_size, device, conditions)
        ctx.carry = self.init_carry(batch_size, ctx.device)  # type: ignore[attr-defined]  # checked above (init_carry)
        return ctx

    def compute_dist(
        self,
        states_active,
        ctx: RolloutContext,
        step_mask: torch.Tensor | None = None,
        save_estimator_outputs: bool = False,
        **policy_kwargs,
    ) -> tuple[Distribution, RolloutContext]:
        """One step: runs the estimator against the carry, advances the carry.

        Args:
            states_active: states ``(M, *state_shape)``: the whole batch (M = N) when
                ``step_mask`` is None, else the rows of the batch where ``step_mask`` is True.
            ctx: the rollout context (``ctx.carry`` is read and replaced; rows outside
                ``step_mask`` keep their carry; with ``step_mask=None`` every row advances,
                e.g. the fast sampler's finished rows, which hold sf and whose carry and
                outputs are then meaningless and discarded).
            step_mask: bool ``(N,)`` or None.
            save_estimator_outputs: record the logits (padded with 0 to ``(N, A)`` when masked).
            **policy_kwargs: forwarded to ``to_probability_distribution``.

        Returns:
            ``(Distribution over the M rows, ctx)``.
        """
        x = states_active.tensor
        dim = self.carry_batch_dim
        idx = None if step_mask is None else torch.nonzero(step_mask).squeeze(1)
        carry = ctx.carry if idx is None else _select_carry(ctx.carry, idx, dim)
        kwargs = {}
        if self._uses_previous_state:
            prev = ctx.extras.get("prev_states")
            kwargs["prev_states"] = prev if prev is None or idx is None else prev.index_select(0, idx)
        out, new_carry = self(states_active, carry, **kwargs)  # type: ignore[operator]  # mixed into an nn.Module
        ctx.carry = new_carry if idx is None else _merge_carry(ctx.carry, idx, new_carry, dim)
        if self._uses_previous_state:
            if idx is None:
                ctx.extras["prev_states"] = x
            else:
                full = ctx.extras.get("prev_states")
                if full is None:
                    full = type(states_active).s0.to(x.device).expand(ctx.batch_size, *x.shape[1:])
                ctx.extras["prev_states"] = full.index_copy(0, idx, x)
        dist = self.to_probability_distribution(states_active, out, **policy_kwargs)  # type: ignore[attr-defined]  # the estimator subclass provides it
        if save_estimator_outputs:
            ctx.current_estimator_output = out
            if idx is not None:
                padded = out.new_zeros((ctx.batch_size, *out.shape[1:]))
                padded[idx] = out
                out = padded
            ctx.trajectory_estimator_outputs.append(out)
        return dist, ctx


class RecurrentDiscretePolicyEstimator(RecurrentPolicyMixin, DiscretePolicyEstimator):
    """Forward policy from a sequence model with a carry (e.g. ``RecurrentDiscreteSequenceModel``).

    Args:
        module: ``module(tokens (N, T), carry) -> (logits (N, T, n_actions), new_carry)``
            (seed 001; float features ``(N, T, V)`` when the preprocessor is not a
            ``StepTokenizer``), with ``init_carry(batch_size, device)``; optionally
            ``forward_sequence(tokens, carry0) -> logits (N, T, n_actions)``, a fast
            path for teacher forcing.
        n_actions: the environment's number of actions (exit included).
        preprocessor: a ``StepTokenizer`` (default ``LastWordTokenizer(n_actions - 1)``, right
            for ``BitSequence``; use ``last_action_tokenizer(env)`` for other built-in
            envs), or any ``Preprocessor`` (the model then reads the newest state's features).
        is_backward: must be False (recurrent backward policies are not supported).
        debug: see ``Estimator``.

    Raises:
        ValueError: if ``is_backward``, or the module's ``input_dim`` is smaller than the
            tokenizer's vocabulary.
    """

    def __init__(
        self,
        module: nn.Module,
        n_actions: int,
        preprocessor: Preprocessor | None = None,
        is_backward: bool = False,
        debug: bool = False,
    ):
        if is_backward:
            raise ValueError(
                "RecurrentDiscretePolicyEstimator: is_backward=True is not supported (forward policies only)"
            )
        if preprocessor is None:
            preprocessor = LastWordTokenizer(int(n_actions) - 1)
        in_dim = getattr(module, "input_dim", None)
        if isinstance(preprocessor, StepTokenizer) and in_dim is not None and in_dim < preprocessor.output_dim:
            raise ValueError(
                f"RecurrentDiscretePolicyEstimator: module input_dim={in_dim} is smaller than the "
                f"tokenizer's vocabulary ({preprocessor.output_dim} tokens)"
            )
        super().__init__(module, n_actions, preprocessor, is_backward, debug)

    def init_carry(self, batch_size: int, device) -> Carry:
        """The module's initial carry for ``batch_size`` trajectories."""
        return self.module.init_carry(batch_size, device)  # type: ignore[operator]  # the module's init_carry (nn.Module attribute)

    def _step_inputs(self, x: torch.Tensor, prev_x: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.preprocessor, StepTokenizer):
            return self.preprocessor.step_tokens(x, prev_x)
        return self.preprocessor(x)

    def _check_output(self, out: torch.Tensor) -> None:
        if out.shape[-1] != self.n_actions:
            raise ValueError(
                f"{type(self).__name__}: module output has last dimension {out.shape[-1]}, expected {self.n_actions}"
            )

    def forward(self, states, carry: Carry, prev_states: torch.Tensor | None = None) -> tuple[torch.Tensor, Carry]:  # type: ignore[override]  # a recurrent step takes and returns the carry
        """One step: ``(logits (N, n_actions), new_carry)``.

        Args:
            states: ``States`` or tensor ``(N, *state_shape)``.
            carry: the carry of these N rows.
            prev_states: the previous states ``(N, *state_shape)`` (None at s0), used
                when the preprocessor ``uses_previous_state``.
        """
        x = states.tensor if hasattr(states, "tensor") else states
        out, new_carry = self.module(self._step_inputs(x, prev_states).unsqueeze(1), carry)  # T = 1
        if out.dim() != 3 or out.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__}: the module must map tokens (N, 1) to logits (N, 1, {self.n_actions}), "
                f"got {tuple(out.shape)}"
            )
        out = out.squeeze(1)
        self._check_output(out)
        return out, new_carry

    def log_prob_table(self, states, **policy_kwargs) -> torch.Tensor:
        """Not defined: a recurrent P_F depends on the history, not on the state alone.

        Raises:
            NotImplementedError: always; see ``exact_terminating_distribution_tree``.
        """
        raise NotImplementedError(
            "a recurrent policy has no per-state log-prob table; use teacher_forced_log_probs "
            "(or exact_terminating_distribution_tree on a tree DAG)"
        )

    def teacher_forced_log_probs(self, trajectories: Trajectories, **policy_kwargs) -> torch.Tensor:
        """log P_F of every action of stored forward trajectories, float ``(T, N)``, 0 on padding.

        One module call over all whole input sequences from the initial carry (teacher
        forcing; ``module.forward_sequence`` when the module has it), masked with the
        forward masks of ``states[:-1]``. Equal to the per-step rollout's log-probs of
        the same actions.

        Raises:
            ValueError: for backward trajectories, or an action outside its forward mask
                (naming the (step, trajectory) pairs).
        """
        if trajectories.is_backward:
            raise ValueError("teacher_forced_log_probs: expected forward trajectories, got backward ones")
        env = trajectories.env
        actions_TN = trajectories.actions_tensor[..., 0]
        T, N = actions_TN.shape
        if T == 0:
            return torch.zeros((0, N), device=trajectories.device)
        x_TN = trajectories.states_tensor[:-1]
        if isinstance(self.preprocessor, StepTokenizer):
            inputs = self.preprocessor.sequence_tokens(x_TN).transpose(0, 1)  # (N, T)
        else:
            inputs = self.preprocessor(x_TN).transpose(0, 1)  # (N, T, V)
        carry0 = self.init_carry(N, trajectories.device)
        fast = getattr(self.module, "forward_sequence", None)
        logits_NTA = fast(inputs, carry0) if fast is not None else self.module(inputs, carry0)[0]
        self._check_output(logits_NTA)
        dist = self.to_probability_distribution(env.States(x_TN), logits_NTA.transpose(0, 1), **policy_kwargs)
        valid_TN = actions_TN >= 0
        lp_TN = dist.log_prob(actions_TN)  # dummy actions are clamped to 0, then zeroed
        bad = torch.isinf(lp_TN) & valid_TN
        if bool(bad.any()):
            pairs = torch.nonzero(bad)[:10].tolist()
            raise ValueError(f"P_F: actions outside the policy's mask at (step, trajectory) {pairs}")
        return lp_TN.masked_fill(~valid_TN, 0.0)


# ----------------------------------------------------------------------------
# Exact terminating distribution of a history-dependent policy on a tree DAG
# ----------------------------------------------------------------------------
@torch.no_grad()
def tree_trajectories(env) -> Trajectories:
    """The unique forward trajectory of every terminating state of a tree-DAG env.

    Walks back from ``env.terminating_states`` (each non-initial state of a tree has
    exactly one parent) and reverses the walks. Trajectories are in the order of
    ``env.terminating_states`` (that of ``env.true_dist()``), padded with sf / -1.

    Raises:
        ValueError: if a state has zero or several parents (not a tree DAG).
    """
    x = env.terminating_states.tensor
    K, dev = x.shape[0], x.device
    back_states, back_actions = [x], []
    done = env.States(x).is_initial_state
    n_steps = torch.zeros(K, dtype=torch.long, device=dev)
    for _ in range(env.max_traj_len):
        if bool(done.all()):
            break
        bm = env.backward_mask(x)
        n_parents = bm.sum(-1)
        if bool(((n_parents != 1) & ~done).any()):
            raise ValueError(f"tree_trajectories: {type(env).__name__} is not a tree DAG (a state has != 1 parent)")
        a = bm.to(torch.uint8).argmax(-1)
        shape = (K,) + (1,) * (x.dim() - 1)
        x = torch.where(done.view(shape), x, env.backward_step_tensor(x, a))
        back_states.append(x)
        back_actions.append(torch.where(done, -1, a))
        n_steps += (~done).long()
        done = env.States(x).is_initial_state
    if not bool(done.all()):
        raise ValueError(f"tree_trajectories: some terminating states do not reach s0 within {env.max_traj_len} steps")
    B = torch.stack(back_states, 0)  # (D+1, K, *S): B[j] = state after j backward steps
    D = B.shape[0] - 1
    T = int(n_steps.max()) + 1  # + exit
    t = torch.arange(T + 1, device=dev).unsqueeze(1)  # (T+1, 1)
    k = torch.arange(K, device=dev)
    j = (n_steps.unsqueeze(0) - t).clamp(0, D)  # forward step t is backward index n - t
    states = B[j, k]
    sink = t > n_steps.unsqueeze(0)  # after the exit
    states[sink] = env.sf
    actions = torch.full((T, K), -1, dtype=torch.long, device=dev)
    if back_actions:
        A = torch.stack(back_actions, 0)  # (D, K): A[j] undoes the forward action into B[j]
        ja = (n_steps.unsqueeze(0) - t[:T] - 1).clamp(0, max(D - 1, 0))
        fwd = A[ja, k]
        actions = torch.where(t[:T] < n_steps.unsqueeze(0), fwd, actions)
    actions = torch.where(t[:T] == n_steps.unsqueeze(0), env.n_actions - 1, actions)
    log_rewards = env.log_reward_tensor(env.terminating_states.tensor)
    return Trajectories(env, states, actions.unsqueeze(-1), n_steps + 1, log_rewards)


@torch.no_grad()
def exact_terminating_distribution_tree(env, pf, **policy_kwargs) -> torch.Tensor:
    """Exact P_T of any forward policy with ``teacher_forced_log_probs`` on a tree DAG.

    On a tree each terminating state x has one trajectory, so
    ``P_T(x) = Π_t P_F(a_t | history) · P_F(exit | x)``: one teacher-forced pass
    over all terminating states' trajectories.

    Returns:
        float64 ``(n_terminating_states,)``, aligned with ``env.true_dist()``.
    """
    traj = tree_trajectories(env)
    return pf.teacher_forced_log_probs(traj, **policy_kwargs).sum(0).double().exp()
