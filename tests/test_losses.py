"""TB / LPV oracles: hand-computed scores, loss identities, log-prob recomputation."""

import math

import pytest
import torch

from gfn_dist.containers import Trajectories
from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gflownet import LogPartitionVarianceGFlowNet, TBGFlowNet, get_trajectory_pfs
from gfn_dist.gym import BitSequence, HyperGrid, NonAutoregressiveBitSequence
from gfn_dist.modules import MLP, DiscreteUniform
from gfn_dist.samplers import Sampler


def uniform_pf_pb(env):
    pf = DiscretePolicyEstimator(DiscreteUniform(env.n_actions), env.n_actions, env.preprocessor)
    pb = DiscretePolicyEstimator(DiscreteUniform(env.n_actions - 1), env.n_actions, env.preprocessor, is_backward=True)
    return pf, pb


def mlp_pf_pb(env, hidden: int = 16):
    d = env.preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(d, env.n_actions, hidden), env.n_actions, env.preprocessor)
    pb = DiscretePolicyEstimator(MLP(d, env.n_actions - 1, hidden), env.n_actions, env.preprocessor, is_backward=True)
    return pf, pb


def two_hand_made_trajectories(env):
    sf = [-1, -1]
    states = torch.tensor(
        [
            [[0, 0], [0, 0]],
            [[1, 0], sf],
            [[1, 1], sf],
            [sf, sf],
        ]
    )
    actions = torch.tensor([[0, 2], [1, -1], [2, -1]]).unsqueeze(-1)
    return Trajectories(env, states, actions, torch.tensor([3, 1]))


def test_tb_scores_and_loss_uniform_policies():
    env = HyperGrid(2, 8)
    pf, pb = uniform_pf_pb(env)
    traj = two_hand_made_trajectories(env)
    gfn = TBGFlowNet(pf, pb, init_logZ=0.0)
    scores = gfn.get_scores(traj)
    # (0,0)->(1,0)->(1,1)->exit: 3 log(1/3) - log(1/2) - log(2.6); (0,0)->exit: log(1/3) - log(0.6)
    expected = torch.tensor([3 * math.log(1 / 3) - math.log(1 / 2) - math.log(2.6), math.log(1 / 3) - math.log(0.6)])
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.allclose(scores, torch.tensor([-3.5582, -0.5878]), atol=1e-4)
    assert gfn.loss(env, traj).item() == pytest.approx(6.50314, abs=1e-4)
    assert gfn.loss(env, traj, reduction="sum").item() == pytest.approx(2 * 6.50314, abs=2e-4)
    per = gfn.loss(env, traj, reduction="none")
    assert per.shape == (2,)
    assert torch.allclose(per, expected**2, atol=1e-4)


def test_log_reward_override_and_clip():
    env = HyperGrid(2, 8)
    pf, pb = uniform_pf_pb(env)
    traj = two_hand_made_trajectories(env)
    base = TBGFlowNet(pf, pb).get_scores(traj)
    override = torch.tensor([0.0, -100.0])
    s = TBGFlowNet(pf, pb).get_scores(traj, log_rewards=override)
    assert torch.allclose(s - base, traj.log_rewards - override)
    clipped = TBGFlowNet(pf, pb, log_reward_clip_min=-5.0).get_scores(traj, log_rewards=override)
    assert clipped[1].item() == pytest.approx((base[1] + traj.log_rewards[1] - 5.0 * -1).item(), abs=1e-5)
    with pytest.raises(ValueError, match="log_rewards"):
        TBGFlowNet(pf, pb).loss(env, traj, log_rewards=torch.zeros(3))


def test_lpv_is_tb_at_batch_optimal_logz():
    torch.manual_seed(0)
    env = HyperGrid(2, 8)
    d = env.preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(d, env.n_actions, 32), env.n_actions, env.preprocessor)
    pb = DiscretePolicyEstimator(MLP(d, env.n_actions - 1, 32), env.n_actions, env.preprocessor, is_backward=True)
    traj = Sampler(pf).sample_trajectories(env, n=32)
    lpv = LogPartitionVarianceGFlowNet(pf, pb)
    scores = lpv.get_scores(traj)
    tb = TBGFlowNet(pf, pb, init_logZ=float(-scores.mean().detach()))
    assert torch.allclose(lpv.loss(env, traj, reduction="none"), tb.loss(env, traj, reduction="none"), atol=1e-5)
    assert lpv.loss(env, traj).item() == pytest.approx(tb.loss(env, traj).item(), rel=1e-5)
    # TB at any other logZ is worse (the batch mean is the minimiser of the mean squared residual).
    tb_off = TBGFlowNet(pf, pb, init_logZ=float(-scores.mean().detach()) + 0.3)
    assert tb_off.loss(env, traj).item() > lpv.loss(env, traj).item()
    assert lpv.loss(env, traj, reduction="none").shape == (32,)


