"""Estimators and the policy rollout API (seed document 001 / 002).

* ``Estimator``: ``nn.Module`` mapping ``States`` (through a preprocessor) to raw outputs.
* ``ScalarEstimator``: output ``(*B, 1)``, e.g. log-state-flows or a conditional logZ.
* ``PolicyMixin``: the uniform rollout API (``init_context``, ``compute_dist``,
  ``log_probs``, ``get_current_estimator_output``) with a ``RolloutContext``.
* ``DiscretePolicyEstimator``: logits -> masked categorical over ``n_actions``
  (forward, exit included) or ``n_actions - 1`` (backward) actions, with
  ``temperature`` / ``sf_bias`` / ``epsilon`` exploration.

Recurrent policies (``RecurrentPolicyMixin``, ``RecurrentDiscretePolicyEstimator``)
are in ``gfn_dist.recurrent``; ``gfn_dist.estimators`` (torchgfn's import path)
re-exports both modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributions import Distribution

from gfn_dist.actions import Actions
from gfn_dist.preprocessors import IdentityPreprocessor, Preprocessor
from gfn_dist.utils.modules import call_module, no_hooks

_NEG_INF: dict = {}


def _neg_inf(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim ``-inf`` of ``like``'s dtype and device (a Python scalar would cost a copy)."""
    key = (like.dtype, like.device)
    t = _NEG_INF.get(key)
    if t is None:
        t = _NEG_INF[key] = torch.tensor(-math.inf, dtype=like.dtype, device=like.device)
    return t


