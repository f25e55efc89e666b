"""DB, modified DB, SubTB and FM against torchgfn 2.4.1 used as an oracle.

The same ``nn.Module`` objects (weights) sit inside a gfn_dist estimator and a torchgfn
estimator; trajectories sampled by gfn_dist are handed to torchgfn as its own
``Trajectories``. Loss values, per-transition scores and the gradients of every shared
parameter must agree to float32 round-off (atol 1e-5 on values of order 1-10; the two
implementations sum the same terms in different orders).

torchgfn is a test-only dependency (see docs/porting_from_torchgfn.md for how to install
it next to torch 2.13 / NumPy 2).
"""

import pytest
import torch

import gfn.estimators as tg_est
import gfn.gflownet as tg_gfn
import gfn.gym as tg_gym
import gfn.preprocessors as tg_pre
from gfn.containers import Trajectories as TgTrajectories

from gfn_dist.gflownet import DBGFlowNet, FMGFlowNet, ModifiedDBGFlowNet, SubTBGFlowNet
from gfn_dist.gflownet.sub_trajectory_balance import WEIGHTINGS
from gfn_dist.gym import HyperGrid
from gfn_dist.modules import MLP, DiscretePolicyEstimator, ScalarEstimator
from gfn_dist.samplers import Sampler

ATOL = 1e-5