def test_pb_none_requires_constant_pb():
    env = BitSequence(word_size=1, seq_size=4)
    pf, _ = uniform_pf_pb(env)
    with pytest.raises(ValueError, match="constant_pb"):
        TBGFlowNet(pf, None)
    with pytest.raises(ValueError, match="constant_pb"):
        LogPartitionVarianceGFlowNet(pf, None)
    gfn = TBGFlowNet(pf, None, constant_pb=True)
    traj = Sampler(pf).sample_trajectories(env, n=5)
    # Tree DAG, uniform P_F over 2 words for 4 steps then forced exit: log P_F = 4 log(1/2).
    assert torch.allclose(gfn.get_scores(traj), 4 * math.log(0.5) - traj.log_rewards, atol=1e-5)


def test_bad_reduction():
    env = HyperGrid(2, 8)
    pf, pb = uniform_pf_pb(env)
    with pytest.raises(ValueError, match="reduction"):
        TBGFlowNet(pf, pb).loss(env, two_hand_made_trajectories(env), reduction="max")


@pytest.mark.parametrize("env_fn", [lambda: HyperGrid(3, 5), lambda: NonAutoregressiveBitSequence(1, 5)])
def test_recomputed_logprobs_equal_sampled(env_fn):
    torch.manual_seed(1)
    env = env_fn()
    d = env.preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(d, env.n_actions, 64), env.n_actions, env.preprocessor)
    traj = Sampler(pf).sample_trajectories(env, n=64, save_logprobs=True, save_estimator_outputs=True)
    recomputed = get_trajectory_pfs(pf, traj, recalculate_all_logprobs=True)
    assert recomputed.shape == traj.log_probs.shape
    assert torch.allclose(recomputed, traj.log_probs, atol=1e-5)
    # Padding is exactly 0 and valid entries are strictly negative or zero.
    pad = traj.actions_tensor[..., 0] < 0
    assert bool((recomputed[pad] == 0).all())
    # Reusing saved estimator outputs gives the same values.
    traj.log_probs_saved = traj.log_probs
    traj.log_probs = None
    reused = get_trajectory_pfs(pf, traj, recalculate_all_logprobs=False)
    assert torch.allclose(reused, traj.log_probs_saved, atol=1e-6)


def test_loss_gradients_reach_pf_pb_and_logz():
    torch.manual_seed(0)
    env = HyperGrid(2, 4)
    pf, pb = mlp_pf_pb(env)
    gfn = TBGFlowNet(pf, pb)
    traj = Sampler(pf).sample_trajectories(env, n=8)
    gfn.loss(env, traj).backward()
    assert gfn.logZ.grad is not None and gfn.logZ.grad.abs() > 0
    assert all(p.grad is not None for p in gfn.parameters())
    assert pf.module.last_layer.weight.grad.abs().sum() > 0
    assert pb.module.last_layer.weight.grad.abs().sum() > 0


def test_stored_invalid_action_is_reported():
    env = HyperGrid(2, 3)
    pf, pb = uniform_pf_pb(env)
    sf = [-1, -1]
    # (2,0) cannot take action 0 (coordinate 0 is at the top).
    states = torch.tensor([[[2, 0]], [[3, 0]], [sf]])
    actions = torch.tensor([[0], [2]]).unsqueeze(-1)
    traj = Trajectories(env, states, actions, torch.tensor([2]), log_rewards=torch.zeros(1))
    with pytest.raises(ValueError, match=r"outside the policy's mask at \(step, trajectory\) \[\[0, 0\]\]"):
        TBGFlowNet(pf, pb).loss(env, traj)


def test_non_finite_log_reward_is_named_with_hint():
    env = HyperGrid(2, 8)
    pf, pb = uniform_pf_pb(env)
    traj = two_hand_made_trajectories(env)
    bad = torch.tensor([0.0, -float("inf")])
    with pytest.raises(ValueError, match=r"non-finite log_rewards in trajectories \[1\].*log_reward_clip_min"):
        TBGFlowNet(pf, pb).loss(env, traj, log_rewards=bad)
    # With a finite clip the same batch trains.
    loss = TBGFlowNet(pf, pb, log_reward_clip_min=-20.0).loss(env, traj, log_rewards=bad)
    assert torch.isfinite(loss)
    # The same error from every reduction (the reduced losses check the loss, "none" the scores).
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match=r"non-finite log_rewards in trajectories \[1\]"):
            TBGFlowNet(pf, pb).loss(env, traj, log_rewards=bad, reduction=reduction)