class MaskedCategorical(Distribution):
    """Categorical distribution over actions from masked logits.

    Cheaper than ``torch.distributions.Categorical`` in rollout loops:
    construction does no work, normalization (``log_softmax``) happens only
    when a log-probability is asked for, and ``sample`` uses the Gumbel-max
    trick (``argmax(logits + Gumbel noise)``: 4 kernels, no host sync, and a
    masked ``-inf`` logit can never be drawn).

    Args:
        logits: float ``(*B, n)``, ``-inf`` on masked actions; normalized or not
            (``normalized`` says which).
        mask: the bool mask ``(*B, n)`` used to build the logits, if any (lets the
            sampler skip re-checking actions against the same mask).
        normalized: whether ``logits`` already are log-probabilities.
    """

    arg_constraints: ClassVar[dict] = {}
    has_enumerate_support = True

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor | None = None, normalized: bool = False):
        self._raw_logits = logits
        self._logits = logits if normalized else None
        self.mask = mask
        # Distribution.__init__ without its argument checks (validate_args=False): it
        # only records the shapes, and it runs once per rollout step.
        self._batch_shape = logits.shape[:-1]
        self._event_shape = torch.Size()
        self._validate_args = False

    @property
    def logits(self) -> torch.Tensor:
        """Normalized log-probabilities ``(*B, n)``."""
        if self._logits is None:
            self._logits = self._raw_logits.log_softmax(-1)
        return self._logits

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        """Int64 samples of shape ``(*sample_shape, *B, 1)``: one action index per row with
        the action dimension kept, as torchgfn's categorical samples (actions of shape ``(1,)``)."""
        raw = self._raw_logits
        if len(sample_shape):
            raw = raw.expand(*sample_shape, *raw.shape)
        # Exp(1) noise E: argmax(logits - log E) is a Gumbel-max draw.
        noise = torch.empty_like(raw).exponential_().log_()
        return (raw - noise).argmax(-1, keepdim=True)

    def sample_with_log_noise(self, log_noise: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gumbel-max sample with pre-drawn ``log_noise = log(Exp(1))`` of the logits' shape.

        Lets a sampler draw the noise of a whole rollout in one kernel.
        """
        return torch.argmax(self._raw_logits - log_noise, dim=-1, out=out)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log P(value); ``value`` of shape ``B`` or ``(*B, 1)``; returns ``B``.

        The dummy action ``-1`` (padding) is read as action 0: callers mask those entries.
        """
        if value.dim() != self._raw_logits.dim():
            value = value.unsqueeze(-1)
        return self.logits.gather(-1, value.clamp(min=0)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        lp = self.logits
        p = lp.exp()
        return -(p * lp.masked_fill(p == 0, 0.0)).sum(-1)


@dataclass
class RolloutContext:
    """Per-rollout state owned by a policy (seed 001).

    Attributes:
        batch_size: N, trajectories in the rollout.
        device: where tensors live.
        conditions: optional ``(N, cond_dim)``.
        carry: recurrent hidden state (stays in the process that made it).
        trajectory_log_probs: per-step log-probs recorded when ``save_logprobs``.
        trajectory_estimator_outputs: per-step raw outputs recorded when ``save_estimator_outputs``.
        current_estimator_output: the last raw output (or a precomputed one to reuse).
        extras: free-form policy-specific data.
    """

    batch_size: int
    device: torch.device
    conditions: torch.Tensor | None = None
    carry: Any = None
    trajectory_log_probs: list = field(default_factory=list)
    trajectory_estimator_outputs: list = field(default_factory=list)
    current_estimator_output: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


def _check_flag(owner: str, name: str, value) -> bool:
    """``value`` as a bool, refusing non-bools (a positional argument taken for another one).

    Raises:
        TypeError: if ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


class Estimator(nn.Module):
    """Wraps a module; ``forward(states) = module(preprocessor(states))``.

    Args:
        module: maps ``(*B, preprocessor.output_dim)`` to ``(*B, expected_output_dim)``.
        preprocessor: state tensor -> features; default identity with ``module.input_dim``.
        is_backward: whether this estimator defines a backward policy.
        debug: accepted for torchgfn compatibility; gfn_dist's checks (output size,
            masks, finiteness) always run, so it changes nothing.

    Raises:
        TypeError: if ``is_backward`` or ``debug`` is not a bool.
        ValueError: (in ``forward``) if the module's output size is not ``expected_output_dim``.
    """

    def __init__(
        self,
        module: nn.Module,
        preprocessor: Preprocessor | None = None,
        is_backward: bool = False,
        debug: bool = False,
    ):
        super().__init__()
        self.module = module
        if preprocessor is None:
            input_dim = getattr(module, "input_dim", None)
            preprocessor = IdentityPreprocessor(output_dim=input_dim or 1)
        self.preprocessor = preprocessor
        self.is_backward = _check_flag(type(self).__name__, "is_backward", is_backward)
        self.debug = _check_flag(type(self).__name__, "debug", debug)

    @property
    def expected_output_dim(self) -> int | None:
        return None

    def forward(self, states) -> torch.Tensor:
        return self._checked_output(call_module(self.module, self.preprocessor(states)))

    def _checked_output(self, out: torch.Tensor) -> torch.Tensor:
        exp = self.expected_output_dim
        if exp is not None and out.shape[-1] != exp:
            raise ValueError(f"{type(self).__name__}: module output has last dimension {out.shape[-1]}, expected {exp}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(module={self.module}, preprocessor={self.preprocessor})"


#: ``ScalarEstimator`` reductions of a module output with several features.
_REDUCTIONS = {"mean": torch.mean, "sum": torch.sum, "prod": torch.prod}


class ScalarEstimator(Estimator):
    """Estimator with output ``(*B, 1)`` (log-state-flow, conditional logZ, ...).

    torchgfn's signature: ``ScalarEstimator(module, preprocessor=None, reduction="mean",
    debug=False)``. A module whose output has ``k > 1`` features is reduced over them
    with ``reduction``.

    Args:
        module: maps features ``(*B, d)`` to ``(*B, k)``.
        preprocessor: state -> features (usually ``env.preprocessor``).
        reduction: ``mean`` | ``sum`` | ``prod``, applied over the last dimension when ``k > 1``.
        debug: see ``Estimator``.

    Raises:
        TypeError: if ``reduction`` is not a str (e.g. a bool meant as gfn_dist's former
            third positional argument ``is_backward``), or ``debug`` is not a bool.
        ValueError: on an unknown reduction.
    """

    def __init__(
        self,
        module: nn.Module,
        preprocessor: Preprocessor | None = None,
        reduction: str = "mean",
        debug: bool = False,
    ):
        if not isinstance(reduction, str):
            raise TypeError(
                f"ScalarEstimator: reduction must be one of {sorted(_REDUCTIONS)}, got "
                f"{type(reduction).__name__} {reduction!r} (the third argument is torchgfn's reduction)"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"ScalarEstimator: reduction must be one of {sorted(_REDUCTIONS)}, got {reduction!r}")
        super().__init__(module, preprocessor, False, debug)
        self.reduction = reduction

    @property
    def expected_output_dim(self) -> int:
        return 1

    def _checked_output(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[-1] != 1:
            out = _REDUCTIONS[self.reduction](out, -1, keepdim=True)  # type: ignore[operator]  # torch.mean / sum / prod
        return out


class PolicyMixin:
    """Vectorized rollout API (seed 001). ``is_vectorized = True``.

    Subclasses provide ``to_probability_distribution(states, output, **policy_kwargs)``.
    """

    is_vectorized: bool = True

    def init_context(self, batch_size: int, device, conditions: torch.Tensor | None = None) -> RolloutContext:
        """A fresh ``RolloutContext`` for ``batch_size`` trajectories."""
        return RolloutContext(batch_size=batch_size, device=torch.device(device), conditions=conditions)

    def _call_module(self, states_active, conditions):
        return call_module(self, states_active) if conditions is None else call_module(self, states_active, conditions)  # type: ignore[arg-type]  # mixed into an nn.Module

    def compute_dist(
        self,
        states_active,
        ctx: RolloutContext,
        step_mask: torch.Tensor | None = None,
        save_estimator_outputs: bool = False,
        **policy_kwargs,
    ) -> tuple[Distribution, RolloutContext]:
        """Runs the estimator on ``states_active`` and builds the action distribution.

        Args:
            states_active: the states to act on, ``(M, *state_shape)``; with
                ``step_mask`` (bool ``(N,)``) they are the rows of the batch where it is True.
            ctx: the rollout context. A pre-set ``ctx.current_estimator_output`` (e.g. the
                trajectories' saved estimator outputs, ``(M, n_out)``) is what the
                distribution is built from when ``step_mask`` is None (seed 001), instead
                of calling the module; it is then cleared unless ``save_estimator_outputs``.
            save_estimator_outputs: record the raw output (padded to ``(N, ...)`` when masked)
                and keep it in ``ctx.current_estimator_output``.
            **policy_kwargs: forwarded to ``to_probability_distribution``.

        Returns:
            ``(Distribution, ctx)``.

        Raises:
            ValueError: if a pre-set ``ctx.current_estimator_output`` does not have M rows.
        """
        out = ctx.current_estimator_output if step_mask is None else None
        if out is not None and out.shape[0] != len(states_active):
            raise ValueError(
                f"ctx.current_estimator_output has {out.shape[0]} rows for {len(states_active)} states: "
                "clear it (None) when it is not the output for these states"
            )
        ctx.current_estimator_output = None
        if out is None:
            cond = ctx.conditions
            if cond is not None and step_mask is not None:
                cond = cond[step_mask]
            out = self._call_module(states_active, cond)
        dist = self.to_probability_distribution(states_active, out, **policy_kwargs)  # type: ignore[attr-defined]  # the estimator subclass provides it
        if save_estimator_outputs:
            ctx.current_estimator_output = out
            if step_mask is not None:
                padded = torch.zeros(ctx.batch_size, *out.shape[1:], dtype=out.dtype, device=out.device)
                padded[step_mask] = out
                ctx.trajectory_estimator_outputs.append(padded)
            else:
                ctx.trajectory_estimator_outputs.append(out)
        return dist, ctx

    def log_probs(
        self,
        actions_active,
        dist: Distribution,
        ctx: RolloutContext,
        step_mask: torch.Tensor | None = None,
        vectorized: bool = False,
        save_logprobs: bool = False,
    ) -> tuple[torch.Tensor, RolloutContext]:
        """log-probs of ``actions_active`` under ``dist``.

        ``vectorized=True`` returns ``dist.log_prob`` as is (may hold ``-inf``).
        Otherwise the result is padded with 0 to ``(N,)`` using ``step_mask`` and
        checked to be finite.

        Raises:
            ValueError: (per-step path) if an action has log-prob ``±inf`` (outside its mask).
        """
        a = actions_active.tensor if isinstance(actions_active, Actions) else actions_active
        lp = dist.log_prob(a)
        if not vectorized:
            if step_mask is not None:
                padded = torch.zeros(ctx.batch_size, dtype=lp.dtype, device=lp.device)
                padded[step_mask] = lp
                lp = padded
            if bool(torch.isinf(lp).any()):
                bad = torch.nonzero(torch.isinf(lp)).flatten().tolist()[:20]
                raise ValueError(f"log-probs are infinite in rows {bad}: action outside the policy's mask")
        if save_logprobs:
            ctx.trajectory_log_probs.append(lp)
        return lp, ctx

    def get_current_estimator_output(self, ctx: RolloutContext) -> torch.Tensor | None:
        return ctx.current_estimator_output


class DiscretePolicyEstimator(PolicyMixin, Estimator):
    """P_F (``is_backward=False``, ``n_actions`` logits) or P_B (``n_actions - 1`` logits).

    Args:
        module: maps features ``(*B, d)`` to logits.
        n_actions: the environment's number of actions (exit included).
        preprocessor: state -> features (usually ``env.preprocessor``).
        is_backward: backward policy (masks from ``states.backward_masks``).
        debug: see ``Estimator``.

    Raises:
        TypeError: if ``n_actions`` is not an int, or ``is_backward`` / ``debug`` not a bool.
    """

    def __init__(
        self,
        module: nn.Module,
        n_actions: int,
        preprocessor: Preprocessor | None = None,
        is_backward: bool = False,
        debug: bool = False,
    ):
        if isinstance(n_actions, bool) or not isinstance(n_actions, int):
            raise TypeError(f"{type(self).__name__}: n_actions must be an int, got {type(n_actions).__name__}")
        super().__init__(module, preprocessor, is_backward, debug)
        self.n_actions = int(n_actions)

    @property
    def expected_output_dim(self) -> int:
        return self.n_actions - 1 if self.is_backward else self.n_actions

    def to_probability_distribution(
        self,
        states,
        module_output: torch.Tensor,
        sf_bias: float = 0.0,
        temperature: float = 1.0,
        epsilon: float = 0.0,
    ) -> MaskedCategorical:
        """Masked categorical with exploration (torchgfn's argument order: sf_bias, temperature, epsilon).

        Samples are int64 ``(*B, 1)``; ``log_prob`` takes ``(*B, 1)`` or ``(*B,)``.

        ``p = (1 - epsilon) * softmax((logits - sf_bias * e_exit) / temperature over allowed)
        + epsilon * uniform(allowed)``; ``sf_bias`` applies to forward policies only.

        Args:
            states: ``DiscreteStates`` ``(*B,)`` (masks are read from them).
            module_output: logits ``(*B, expected_output_dim)``.
            temperature: softmax temperature (> 0).
            sf_bias: subtracted from the exit logit.
            epsilon: weight of the uniform mixture, in [0, 1].

        Raises:
            ValueError: on temperature <= 0 or epsilon outside [0, 1].
        """
        masks = states.backward_masks if self.is_backward else states.forward_masks
        logits = module_output
        if sf_bias != 0.0 and not self.is_backward:
            logits = torch.cat([logits[..., :-1], logits[..., -1:] - sf_bias], dim=-1)
        if temperature != 1.0:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            logits = logits / temperature
        masked = torch.where(masks, logits, _neg_inf(logits))  # one kernel (no mask inversion)
        if epsilon == 0.0:
            return MaskedCategorical(masked, mask=masks)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        n_valid = masks.sum(-1, keepdim=True).clamp(min=1)
        log_uniform = (-n_valid.float().log()).expand_as(masked).masked_fill(~masks, -math.inf)
        if epsilon == 1.0:
            return MaskedCategorical(log_uniform, mask=masks, normalized=True)
        logp = torch.logaddexp(masked.log_softmax(-1) + math.log1p(-epsilon), log_uniform + math.log(epsilon))
        return MaskedCategorical(logp, mask=masks, normalized=True)

    def masked_logits_fn(self, env, policy_kwargs: dict | None = None):
        """A tensor-level shortcut of ``to_probability_distribution(states, self(states))``, or None.

        Returns ``f(x) -> masked logits`` for state tensors ``x (M, *state_shape)``:
        float ``(M, expected_output_dim)``, the (temperature / sf_bias adjusted) logits
        with ``-inf`` where ``env``'s mask forbids the action, i.e. exactly the
        unnormalized logits of the ``MaskedCategorical`` that ``compute_dist`` builds.
        It skips the ``States`` / distribution objects of the general path, which
        matters in rollout loops of small batches. None when this estimator (a subclass
        overriding ``forward`` or the distribution), its policy kwargs (``epsilon > 0``,
        unknown keys) or the environment (no tensor mask hooks) need the general path.

        Raises:
            ValueError: (from ``f``) if the module's output has the wrong last dimension.
        """
        cls = type(self)
        if (
            cls.forward is not Estimator.forward
            or cls.compute_dist is not PolicyMixin.compute_dist
            or cls._call_module is not PolicyMixin._call_module
            or cls.to_probability_distribution is not DiscretePolicyEstimator.to_probability_distribution
            or not getattr(env, "is_discrete", False)
        ):
            return None
        kw = dict(policy_kwargs or {})
        temperature = float(kw.pop("temperature", 1.0))
        sf_bias = float(kw.pop("sf_bias", 0.0)) if not self.is_backward else 0.0
        kw.pop("sf_bias", None)
        if kw.pop("epsilon", 0.0) != 0.0 or kw:
            return None
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        mask_fn = env.backward_mask if self.is_backward else env.forward_mask
        ninf = None

        def masked_logits(x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
            """``features``: optional ``self.preprocessor(x)``, already computed (skips it)."""
            nonlocal ninf
            if features is not None and no_hooks(self):
                logits = self._checked_output(call_module(self.module, features))
            else:
                logits = call_module(self, x)  # Estimator.forward: preprocessor, module, output check
            if sf_bias != 0.0:
                logits = torch.cat([logits[..., :-1], logits[..., -1:] - sf_bias], dim=-1)
            if temperature != 1.0:
                logits = logits / temperature
            if ninf is None:
                ninf = _neg_inf(logits)
            return torch.where(mask_fn(x), logits, ninf)

        return masked_logits

    def log_prob_table(self, states, **policy_kwargs) -> torch.Tensor:
        """Normalized log-probabilities of every action, ``(*B, expected_output_dim)``."""
        return self.to_probability_distribution(states, self(states), **policy_kwargs).logits
