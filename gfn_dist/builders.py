"""Build environments, policies, losses and samplers from a ``TrainConfig``.

Learners and rollout actors both call these with the (plain-data) config, so
each process builds its own objects: nothing live is ever shipped to a Ray
actor. Recurrent policies, local search and the relative losses are imported
lazily (their modules are optional for the HyperGrid presets).

The trainable policies are grouped in one ``nn.ModuleDict`` (``"pf"`` and,
when there is one, ``"pb"``): its ``state_dict`` is what learners publish and
actors load.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from gfn_dist.config import ConfigError, TrainConfig, is_import_path
from gfn_dist.env import DiscreteEnv
from gfn_dist.imports import accepts_kwarg, call_user, resolve

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- env


def build_env(cfg: TrainConfig, device: str | torch.device = "cpu"):
    """The environment named by ``cfg.env.name``, on ``device``.

    A built-in name takes its sub-section (``env.hypergrid`` / ``env.bitseq``); an
    import path ``"package.module:ClassName"`` is constructed as
    ``ClassName(**env.kwargs, device=device)`` (``device`` only when the
    constructor takes it and ``env.kwargs`` does not set it).

    Raises:
        ConfigError: one line naming ``env.name`` (the module does not import, with
            its ImportError's text; no such attribute; not a ``DiscreteEnv``
            subclass) or ``env.kwargs`` (the constructor raised; its message included).
    """
    from gfn_dist.gym import BitSequence, HyperGrid, NonAutoregressiveBitSequence

    e = cfg.env
    if is_import_path(e.name):
        return _build_user_env(e.name, dict(e.kwargs), device)
    if e.name == "hypergrid":
        h = e.hypergrid
        return HyperGrid(h.ndim, h.height, h.R0, h.R1, h.R2, device=device)
    b = e.bitseq
    cls = BitSequence if e.name == "bitseq" else NonAutoregressiveBitSequence
    return cls(b.word_size, b.seq_size, b.n_modes, b.temperature, b.seed, device=device, mode_radius=b.mode_radius)


def _build_user_env(path: str, kwargs: dict, device):
    cls = resolve(path, "env.name")
    if not (isinstance(cls, type) and issubclass(cls, DiscreteEnv)):
        what = f"class {cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else type(cls).__name__
        raise ConfigError(f"env.name: {path} is not a subclass of gfn_dist.env.DiscreteEnv (got {what})")
    if "device" not in kwargs and accepts_kwarg(cls, "device"):
        kwargs["device"] = device
    env = call_user(cls, "env.kwargs", path, **kwargs)
    if not isinstance(env, DiscreteEnv):  # a __new__ returning something else
        raise ConfigError(f"env.name: {path}(...) returned {type(env).__name__}, not a gfn_dist.env.DiscreteEnv")
    return env


# ---------------------------------------------------------------------------- policies


def build_pf(cfg: TrainConfig, env) -> nn.Module:
    """Forward policy estimator: MLP, recurrent (``lstm`` / ``gru``) or the user's factory.

    A factory ``"package.module:factory"`` is called as ``factory(env, **model.kwargs)``
    (module doc of ``_user_policy``).

    Raises:
        ConfigError: naming ``model.policy`` (see ``_user_policy``).
    """
    from gfn_dist.estimators import DiscretePolicyEstimator
    from gfn_dist.modules import MLP

    m = cfg.model
    if is_import_path(m.policy):
        return _user_policy(m.policy, "model.policy", env, dict(m.kwargs), is_backward=False)
    if m.policy == "mlp":
        d = env.preprocessor.output_dim
        return DiscretePolicyEstimator(
            MLP(d, env.n_actions, m.hidden_dim, m.n_hidden_layers), env.n_actions, env.preprocessor
        )
    from gfn_dist.recurrent import RecurrentDiscretePolicyEstimator, RecurrentDiscreteSequenceModel

    tokenizer = _recurrent_preprocessor(env)
    model = RecurrentDiscreteSequenceModel(
        tokenizer.output_dim, env.n_actions, m.hidden_dim, rnn_type=m.policy, num_layers=m.n_hidden_layers
    )
    return RecurrentDiscretePolicyEstimator(model, env.n_actions, preprocessor=tokenizer)


def _recurrent_preprocessor(env):
    """The last-action tokenizer of a built-in sequence env; else the env's own features."""
    from gfn_dist.recurrent import last_action_tokenizer

    try:
        return last_action_tokenizer(env)
    except ValueError:
        return env.preprocessor