def test_non_finite_logz_is_named():
    env = HyperGrid(2, 8)
    pf, pb = uniform_pf_pb(env)
    traj = two_hand_made_trajectories(env)
    gfn = TBGFlowNet(pf, pb, init_logZ=float("nan"))
    for reduction in ("mean", "none"):
        with pytest.raises(ValueError, match="non-finite logZ"):
            gfn.loss(env, traj, reduction=reduction)


def test_overflowing_tb_loss_is_an_error():
    """Finite scores whose squares overflow float32 raise instead of returning an inf loss."""
    env = HyperGrid(2, 8)
    pf, pb = uniform_pf_pb(env)
    traj = two_hand_made_trajectories(env)
    with pytest.raises(ValueError, match="squared scores overflow"):
        TBGFlowNet(pf, pb).loss(env, traj, log_rewards=torch.tensor([0.0, -1e30]))


@pytest.mark.parametrize(
    "make_env",
    [lambda: HyperGrid(3, 4), lambda: BitSequence(word_size=2, seq_size=6), lambda: NonAutoregressiveBitSequence(1, 5)],
)
@pytest.mark.parametrize("constant_pb", [False, True])
def test_score_shortcut_equals_general_path(make_env, constant_pb, monkeypatch):
    """TB scores and gradients from trajectory_score_sums equal the per-policy (T, N) path."""
    from gfn_dist.gflownet.base import trajectory_score_sums

    torch.manual_seed(0)
    env = make_env()
    pf, pb = mlp_pf_pb(env)
    gfn = TBGFlowNet(pf, None if constant_pb else pb, constant_pb=constant_pb)
    traj = Sampler(pf).sample_trajectories(env, n=40)
    assert trajectory_score_sums(pf, None if constant_pb else pb, traj) is not None

    def scores_and_grads():
        gfn.zero_grad()
        s = gfn.get_scores(traj)
        s.square().sum().backward()
        return s.detach(), [p.grad.clone() for p in gfn.parameters() if p.grad is not None]

    fast, fast_g = scores_and_grads()
    monkeypatch.setattr(DiscretePolicyEstimator, "masked_logits_fn", lambda self, env, kw=None: None)
    assert trajectory_score_sums(pf, None if constant_pb else pb, traj) is None
    ref, ref_g = scores_and_grads()
    log_pf, log_pb = gfn.get_pfs_and_pbs(traj)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert torch.allclose(fast, log_pf.sum(0) - log_pb.sum(0) - traj.log_rewards, atol=1e-5)
    assert len(fast_g) == len(ref_g) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_g, ref_g))


def test_score_shortcut_handles_trajectories_without_exit():
    """Trajectories cut before their exit (or with no action) take the shortcut's general
    P_B selection; scores equal the per-policy (T, N) path."""
    from gfn_dist.containers import Trajectories
    from gfn_dist.gflownet.base import trajectory_score_sums

    torch.manual_seed(0)
    env = HyperGrid(3, 4)
    pf, pb = mlp_pf_pb(env)
    gfn = TBGFlowNet(pf, pb)
    full = Sampler(pf).sample_trajectories(env, n=12)
    term = full.terminating_idx.clone()
    actions, states = full.actions_tensor.clone(), full.states_tensor.clone()
    n_long = int(torch.argmax(term))  # at least 2 actions: cut its exit
    actions[term[n_long] - 1, n_long] = -1
    term[n_long] -= 1
    n_empty = (n_long + 1) % 12  # no action at all
    actions[:, n_empty] = -1
    states[1:, n_empty] = env.sf
    term[n_empty] = 0
    traj = Trajectories(env, states, actions, term, full.log_rewards)
    fast = trajectory_score_sums(pf, pb, traj)
    log_pf, log_pb = gfn.get_pfs_and_pbs(traj)
    assert torch.allclose(fast, log_pf.sum(0) - log_pb.sum(0), atol=1e-5)
    assert float(log_pb[term[n_long] - 1, n_long]) != 0.0  # the cut trajectory's last P_B term counts
