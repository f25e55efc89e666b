"""Relative losses (RTB arXiv:2405.20971, Relative LPV, Trust-PCL arXiv:2509.01632).

Oracles: a hand-computed RTB residual, identities between the losses (Relative
LPV = RTB at the batch-optimal logZ; Trust-PCL = α² RTB = the path-consistency
form of arXiv:1707.01891), and the exact terminating distribution of HyperGrid
for the RTB fixed point ``P_T^post(x) ∝ P_T^prior(x) R(x)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gflownet import (
    RelativeLogPartitionVarianceGFlowNet,
    RelativeTrajectoryBalanceGFlowNet,
    TrustPCLGFlowNet,
    get_trajectory_pfs,
)
from gfn_dist.gym import HyperGrid
from gfn_dist.modules import MLP, DiscreteUniform
from gfn_dist.samplers import Sampler
from gfn_dist.optim import make_optimizer

torch.set_num_threads(1)


def _mlp_policy(env, seed: int, hidden: int = 32) -> DiscretePolicyEstimator:
    torch.manual_seed(seed)
    d = env.preprocessor.output_dim
    return DiscretePolicyEstimator(MLP(d, env.n_actions, hidden, 2), env.n_actions, env.preprocessor)


def _setup(seed: int = 0, n: int = 32):
    env = HyperGrid(2, 8)
    prior = _mlp_policy(env, seed + 100).requires_grad_(False)
    pf = _mlp_policy(env, seed + 200)
    torch.manual_seed(seed)
    traj = Sampler(pf).sample_trajectories(env, n=n)
    return env, pf, prior, traj


# ---- construction: the prior is frozen and not a submodule ------------------


def test_trainable_prior_rejected():
    env = HyperGrid(2, 4)
    pf, prior = _mlp_policy(env, 0), _mlp_policy(env, 1)
    for cls in (RelativeTrajectoryBalanceGFlowNet, RelativeLogPartitionVarianceGFlowNet):
        with pytest.raises(ValueError, match=r"requires_grad_\(False\)"):
            cls(pf, prior)
    with pytest.raises(ValueError, match=r"requires_grad_\(False\)"):
        TrustPCLGFlowNet(pf, prior)
    prior.requires_grad_(False)
    with pytest.raises(ValueError, match="prior_pf is pf"):
        RelativeTrajectoryBalanceGFlowNet(prior, prior)
    with pytest.raises(ValueError, match="beta"):
        RelativeTrajectoryBalanceGFlowNet(pf, prior, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        RelativeLogPartitionVarianceGFlowNet(pf, prior, beta=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        TrustPCLGFlowNet(pf, prior, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        TrustPCLGFlowNet(pf, prior, alpha=float("nan"))


def test_prior_not_registered_and_gets_no_gradient():
    env, pf, prior, traj = _setup()
    gfn = RelativeTrajectoryBalanceGFlowNet(pf, prior)
    assert gfn.prior_pf is prior
    assert not any(k.startswith("_prior_pf") or "prior" in k for k in gfn.state_dict())
    assert set(gfn.state_dict()) == {"logZ"} | {f"pf.{k}" for k in pf.state_dict()}
    prior_ids = {id(p) for p in prior.parameters()}
    assert not prior_ids & {id(p) for p in gfn.parameters()}
    assert not prior_ids & {id(p) for p in gfn.pf_pb_parameters() + gfn.logz_parameters()}
    opt = make_optimizer(gfn, 1e-3, 0.1)
    assert not prior_ids & {id(p) for g in opt.param_groups for p in g["params"]}

    before = {k: v.clone() for k, v in prior.state_dict().items()}
    loss = gfn.loss(env, traj)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in prior.parameters())
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())
    assert all(p.grad is not None for p in pf.parameters()) and gfn.logZ.grad is not None

    # Device / dtype moves reach the unregistered prior too.
    gfn.double()
    assert all(p.dtype == torch.float64 for p in prior.parameters())
    assert all(p.dtype == torch.float64 for p in pf.parameters())


# ---- RTB residual: closed form -------------------------------------------------


def test_rtb_residual_closed_form():
    """Uniform posterior vs a constant-logit prior: log-probs computed by hand per step."""
    env = HyperGrid(2, 8)
    w = torch.tensor([1.0, 2.0, 3.0])  # prior weights of (inc dim 0, inc dim 1, exit)
    lin = nn.Linear(env.preprocessor.output_dim, env.n_actions)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(w.log())
    prior = DiscretePolicyEstimator(lin, env.n_actions, env.preprocessor).requires_grad_(False)
    pf = DiscretePolicyEstimator(DiscreteUniform(env.n_actions), env.n_actions, env.preprocessor)
    beta = 0.7
    gfn = RelativeTrajectoryBalanceGFlowNet(pf, prior, beta=beta, init_logZ=0.3)
    torch.manual_seed(3)
    traj = Sampler(pf).sample_trajectories(env, n=20)

    expected = []
    for i in range(traj.n_trajectories):
        lp_post = lp_prior = 0.0
        for t in range(int(traj.terminating_idx[i])):
            x = traj.states_tensor[t, i].tolist()
            a = int(traj.actions_tensor[t, i, 0])
            allowed = [d for d in range(2) if x[d] < 7] + [2]
            assert a in allowed
            lp_post -= math.log(len(allowed))
            lp_prior += math.log(w[a].item() / sum(w[b].item() for b in allowed))
        x = traj.states_tensor[int(traj.terminating_idx[i]) - 1, i]
        ax = (x.double() / 7 - 0.5).abs()
        r = 0.1 + 0.5 * float((ax > 0.25).all()) + 2.0 * float(((ax > 0.3) & (ax < 0.4)).all())
        expected.append(lp_post - lp_prior - beta * math.log(r))
    expected = torch.tensor(expected, dtype=torch.float64)

    scores = gfn.get_scores(traj)
    assert scores.shape == (20,)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gfn._compute_rtb_scores(env, traj).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gfn.get_scores(env, traj).double(), expected, atol=1e-5, rtol=0)  # torchgfn order
    per = gfn.loss(env, traj, reduction="none")
    # Default loss_fn: half-squared residuals (torchgfn 2.4.1's HalfSquaredLoss for the RTB family).
    torch.testing.assert_close(per.double(), 0.5 * (expected + 0.3) ** 2, atol=1e-4, rtol=0)
    torch.testing.assert_close(gfn.loss(env, traj, reduction="sum"), per.sum())
    torch.testing.assert_close(gfn.loss(env, traj), per.mean())
    with pytest.raises(ValueError, match="reduction"):
        gfn.loss(env, traj, reduction="max")

    # log_rewards override, and clipping from below.
    lr = torch.linspace(-3.0, 1.0, 20)
    torch.testing.assert_close(
        gfn.get_scores(traj, log_rewards=lr).double(),
        expected + beta * traj.log_rewards.double() - beta * lr.double(),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="log_rewards"):
        gfn.get_scores(traj, log_rewards=torch.zeros(3))
    clipped = RelativeTrajectoryBalanceGFlowNet(pf, prior, beta=beta, log_reward_clip_min=-1.0)
    torch.testing.assert_close(
        clipped.get_scores(traj, log_rewards=lr), gfn.get_scores(traj, log_rewards=lr.clamp(min=-1.0))
    )


def test_prior_logprobs_recomputed_even_when_reusing_saved_ones():
    """Saved log-probs belong to the behaviour policy: only the posterior may reuse them."""
    env, pf, prior, _ = _setup()
    torch.manual_seed(5)
    traj = Sampler(pf).sample_trajectories(env, n=16, save_logprobs=True)
    gfn = RelativeTrajectoryBalanceGFlowNet(pf, prior)
    with torch.no_grad():
        fresh = gfn.get_scores(traj, recalculate_all_logprobs=True)
        reused = gfn.get_scores(traj, recalculate_all_logprobs=False)
        prior_lp = get_trajectory_pfs(prior, traj).sum(0)
    torch.testing.assert_close(reused, fresh, atol=1e-4, rtol=0)
    torch.testing.assert_close(reused, traj.log_probs.sum(0) - prior_lp - traj.log_rewards, atol=1e-4, rtol=0)


# ---- identities between losses -------------------------------------------------


def test_relative_lpv_is_rtb_at_batch_optimal_logz():
    env, pf, prior, traj = _setup(seed=1, n=24)
    lpv = RelativeLogPartitionVarianceGFlowNet(pf, prior, beta=1.5)
    rtb = RelativeTrajectoryBalanceGFlowNet(pf, prior, beta=1.5)
    scores = rtb.get_scores(traj).detach()
    with torch.no_grad():
        rtb.logZ.copy_(-scores.mean())

    per_lpv = lpv.loss(env, traj, reduction="none")
    per_rtb = rtb.loss(env, traj, reduction="none")
    assert per_lpv.shape == per_rtb.shape == (24,)
    torch.testing.assert_close(per_lpv, per_rtb, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_lpv, 0.5 * (scores - scores.mean()) ** 2, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lpv.loss(env, traj), rtb.loss(env, traj), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lpv.loss(env, traj, reduction="sum"), per_lpv.sum())
    # logZ* is a stationary point in logZ, so the policy gradients agree as well.
    g_lpv = torch.autograd.grad(lpv.loss(env, traj), list(pf.parameters()))
    g_rtb = torch.autograd.grad(rtb.loss(env, traj), list(pf.parameters()))
    for a, b in zip(g_lpv, g_rtb):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # ... and at any other logZ the RTB loss is strictly larger.
    with torch.no_grad():
        rtb.logZ.add_(0.5)
        # The gap is exactly ½ · 0.5² = 0.125 (centred residuals have mean 0).
        assert float(rtb.loss(env, traj)) > float(lpv.loss(env, traj)) + 0.1


@pytest.mark.parametrize("alpha", [0.25, 1.0, 3.0])
def test_trust_pcl_is_scaled_rtb(alpha):
    env, pf, prior, traj = _setup(seed=2, n=16)
    v0 = 0.8
    tp = TrustPCLGFlowNet(pf, prior, alpha=alpha, init_v_soft_s0=v0)
    rtb = RelativeTrajectoryBalanceGFlowNet(pf, prior, beta=1.0 / alpha, init_logZ=v0 / alpha)
    assert isinstance(tp.alpha, torch.Tensor)
    torch.testing.assert_close(tp.alpha, torch.tensor(alpha))
    assert tp.beta == pytest.approx(1.0 / alpha)
    torch.testing.assert_close(tp.logZ.detach(), torch.tensor(v0 / alpha))
    torch.testing.assert_close(tp.v_soft_s0.detach(), torch.tensor(v0))

    lr = torch.randn(16)
    for reduction in ("mean", "sum", "none"):
        for kw in ({}, {"log_rewards": lr}):
            got = tp.loss(env, traj, reduction=reduction, **kw)
            torch.testing.assert_close(got, alpha**2 * rtb.loss(env, traj, reduction=reduction, **kw))

    # Path consistency of Trust-PCL (arXiv:1707.01891) with terminal reward log R:
    # ½ (V(s0) - log R(x) + α Σ_t log(π(a|s) / π_ref(a|s)))^2 (= α² · ½ r_RTB², the default half square).
    with torch.no_grad():
        tp.logZ.add_(0.37)
    log_ratio = (get_trajectory_pfs(pf, traj) - get_trajectory_pfs(prior, traj)).sum(0)
    pcl = 0.5 * (tp.v_soft_s0 - traj.log_rewards + alpha * log_ratio) ** 2
    torch.testing.assert_close(tp.loss(env, traj, reduction="none"), pcl, atol=1e-4, rtol=1e-4)

    # v_soft_s0 is alpha * logZ also after a gradient step.
    opt = make_optimizer(tp, 1e-3, 0.1)
    tp.loss(env, traj).backward()
    opt.step()
    torch.testing.assert_close(tp.v_soft_s0.detach(), alpha * tp.logZ.detach())


# ---- fidelity: the RTB fixed point on HyperGrid ----------------------------------


def _train(env, gfn, n_iterations: int, batch_size: int = 64, lr: float = 3e-3) -> None:
    opt = make_optimizer(gfn, lr, 0.1)
    sampler = Sampler(gfn.pf)
    torch.manual_seed(0)
    for _ in range(n_iterations):
        loss = gfn.loss(env, sampler.sample_trajectories(env, n=batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _prior_and_target(env, beta: float):
    """A random frozen prior, its exact P_T, and the RTB target ``∝ P_T^prior R^β`` with its log Z."""
    prior = _mlp_policy(env, 1000, hidden=64).requires_grad_(False)
    pT_prior = env.exact_terminating_distribution(prior)
    log_r = env.log_reward(env.terminating_states).double()
    target = torch.softmax(pT_prior.log() + beta * log_r, 0)
    logz = float(torch.logsumexp(pT_prior.log() + beta * log_r, 0))
    return prior, pT_prior, target, logz


def test_rtb_learns_prior_times_reward_on_hypergrid():
    """``P_T^post(x) ∝ P_T^prior(x) R(x)`` (β = 1), measured with the exact P_T.

    HyperGrid is not a tree, but RTB balances whole trajectories,
    ``Z p_post(τ) = p_prior(τ) R(x)``, so summing over the trajectories ending
    in x gives the target marginal without any backward policy.
    Measured (8 runs, 600 steps of 64): final L1 0.007-0.023, logZ error < 0.006.
    """
    env = HyperGrid(2, 8)
    prior, pT_prior, target, true_logz = _prior_and_target(env, beta=1.0)
    # The target differs from both the prior and R/Z, so neither can pass by accident.
    assert float((pT_prior - target).abs().sum()) > 0.5
    assert float((env.true_dist() - target).abs().sum()) > 0.5

    pf = _mlp_policy(env, 0, hidden=64)
    gfn = RelativeTrajectoryBalanceGFlowNet(pf, prior)
    _train(env, gfn, 600)
    l1 = float((env.exact_terminating_distribution(pf) - target).abs().sum())
    assert l1 <= 0.03, l1
    assert abs(float(gfn.logZ.detach()) - true_logz) < 0.03


def test_trust_pcl_learns_tempered_target_on_hypergrid():
    """Trust-PCL with α = 2 samples ``∝ P_T^ref(x) R(x)^(1/2)``; ``V_soft(s0) → α log Σ P_T^ref R^(1/α)``.

    Measured (3 runs, 500 steps of 64): L1 0.003-0.010, V_soft(s0) error < 0.006.
    """
    env = HyperGrid(2, 8)
    alpha = 2.0
    prior, pT_prior, target, logz = _prior_and_target(env, beta=1.0 / alpha)
    assert float((pT_prior - target).abs().sum()) > 0.3
    untempered = torch.softmax(pT_prior.log() + env.log_reward(env.terminating_states).double(), 0)
    assert float((untempered - target).abs().sum()) > 0.3  # β is really 1/α, not 1

    pf = _mlp_policy(env, 0, hidden=64)
    gfn = TrustPCLGFlowNet(pf, prior, alpha=alpha)
    _train(env, gfn, 500)
    l1 = float((env.exact_terminating_distribution(pf) - target).abs().sum())
    assert l1 <= 0.03, l1
    assert abs(float(gfn.v_soft_s0.detach()) - alpha * logz) < 0.05