def build_pb(cfg: TrainConfig, env) -> nn.Module | None:
    """Backward policy estimator (learned MLP, uniform or the user's factory), or None for ``model.pb=none``.

    A factory is called as ``factory(env, **model.pb_kwargs)`` (``model.kwargs`` when
    ``pb_kwargs`` is null) and must output ``n_actions - 1`` logits.

    Raises:
        ConfigError: naming ``model.pb`` (see ``_user_policy``).
    """
    from gfn_dist.estimators import DiscretePolicyEstimator
    from gfn_dist.modules import MLP, DiscreteUniform

    m = cfg.model
    if is_import_path(m.pb):
        kwargs = dict(m.pb_kwargs if m.pb_kwargs is not None else m.kwargs)
        return _user_policy(m.pb, "model.pb", env, kwargs, is_backward=True)
    if m.pb == "none":
        return None
    d = env.preprocessor.output_dim
    module = (
        MLP(d, env.n_actions - 1, m.hidden_dim, m.n_hidden_layers)
        if m.pb == "learned"
        else DiscreteUniform(env.n_actions - 1, d)
    )
    return DiscretePolicyEstimator(module, env.n_actions, env.preprocessor, is_backward=True)


def _user_policy(path: str, key: str, env, kwargs: dict, is_backward: bool) -> nn.Module:
    """The estimator around ``factory(env, **kwargs)``, its output width checked on a dummy batch.

    The module maps float features ``(N, input_dim)`` (``env.preprocessor``, or the
    module's own ``preprocessor`` attribute when it has one) to logits
    ``(N, n_actions)`` (P_B: ``n_actions - 1``): it is wrapped in a
    ``DiscretePolicyEstimator``. A module with ``init_carry(batch_size, device)`` is
    recurrent (``module(step_input, carry) -> (logits, new_carry)``, see
    ``gfn_dist.recurrent``): wrapped in a ``RecurrentDiscretePolicyEstimator``, P_F only.
    The check runs the module on two copies of the preprocessed s0 without
    gradients and without touching the global RNG.

    Raises:
        ConfigError: one line naming ``key``: the factory does not resolve, is not
            callable, raises (its message included), returns no ``nn.Module``, the
            module fails on the dummy batch, or its output has the wrong shape.
    """
    from gfn_dist.estimators import DiscretePolicyEstimator
    from gfn_dist.recurrent import RecurrentDiscretePolicyEstimator

    factory = resolve(path, key)
    if not callable(factory):
        raise ConfigError(f"{key}: {path} is not callable (expected a factory(env, **kwargs) -> nn.Module)")
    module = call_user(factory, key, path, env, **kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}: {path} returned {type(module).__name__}, expected a torch.nn.Module")
    recurrent = callable(getattr(module, "init_carry", None))
    pre = getattr(module, "preprocessor", None)
    try:
        if recurrent:
            if is_backward:
                raise ValueError("a recurrent module (init_carry) is supported for P_F only")
            est: DiscretePolicyEstimator = RecurrentDiscretePolicyEstimator(
                module, env.n_actions, preprocessor=pre or _recurrent_preprocessor(env)
            )
        else:
            est = DiscretePolicyEstimator(module, env.n_actions, pre or env.preprocessor, is_backward=is_backward)
    except ValueError as err:
        raise ConfigError(f"{key}: {path}: {str(err).splitlines()[0]}") from err
    _check_policy_output(est, env, key, path, recurrent)
    return est