class AsFloat(torch.nn.Module):
    """torchgfn's ``KHotPreprocessor`` returns int64 k-hot rows (its own MLP casts them); same module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x.float())


class Pair:
    """One set of modules wrapped twice: gfn_dist estimators (``d_*``) and torchgfn ones (``t_*``)."""

    def __init__(self, ndim=2, height=8, seed=0):
        torch.manual_seed(seed)
        self.env = HyperGrid(ndim, height)
        self.tenv = tg_gym.HyperGrid(ndim=ndim, height=height)
        A, d = self.env.n_actions, self.env.preprocessor.output_dim
        self.pf_mod, self.pb_mod, self.logF_mod = MLP(d, A, 32), MLP(d, A - 1, 32), MLP(d, 1, 32)
        self.d_pf = DiscretePolicyEstimator(self.pf_mod, A, self.env.preprocessor)
        self.d_pb = DiscretePolicyEstimator(self.pb_mod, A, self.env.preprocessor, is_backward=True)
        self.d_logF = ScalarEstimator(self.logF_mod, self.env.preprocessor)
        tpre = tg_pre.KHotPreprocessor(height=height, ndim=ndim)
        self.t_pf = tg_est.DiscretePolicyEstimator(AsFloat(self.pf_mod), A, preprocessor=tpre)
        self.t_pb = tg_est.DiscretePolicyEstimator(AsFloat(self.pb_mod), A, preprocessor=tpre, is_backward=True)
        self.t_logF = tg_est.ScalarEstimator(AsFloat(self.logF_mod), preprocessor=tpre)

    def sample(self, n=48, **kw):
        with torch.no_grad():
            return Sampler(self.d_pf).sample_trajectories(self.env, n=n, **kw)

    def to_torchgfn(self, traj):
        return TgTrajectories(
            env=self.tenv,
            states=self.tenv.states_from_tensor(traj.states_tensor.clone()),
            actions=self.tenv.actions_from_tensor(traj.actions_tensor.clone()),
            terminating_idx=traj.terminating_idx.clone(),
            log_rewards=traj.log_rewards.clone(),
            log_probs=None if traj.log_probs is None else traj.log_probs.clone(),
        )


def assert_same_value_and_grads(ours, theirs, params):
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True, retain_graph=True)  # saved log-probs are shared
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    n_nonzero = 0
    for a, b in zip(g_ours, g_theirs):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(a.expand_as(b) if a.dim() == 0 else a, b, atol=ATOL, rtol=1e-4)
        n_nonzero += int(float(b.abs().sum()) > 0)
    assert n_nonzero > 0  # the comparison is not between zeros


@pytest.mark.parametrize("forward_looking", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_db_matches_torchgfn(forward_looking, clip):
    p = Pair(seed=1)
    traj = p.sample(epsilon=0.3)
    kw = {"forward_looking": forward_looking, "log_reward_clip_min": -1.0 if clip else -float("inf")}
    ours = DBGFlowNet(p.d_pf, p.d_pb, p.d_logF, **kw)
    theirs = tg_gfn.DBGFlowNet(p.t_pf, p.t_pb, p.t_logF, **kw)
    tt = theirs.to_training_samples(p.to_torchgfn(traj))
    torch.testing.assert_close(ours.get_scores(p.env, traj), theirs.get_scores(p.tenv, tt), atol=ATOL, rtol=1e-5)
    for reduction in ("mean", "sum"):
        assert_same_value_and_grads(ours.loss(p.env, traj, reduction=reduction),
                                    theirs.loss(p.tenv, tt, reduction=reduction), list(ours.parameters()))
    torch.testing.assert_close(ours.loss(p.env, traj, reduction="none"), theirs.loss(p.tenv, tt, reduction="none"),
                               atol=ATOL, rtol=1e-5)


def test_db_constant_pb_and_custom_log_rewards_match_torchgfn():
    p = Pair(seed=2)
    traj = p.sample()
    ours = DBGFlowNet(p.d_pf, None, p.d_logF, constant_pb=True)
    theirs = tg_gfn.DBGFlowNet(p.t_pf, None, p.t_logF, constant_pb=True)
    tt = theirs.to_training_samples(p.to_torchgfn(traj))
    lr_N = torch.randn(traj.n_trajectories)
    # torchgfn takes per-transition log-rewards (read at the exits); gfn_dist takes (N,) or that layout.
    lr_M = torch.zeros(traj.actions_tensor.shape[:2])
    lr_M[traj.terminating_idx - 1, torch.arange(traj.n_trajectories)] = lr_N
    lr_M = lr_M[traj.actions_tensor[..., 0] >= 0]
    theirs_loss = theirs.loss(p.tenv, tt, log_rewards=lr_M)
    assert_same_value_and_grads(ours.loss(p.env, traj, log_rewards=lr_N), theirs_loss, list(ours.parameters()))
    torch.testing.assert_close(ours.loss(p.env, traj, log_rewards=lr_M), theirs.loss(p.tenv, tt, log_rewards=lr_M))


@pytest.mark.parametrize("constant_pb", [False, True])
def test_modified_db_matches_torchgfn(constant_pb):
    p = Pair(seed=3)
    traj = p.sample(epsilon=0.2)
    pb_d, pb_t = (None, None) if constant_pb else (p.d_pb, p.t_pb)
    ours = ModifiedDBGFlowNet(p.d_pf, pb_d, constant_pb=constant_pb)
    theirs = tg_gfn.ModifiedDBGFlowNet(p.t_pf, pb_t, constant_pb=constant_pb)
    tt = theirs.to_training_samples(p.to_torchgfn(traj))
    torch.testing.assert_close(ours.get_scores(traj), theirs.get_scores(tt), atol=ATOL, rtol=1e-5)
    assert_same_value_and_grads(ours.loss(p.env, traj), theirs.loss(p.tenv, tt), list(ours.parameters()))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_subtb_matches_torchgfn(weighting):
    p = Pair(seed=4)
    traj = p.sample(epsilon=0.3)
    assert len(set(traj.terminating_idx.tolist())) > 3  # varied lengths exercise the weights
    ours = SubTBGFlowNet(p.d_pf, p.d_pb, p.d_logF, weighting=weighting, lamda=0.8)
    theirs = tg_gfn.SubTBGFlowNet(p.t_pf, p.t_pb, p.t_logF, weighting=weighting, lamda=0.8)
    assert_same_value_and_grads(ours.loss(p.env, traj), theirs.loss(p.tenv, p.to_torchgfn(traj)),
                                list(ours.parameters()))


def test_subtb_defaults_and_forward_looking_match_torchgfn():
    p = Pair(seed=5)
    traj = p.sample()
    ours = SubTBGFlowNet(p.d_pf, p.d_pb, p.d_logF, forward_looking=True, log_reward_clip_min=-1.5)
    theirs = tg_gfn.SubTBGFlowNet(p.t_pf, p.t_pb, p.t_logF, forward_looking=True, log_reward_clip_min=-1.5)
    assert ours.weighting == theirs.weighting == "geometric_within" and ours.lamda == theirs.lamda
    assert_same_value_and_grads(ours.loss(p.env, traj), theirs.loss(p.tenv, p.to_torchgfn(traj)),
                                list(ours.parameters()))


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_fm_matches_torchgfn(alpha):
    p = Pair(seed=6)
    traj = p.sample(epsilon=0.3)
    ours = FMGFlowNet(p.d_pf, alpha=alpha)
    theirs = tg_gfn.FMGFlowNet(p.t_pf, alpha=alpha)
    sc = theirs.to_training_samples(p.to_torchgfn(traj))
    for reduction in ("mean", "sum"):
        assert_same_value_and_grads(ours.loss(p.env, traj, reduction=reduction),
                                    theirs.loss(p.tenv, sc, reduction=reduction), list(ours.parameters()))


def test_saved_logprobs_path_matches_torchgfn_db():
    # On-policy: saved log-probs (differentiable, sampled under grad mode) as torchgfn's.
    p = Pair(seed=7)
    traj = Sampler(p.d_pf).sample_trajectories(p.env, n=32, save_logprobs=True)
    ours = DBGFlowNet(p.d_pf, p.d_pb, p.d_logF)
    theirs = tg_gfn.DBGFlowNet(p.t_pf, p.t_pb, p.t_logF)
    tt = theirs.to_training_samples(p.to_torchgfn(traj))  # the saved log-probs carry the graph over
    assert_same_value_and_grads(ours.loss(p.env, traj, recalculate_all_logprobs=False),
                                theirs.loss(p.tenv, tt, recalculate_all_logprobs=False), list(ours.parameters()))