def _check_policy_output(est, env, key: str, path: str, recurrent: bool) -> None:
    expected = est.expected_output_dim
    x = env.s0.unsqueeze(0).expand(2, *env.state_shape).clone()
    param = next(est.module.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    feats = None
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            feats = est.preprocessor(x)
            if recurrent:  # one step as the estimator calls it: tokens (N, T = 1) -> logits (N, 1, A)
                out, _ = est.module(est._step_inputs(x, None).unsqueeze(1), est.init_carry(2, x.device))
                out = out.squeeze(1) if isinstance(out, torch.Tensor) and out.dim() == 3 else out
            else:
                out = est.module(feats)
        except Exception as err:
            shape = f" of features {tuple(feats.shape)}" if isinstance(feats, torch.Tensor) else ""
            raise ConfigError(
                f"{key}: {path}: the module failed on a dummy batch{shape} (2 copies of the "
                f"preprocessed s0): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, expected):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        which = "n_actions - 1 (P_B)" if est.is_backward else "n_actions (P_F)"
        in_shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else "?"
        raise ConfigError(
            f"{key}: {path} maps a dummy batch {in_shape} to {got}, expected (2, {expected}) = "
            f"(N, {which}) with n_actions={env.n_actions}"
        )


def build_policies(cfg: TrainConfig, env, init_from_prior: bool = True) -> nn.ModuleDict:
    """``ModuleDict(pf=..., [pb=...])`` initialised from the current torch RNG.

    For the relative losses P_F starts as a copy of the prior (fine-tuning)
    unless ``init_from_prior`` is False (rollout actors: their weights come from
    the learner anyway).
    """
    if cfg.loss.is_relative and init_from_prior:
        pf = copy.deepcopy(build_prior(cfg, env)).requires_grad_(True)
    else:
        pf = build_pf(cfg, env)
    policies = nn.ModuleDict({"pf": pf})
    pb = build_pb(cfg, env)
    if pb is not None:
        policies["pb"] = pb
    return policies


def validate_task(cfg: TrainConfig) -> None:
    """Builds the environment and the policies once, on the CPU, to fail fast on bad user input.

    Call it during configuration checks, before Ray or any actor starts (the global
    torch RNG is left untouched). Checks, besides everything ``build_env`` /
    ``build_pf`` / ``build_pb`` check: the env's masks at s0 have the right shapes
    and dtype, and a recurrent policy is not combined with local search.

    Raises:
        ConfigError: one line naming the key (``env.name``, ``env.kwargs``,
            ``model.policy``, ``model.pb``, ``sampler.name``).
    """
    with torch.random.fork_rng(devices=[]):
        env = build_env(cfg, "cpu")
        if is_import_path(cfg.env.name):
            _check_env_hooks(cfg.env.name, env)
        policies = build_policies(cfg, env, init_from_prior=False)
    if not getattr(policies["pf"], "is_vectorized", True) and cfg.sampler.name == "local_search":
        raise ConfigError(f"sampler.name: local_search is not supported with a recurrent policy ({cfg.model.policy})")


def _check_env_hooks(path: str, env) -> None:
    s0 = env.s0.unsqueeze(0)
    for name, width in (("forward_mask", env.n_actions), ("backward_mask", env.n_actions - 1)):
        try:
            mask = getattr(env, name)(s0)
        except Exception as err:
            raise ConfigError(f"env.name: {path}.{name}(s0) raised {type(err).__name__}: {err}") from err
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (1, width):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(
                f"env.name: {path}.{name} of a batch (1, *state_shape) must be bool (1, {width}), got {got}"
            )


def build_prior(cfg: TrainConfig, env) -> nn.Module:
    """The frozen prior P_F of the relative losses.

    From ``loss.prior_checkpoint`` (a ``policy.pt`` written by a run, loaded with
    ``weights_only=True``), else the model's P_F initialised with ``loss.prior_seed``
    (a seeded random network), without touching the global RNG.

    Raises:
        ConfigError: if the checkpoint is missing or does not fit the model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.loss.prior_seed)
        prior = build_pf(cfg, env)
    path = cfg.loss.prior_checkpoint
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"loss.prior_checkpoint: file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        sd = state.get("policies", state)
        sd = {k[len("pf.") :]: v for k, v in sd.items() if k.startswith("pf.")}
        try:
            prior.load_state_dict(sd)
        except RuntimeError as err:
            raise ConfigError(f"loss.prior_checkpoint: does not fit model.*: {str(err).splitlines()[0]}") from err
    return prior.requires_grad_(False).eval()


# ---------------------------------------------------------------------------- loss


def build_state_flow(cfg: TrainConfig, env) -> nn.Module:
    """The log-state-flow ``ScalarEstimator`` of DB / SubTB: an MLP of the model's sizes on
    ``env.preprocessor`` features. It belongs to the loss module (the learner's model,
    trained and checkpointed with it), not to the policies published to rollout actors."""
    from gfn_dist.estimators import ScalarEstimator
    from gfn_dist.modules import MLP

    m = cfg.model
    return ScalarEstimator(MLP(env.preprocessor.output_dim, 1, m.hidden_dim, m.n_hidden_layers), env.preprocessor)


def build_gflownet(cfg: TrainConfig, env, policies: nn.ModuleDict, prior: nn.Module | None = None):
    """The GFlowNet loss module named by ``cfg.loss.name`` over ``policies``.

    Args:
        cfg: the configuration.
        env: the environment.
        policies: from ``build_policies`` (shared, so training updates them).
        prior: the frozen prior for relative losses (built when None).

    Raises:
        ConfigError: for fm / modified_db with a recurrent policy (they evaluate P_F per state),
            or modified_db on an environment whose states cannot all exit.
    """
    from gfn_dist.gflownet import (
        DBGFlowNet,
        FMGFlowNet,
        LogPartitionVarianceGFlowNet,
        ModifiedDBGFlowNet,
        SubTBGFlowNet,
        TBGFlowNet,
    )

    lc = cfg.loss
    pf = policies["pf"]
    pb = policies["pb"] if "pb" in policies else None
    if lc.name in ("fm", "modified_db") and cfg.model.policy != "mlp":
        raise ConfigError(
            f"loss.name: {lc.name} needs a feed-forward policy (model.policy=mlp), got {cfg.model.policy}"
        )
    if lc.name == "db":
        return DBGFlowNet(
            pf,
            pb,
            build_state_flow(cfg, env),  # type: ignore[arg-type]  # build_state_flow builds a ScalarEstimator
            forward_looking=lc.forward_looking,
            constant_pb=pb is None,
            log_reward_clip_min=lc.log_reward_clip_min,
        )
    if lc.name == "subtb":
        return SubTBGFlowNet(
            pf,
            pb,
            build_state_flow(cfg, env),  # type: ignore[arg-type]  # build_state_flow builds a ScalarEstimator
            weighting=lc.subtb_weighting,
            lamda=lc.subtb_lamda,
            log_reward_clip_min=lc.log_reward_clip_min,
            forward_looking=lc.forward_looking,
            constant_pb=pb is None,
        )
    if lc.name == "modified_db":
        if not bool(env.forward_mask(env.s0.unsqueeze(0))[0, -1]):
            raise ConfigError(
                f"loss.name: modified_db needs an environment whose states can all exit "
                f"(env.name=hypergrid); {cfg.env.name} cannot exit at s0"
            )
        return ModifiedDBGFlowNet(pf, pb, constant_pb=pb is None, log_reward_clip_min=lc.log_reward_clip_min)
    if lc.name == "fm":
        # The edge-flow network is P_F's module (P_F = masked softmax of the edge flows).
        return FMGFlowNet(pf, alpha=lc.fm_alpha)  # type: ignore[arg-type]  # the policy of fm is a DiscretePolicyEstimator (checked above)
    if lc.name == "tb":
        return TBGFlowNet(
            pf, pb, init_logZ=lc.init_logZ, constant_pb=pb is None, log_reward_clip_min=lc.log_reward_clip_min
        )
    if lc.name == "lpv":
        return LogPartitionVarianceGFlowNet(pf, pb, constant_pb=pb is None, log_reward_clip_min=lc.log_reward_clip_min)
    from gfn_dist.gflownet.relative import (
        RelativeLogPartitionVarianceGFlowNet,
        RelativeTrajectoryBalanceGFlowNet,
        TrustPCLGFlowNet,
    )

    prior = prior if prior is not None else build_prior(cfg, env)
    if lc.name == "rtb":
        return RelativeTrajectoryBalanceGFlowNet(
            pf, prior, init_logZ=lc.init_logZ, beta=lc.beta, log_reward_clip_min=lc.log_reward_clip_min
        )
    if lc.name == "relative_lpv":
        return RelativeLogPartitionVarianceGFlowNet(pf, prior, beta=lc.beta, log_reward_clip_min=lc.log_reward_clip_min)
    return TrustPCLGFlowNet(
        pf, prior, alpha=lc.alpha, init_v_soft_s0=lc.alpha * lc.init_logZ, log_reward_clip_min=lc.log_reward_clip_min
    )


def effective_beta(cfg: TrainConfig) -> float:
    """Reward exponent of the target ``∝ prior · R ** beta`` (Trust-PCL: ``1 / alpha``)."""
    return 1.0 / cfg.loss.alpha if cfg.loss.name == "trust_pcl" else cfg.loss.beta


def logz_of(gflownet) -> torch.Tensor | None:
    """The learned scalar logZ of a loss module, or None (LPV-type losses have none)."""
    logz = getattr(gflownet, "logZ", None)
    return logz if isinstance(logz, torch.Tensor) else None


# ---------------------------------------------------------------------------- sampler


def build_sampler(cfg: TrainConfig, policies: nn.ModuleDict):
    """``(sampler, sample_kwargs)`` for ``sampler.sample_trajectories(env, n=..., **sample_kwargs)``.

    ``sample_kwargs`` holds the exploration ``policy_kwargs`` and, for local
    search, ``n_local_search_loops`` / ``back_ratio`` / ``use_metropolis_hastings``.
    """
    s = cfg.sampler
    pk = s.policy_kwargs
    kwargs = {"temperature": pk.temperature, "sf_bias": pk.sf_bias, "epsilon": pk.epsilon}
    if s.name == "sampler":
        from gfn_dist.samplers import Sampler

        return Sampler(policies["pf"], compile=s.compile), kwargs
    from gfn_dist.local_search import LocalSearchSampler

    kwargs.update(
        n_local_search_loops=s.n_local_search_loops,
        back_ratio=s.back_ratio,
        use_metropolis_hastings=s.use_metropolis_hastings,
    )
    return LocalSearchSampler(policies["pf"], policies["pb"]), kwargs


# ---------------------------------------------------------------------------- evaluation


def is_enumerable(env) -> bool:
    """Whether ``env`` can enumerate its states (exact metrics apply)."""
    try:
        _ = env.terminating_states  # the property raises when the env cannot enumerate
    except (NotImplementedError, AttributeError):
        return False
    return True


@torch.no_grad()
def exact_terminating_distribution(env, pf) -> torch.Tensor:
    """Exact P_T of ``pf`` (float64, aligned with ``env.true_dist()``); recurrent ``pf`` on tree DAGs."""
    if getattr(pf, "is_vectorized", True):
        return env.exact_terminating_distribution(pf)
    from gfn_dist.recurrent import exact_terminating_distribution_tree

    return exact_terminating_distribution_tree(env, pf)


@torch.no_grad()
def target_distribution(cfg: TrainConfig, env, prior: nn.Module | None = None) -> tuple[torch.Tensor, float]:
    """The distribution the loss trains towards, and its log-normaliser.

    ``R(x)/Z`` and ``log Z`` for TB / LPV; for the relative losses
    ``P_T^prior(x) R(x)^β / Z_β`` and ``log Z_β`` (arXiv:2405.20971).

    Returns:
        ``(probs float64 (n_terminating_states,), logZ)``.
    """
    if not cfg.loss.is_relative:
        return env.true_dist(), env.log_partition()
    prior = prior if prior is not None else build_prior(cfg, env)
    log_pt = exact_terminating_distribution(env, prior).log()
    log_r = env.log_reward(env.terminating_states).double()
    logits = log_pt + effective_beta(cfg) * log_r
    return torch.softmax(logits, 0), float(torch.logsumexp(logits, 0))


# ---------------------------------------------------------------------------- rollout


def build_rollout_parts(cfg: TrainConfig, device: torch.device) -> tuple:
    """What a rollout worker samples with: ``(env, policies, sampler, sample_kwargs)`` on ``device``.

    The ``RolloutBuilder`` the run passes to its rollout actors
    (``gfn_dist.distributed.rollout_actor``): each actor calls it in its own process.
    Relative losses' actors start from the policies' own initialisation; the
    learners' first publish (version 0) replaces it before any trajectory is sampled.
    """
    env = build_env(cfg, device)
    policies = build_policies(cfg, env, init_from_prior=False).to(device)
    sampler, sample_kwargs = build_sampler(cfg, policies)
    return env, policies, sampler, sample_kwargs
